"""The device agent: the LocalEnforcer around the agent core.

One process, one event loop (pika's ``SelectConnection`` ioloop), which does
all the work: the core, the cache, the broker and every call that changes
what the backend enforces.  Start-up order is the design's promise: load the
cache, put its policies in force, say so, and only then connect.  A device
with no network is protected within a second.

With the ``kubearmor`` backend one more thread reads the daemon's alert and
log streams (an asyncio loop with grpc's asyncio API; see
``enforcement/kubearmor``).  It only hands what it sees to the ioloop
(``add_callback_threadsafe``): the daemon (re)appearing, which makes the
ioloop reconcile the daemon with the set in force and retry a failed apply,
and alerts and logs, which the ioloop keeps in the outbox.

Telemetry (docs/telemetry.md, "Agent side"): every record — the backend's
alerts and logs, the core's own events (``Emit``), the outbox's drop reports
— is numbered and committed to the :class:`~edgeward.actors.outbox.Outbox`
first; a :class:`~edgeward.actors.outbox.Sender` drains it over the policy
channel, switched to publisher confirms.  With the builtin
backend, ``--events-from PATH`` feeds it events to judge (:class:`EventsReader`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pika.adapters.select_connection import IOLoop, SelectConnection

from edgeward.enforcement.backend import Backend, BackendError, BuiltinBackend
from edgeward.transport.connection import (
    Backoff,
    TLSSettings,
    cancel_timer,
    explain_open_error,
    quiet_pika,
    split_urls,
)
from edgeward.transport.signing import Verifier

from . import core as c
from .cache import AgentCache, TrustFile
from .config import AgentConfig
from .outbox import Outbox, Sender
from .shell import AgentShell, Link, SendsTelemetry

TICK_SECONDS = 1.0
OUTBOX_SUMMARY_SECONDS = 60.0
TAG_PREFIX = "edgeward-rev:"  # the kubearmor backend's revision tag (not imported: grpc)


def make_backend(config: AgentConfig) -> Backend:
    """The backend the config names; grpc is imported only for kubearmor."""
    settings = config.kubearmor_settings()
    if settings is None:
        return BuiltinBackend()
    # grpc's C core logs every connection change to stderr; the agent says
    # what matters in its own words.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from edgeward.enforcement.kubearmor.backend import KubeArmorBackend

    return KubeArmorBackend(settings)


def tls_connection(
    tls: TLSSettings, params: Any, *, on_open_error_callback: Any, **kwargs: Any
) -> SelectConnection:
    """The agent's SelectConnection, with its own TLS settings put into the
    parameters the link made from the URL; a failed TLS handshake reaches the
    link as an error that says which check failed."""
    tls.apply(params)
    return SelectConnection(
        params,
        on_open_error_callback=lambda conn, error: on_open_error_callback(
            conn, explain_open_error(error, tls)
        ),
        **kwargs,
    )


class EventsReader:
    """Follows a JSONL file of events (``edgeward policy test``'s schema) or a
    named pipe on the ioloop, and hands complete lines to ``handle`` in batches.

    A regular file is read to its end, then polled for new lines every
    ``poll`` seconds (``call_later``); where it stood is stored with the
    records it produced (``position``/``resume``), so a restart neither
    repeats nor skips a line.  A file replaced by another (a new inode) or cut
    shorter is read from its start.  A named pipe is watched with
    ``add_handler``; the reader holds it open for writing too, so it never
    sees end-of-file between writers (it reopens it if it ever does).
    """

    BATCH_BYTES = 64 * 1024

    def __init__(
        self,
        path: Path,
        ioloop: IOLoop,
        handle: Callable[[list[bytes], str | None], None],
        *,
        resume: str | None = None,
        poll: float = 0.5,
    ) -> None:
        self.path = path
        self.ioloop = ioloop
        self.handle = handle  # (complete lines, position after them or None for a pipe)
        self.poll = poll
        self._resume = resume
        self._file: Any = None
        self._fd: int | None = None
        self._inode = 0
        self._pending = b""
        self._timer: Any = None
        self.stopped = False

    def start(self) -> None:
        try:
            is_pipe = stat.S_ISFIFO(os.stat(self.path).st_mode)
        except OSError:
            is_pipe = False  # not there yet: poll for it
        if is_pipe:
            self._open_pipe()
        else:
            self._read_file()

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None:
            cancel_timer(self.ioloop, self._timer)
        if self._fd is not None:
            self.ioloop.remove_handler(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.close()

    # -- a regular file ------------------------------------------------------------

    def _later(self, delay: float) -> None:
        if not self.stopped:
            self._timer = self.ioloop.call_later(delay, self._read_file)

    def _read_file(self) -> None:
        self._timer = None
        try:
            st = os.stat(self.path)
        except OSError:
            self._later(self.poll)
            return
        if self._file is None or st.st_ino != self._inode or st.st_size < self._file.tell():
            if self._file is not None:
                self._file.close()
            self._file = open(self.path, "rb")  # noqa: SIM115 - held open while following
            self._inode = st.st_ino
            offset = self._resumed_offset(st)
            self._file.seek(offset)
        start = self._file.tell()
        data = self._file.read(self.BATCH_BYTES)
        end = data.rfind(b"\n") + 1
        if end == 0:
            self._file.seek(start)
            if len(data) == self.BATCH_BYTES:  # one line longer than a batch: skip it
                self._file.seek(start + len(data))
                self.handle([data], f"{self._inode}:{start + len(data)}")
            self._later(self.poll)
            return
        self._file.seek(start + end)
        self.handle(data[:end].splitlines(), f"{self._inode}:{start + end}")
        self._later(0 if len(data) == self.BATCH_BYTES else self.poll)

    def _resumed_offset(self, st: os.stat_result) -> int:
        resume, self._resume = self._resume, None
        inode, _, offset = str(resume or "").partition(":")
        if inode == str(st.st_ino) and offset.isdigit() and int(offset) <= st.st_size:
            return int(offset)
        return 0

    # -- a named pipe ----------------------------------------------------------------

    def _open_pipe(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        self.ioloop.add_handler(self._fd, self._on_pipe, IOLoop.READ)

    def _on_pipe(self, fd: int, _events: int) -> None:
        try:
            data = os.read(fd, self.BATCH_BYTES)
        except BlockingIOError:
            return
        if not data:  # end of file: every writer went (cannot happen while we hold it)
            self.ioloop.remove_handler(fd)
            os.close(fd)
            self._fd = None
            if not self.stopped:
                self._open_pipe()
            return
        data = self._pending + data
        end = data.rfind(b"\n") + 1
        self._pending = data[end:]
        if end:
            self.handle(data[:end].splitlines(), None)


def kubearmor_alert(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A telemetry ``alert`` body from one KubeArmor alert (its fields kept under ``kubearmor``)."""
    tags = [t for t in str(raw.get("Tags", "")).split(",") if t]
    revision = next(
        (
            int(t[len(TAG_PREFIX) :])
            for t in tags
            if t.startswith(TAG_PREFIX) and t[len(TAG_PREFIX) :].isdigit()
        ),
        None,
    )
    severity = str(raw.get("Severity", ""))
    return {
        "policy": raw.get("PolicyName"),
        "action": raw.get("Action"),
        "severity": int(severity) if severity.isdigit() else None,
        "operation": raw.get("Operation"),
        "resource": raw.get("Resource"),
        "source": raw.get("Source") or raw.get("ProcessName"),
        "tags": [t for t in tags if not t.startswith(TAG_PREFIX)],
        "message": raw.get("Message"),
        "revision": revision,
        "kubearmor": dict(raw),
    }


def login_of(config: AgentConfig) -> str | None:
    """The device's own broker user (its name), or None for a shared login.
    With ``tls_external`` the login is the certificate's CN, which the agent
    checked at start to be the device name."""
    if config.tls_external:
        return config.device
    users = {unquote(urlsplit(u).username or "") for u in split_urls(config.broker_url)}
    return config.device if users == {config.device} else None


class LocalEnforcer(SendsTelemetry, AgentShell):
    """Hosts one :class:`AgentCore` on a real device."""

    def floor(self) -> int:
        return self._floor

    def persisted(self, record: c.CacheRecord) -> None:
        # Floor and keys, kept apart from the cache, before the delivery is acked.
        floor = max(self._floor, record.revision)
        keyring = self.core.verifier.keyring
        if (floor, keyring) != self._trusted:
            self.trust.store(floor, keyring)
            self._floor, self._trusted = floor, (floor, keyring)

    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.time,
        out: Callable[[str], None] | None = None,
        events_from: Path | None = None,
    ) -> None:
        self.config = config
        self.urls = split_urls(config.broker_url)
        self.disk_cache = AgentCache(Path(config.cache_dir))
        # The keys trusted now and the floor, kept apart from the cache; the
        # config's keys until a bundle named others.
        self.trust = TrustFile(config.trust_path())
        self._floor, keyring = self.trust.load()
        self._trusted: tuple[int, dict[str, Any]] = (self._floor, keyring)
        verifier = Verifier(config.trusted_keys)
        if keyring:
            try:
                verifier = Verifier.from_keyring(keyring)
            except (ValueError, KeyError, TypeError) as exc:
                self.trust.problem = f"{self.trust.path}: bad keyring ({exc})"
        super().__init__(
            c.AgentCore(
                config.device,
                config.labels,
                verifier,
                heartbeat_interval=config.heartbeat_interval,
                records=True,
            ),
            backend or make_backend(config),
            self.disk_cache,
            clock=clock,
            out=out or (lambda line: print(line, flush=True)),
        )
        self.ioloop = IOLoop()
        self.outbox: Outbox = Outbox(
            Path(config.cache_dir) / "outbox.sqlite",
            config.device,
            max_records=config.outbox_max_records,
            max_bytes=config.outbox_max_bytes,
        )
        # A device with a broker user of its own (named after it) stamps
        # that login as user_id on what it publishes: RabbitMQ refuses any
        # other, and the control plane trusts nothing without it.
        self.user_id = login_of(config)
        self.sender = Sender(
            self.outbox,
            self.ioloop,
            window=config.telemetry_window,
            rate=config.telemetry_rate,
            jitter=config.telemetry_drain_jitter_s,
            clock=time.monotonic,
            say=self.say,
            user_id=self.user_id,
        )
        self.confirm_latency = self.sender.latency  # its counts go out in heartbeats
        if self.trust.problem:
            self.say(f"warning: {self.trust.problem}; trusting the config's keys")
        if events_from is not None and self.backend.name != "builtin":
            raise ValueError("--events-from needs the builtin backend (kubearmor sees real events)")
        self.events_from = events_from
        self.events: EventsReader | None = None
        self.bad_events = 0
        self.watch: Any = None
        self._summary_at = 0.0
        self._summarised: Counter[str] = Counter()
        self._drops_at = 0.0
        # TLS from the config (docs/tls.md): files checked now, so that a bad
        # setting stops the agent with a clear error instead of retrying.
        self.tls = config.tls_settings().check(self.urls, login=config.device)
        self.link = Link(
            [self],
            self.urls,
            functools.partial(tls_connection, self.tls),
            self.ioloop,
            name=f"edgeward-agent {config.device}",
            prefetch=config.prefetch,
            on_event=self._on_link_event,
            backoff=Backoff(spread=config.reconnect_spread_s),
        )

    def _on_link_event(self, kind: str, detail: str) -> None:
        if kind == "connected":
            self.say(f"connected to {detail}")
        elif kind == "closed":
            if self.link.stopped:
                self.ioloop.stop()
        elif kind.startswith("lost:"):
            self.say(f"connection lost ({kind[5:]}): {detail}; reconnecting")
        else:
            self.say(f"broker unreachable ({kind}): {detail}")

    def start(self) -> None:
        if self.disk_cache.set_aside is not None:
            self.say(f"warning: damaged cache moved to {self.disk_cache.set_aside}; starting empty")
        super().start()

    def put_in_force(self, policies: Sequence[Any], digest: str, revision: int) -> str:
        # Both backends remember the revision (kubearmor tags each policy with
        # it; builtin names it in alerts).
        return self.backend.apply(policies, digest, revision=revision)

    def run(self) -> int:
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.ioloop.add_callback_threadsafe(self.stop))
        self._start_watch()
        self._start_events()
        self.link.start()
        self.ioloop.call_later(TICK_SECONDS, self._tick)
        self.ioloop.start()
        if self.watch is not None:
            self.watch.stop()
        if self.events is not None:
            self.events.stop()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self.outbox.close()
        self.disk_cache.close()
        return 0

    # -- events to judge (builtin backend, --events-from) ------------------------------

    def _start_events(self) -> None:
        if self.events_from is None:
            return
        self.events = EventsReader(
            self.events_from,
            self.ioloop,
            self._on_event_lines,
            resume=self.outbox.position("events"),
        )
        self.say(f"judging events from {self.events_from}")
        self.events.start()

    def _on_event_lines(self, lines: list[bytes], position: str | None) -> None:
        from edgeward.enforcement.evaluator import Event, EventError

        backend: BuiltinBackend = self.backend  # type: ignore[assignment]
        items: list[tuple[str, dict[str, Any]]] = []
        bad: list[str] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = Event.from_json(json.loads(line))
            except (ValueError, EventError) as exc:  # JSONDecodeError is a ValueError
                bad.append(str(exc)[:200])
                continue
            decision = backend.evaluate(event)
            if decision.action in ("Audit", "Block"):
                items.append(("alert", backend.alert(event, decision)))
            elif self.config.log_allowed_events:
                items.append(("log", backend.alert(event, decision)))
        if bad:
            self.bad_events += len(bad)
            items.append(
                ("event", {"event": "bad_events", "count": len(bad), "first_error": bad[0]})
            )
            self.say(f"warning: {len(bad)} unreadable event lines (first: {bad[0]})")
        self.outbox.accept_many(
            items, self.clock(), source=None if position is None else ("events", position)
        )

    # -- the kubearmor daemon, through the watch thread ---------------------------

    def _start_watch(self) -> None:
        if self.backend.name != "kubearmor":
            return
        from edgeward.enforcement.kubearmor.backend import Watch

        def hand_over(event: object) -> None:  # called on a watch thread
            self.ioloop.add_callback_threadsafe(functools.partial(self._on_daemon, event))

        self.watch = Watch(self.backend, hand_over).start()  # type: ignore[arg-type]

    def _on_daemon(self, event: Any) -> None:
        """A watch event, now on the ioloop."""
        from edgeward.enforcement.kubearmor import backend as ka

        if isinstance(event, ka.AlertSeen):
            self.outbox.accept("alert", kubearmor_alert(event.alert), self.clock())
        elif isinstance(event, ka.LogSeen):
            self.outbox.accept("log", dict(event.log), self.clock())
        elif isinstance(event, ka.DaemonUp):
            self.say(f"kubearmor at {event.address} answers")
            self._reconcile()
        elif isinstance(event, ka.DaemonDown):
            self.say(f"kubearmor lost ({event.reason}); reconnecting")

    def _reconcile(self) -> None:
        """The daemon (re)appeared, maybe replaying old copies: make it hold
        exactly the set in force, then retry a failed apply."""
        try:
            removed, added = self.backend.reconcile()  # type: ignore[attr-defined]
        except BackendError as exc:
            self.say(f"warning: kubearmor reconcile failed: {exc}")
            return
        if removed or added:
            self.say(
                f"kubearmor reconciled: removed {', '.join(removed) or 'none'}; "
                f"sent again {', '.join(added) or 'none'}"
            )
        self._retry_failed_apply()

    def _retry_failed_apply(self) -> None:
        if self.core.state.status == "failed":
            self.feed(c.RetryApply(self.clock()))

    def _on_qos(self, _frame: Any) -> None:
        super()._on_qos(_frame)
        self._retry_failed_apply()  # the broker came back: try a failed apply again too

    def _summarise_outbox(self, now: float) -> None:
        # What the backend saw and what was dropped; the agent's own events
        # are said in their own lines already.
        seen = Counter({k: n for k, n in self.outbox.accepted.items() if k != "event"})
        counts = seen + Counter({f"dropped:{k}": n for k, n in self.outbox.dropped.items()})
        if counts == self._summarised or now < self._summary_at:
            return
        self._summarised = Counter(counts)
        self._summary_at = now + OUTBOX_SUMMARY_SECONDS
        kept, dropped = self.outbox.accepted, self.outbox.dropped
        self.say(
            f"outbox: {kept['alert']} alerts, {kept['log']} logs kept since start"
            f" ({sum(dropped.values())} dropped, {len(self.outbox)} waiting,"
            f" {kept['event']} events, {self.sender.confirmed} sent)"
        )

    def stop(self) -> None:
        if self.link.stopped:
            return
        self.say("stopping")
        was_open = self.link.is_open
        self.link.stop()
        if not was_open:
            self.ioloop.stop()

    def _tick(self) -> None:
        if self.link.stopped:
            return
        self.tick()
        if self.sender.draining:
            self._report_drops()
        self._summarise_outbox(self.clock())
        self.ioloop.call_later(TICK_SECONDS, self._tick)


def run_agent(config_path: Path, events_from: Path | None = None) -> int:
    config = AgentConfig.read(config_path)
    # The agent says what happened to its link in its own words; pika's log
    # would repeat each failure several times over.
    quiet_pika()
    agent = LocalEnforcer(
        config,
        out=lambda line: print(f"[{config.device}] {line}", flush=True),
        events_from=events_from,
    )
    return agent.run()
