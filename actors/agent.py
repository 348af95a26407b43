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
and alerts and logs, which the ioloop keeps in the :class:`Outbox`.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cbor2
from pika.adapters.select_connection import IOLoop, SelectConnection
from sqlitedict import SqliteDict

from edgeward.enforcement.backend import Backend, BackendError, BuiltinBackend
from edgeward.transport.connection import quiet_pika, split_urls
from edgeward.transport.signing import Verifier

from . import core as c
from .cache import AgentCache
from .config import AgentConfig
from .shell import AgentShell, Link

TICK_SECONDS = 1.0
OUTBOX_SUMMARY_SECONDS = 60.0


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


class Outbox:
    """What the backend saw (alerts, logs), kept on disk for telemetry.

    One sqlitedict table (``outbox`` in ``outbox.sqlite`` beside the cache),
    one entry per event under ``"<seq>:<kind>"`` with a per-device sequence
    number.  Sending it on is the telemetry issue's; until then it only fills,
    bounded at ``max_entries``: when full the oldest entry of the lowest
    priority goes first (logs before alerts), and every drop is counted.
    Writes are queued to sqlitedict's writer thread and committed on
    :meth:`flush` (every tick), so the ioloop never waits on the disk for them.
    """

    PRIORITY = ("log", "alert")  # lowest first

    def __init__(self, directory: Path, max_entries: int = 10_000) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "outbox.sqlite"
        self.max_entries = max_entries
        self._db = SqliteDict(
            str(self.path),
            tablename="outbox",
            encode=cbor2.dumps,
            decode=cbor2.loads,
            autocommit=False,
            outer_stack=False,
        )
        self._keys: dict[str, deque[str]] = {kind: deque() for kind in self.PRIORITY}
        self.seq = 0
        for key in self._db.keys():  # in insertion order
            seq, _, kind = key.partition(":")
            self._keys.setdefault(kind, deque()).append(key)
            self.seq = max(self.seq, int(seq))
        self.kept: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._dirty = False

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._keys.values())

    def add(self, kind: str, data: Mapping[str, Any], now: float) -> None:
        self.seq += 1
        key = f"{self.seq:012d}:{kind}"
        self._db[key] = {"seq": self.seq, "kind": kind, "time": now, "data": dict(data)}
        self._keys.setdefault(kind, deque()).append(key)
        self.kept[kind] += 1
        self._dirty = True
        while len(self) > self.max_entries:
            lowest = next(k for k in [*self.PRIORITY, *self._keys] if self._keys.get(k))
            del self._db[self._keys[lowest].popleft()]
            self.dropped[lowest] += 1

    def flush(self) -> None:
        if self._dirty:
            self._db.commit(blocking=False)
            self._dirty = False

    def close(self) -> None:
        self._db.commit(blocking=True)
        self._db.close()


class LocalEnforcer(AgentShell):
    """Hosts one :class:`AgentCore` on a real device."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.time,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.urls = split_urls(config.broker_url)
        self.disk_cache = AgentCache(Path(config.cache_dir))
        super().__init__(
            c.AgentCore(
                config.device,
                config.labels,
                Verifier(config.trusted_keys),
                heartbeat_interval=config.heartbeat_interval,
            ),
            backend or make_backend(config),
            self.disk_cache,
            clock=clock,
            out=out or (lambda line: print(line, flush=True)),
        )
        # Made with the kubearmor backend's alert/log watch, its only source yet.
        self.outbox: Outbox | None = None
        self.watch: Any = None
        self._summary_at = 0.0
        self._summarised: Counter[str] = Counter()
        self.ioloop = IOLoop()
        self.link = Link(
            [self],
            self.urls,
            SelectConnection,
            self.ioloop,
            name=f"edgeward-agent {config.device}",
            prefetch=config.prefetch,
            on_event=self._on_link_event,
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
        if self.backend.name == "kubearmor":  # it tags each policy with the revision
            return self.backend.apply(policies, digest, revision=revision)  # type: ignore[call-arg]
        return super().put_in_force(policies, digest, revision)

    def run(self) -> int:
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.ioloop.add_callback_threadsafe(self.stop))
        self._start_watch()
        self.link.start()
        self.ioloop.call_later(TICK_SECONDS, self._tick)
        self.ioloop.start()
        if self.watch is not None:
            self.watch.stop()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        if self.outbox is not None:
            self.outbox.close()
        self.disk_cache.close()
        return 0

    # -- the kubearmor daemon, through the watch thread ---------------------------

    def _start_watch(self) -> None:
        if self.backend.name != "kubearmor":
            return
        from edgeward.enforcement.kubearmor.backend import Watch

        def hand_over(event: object) -> None:  # called on a watch thread
            self.ioloop.add_callback_threadsafe(functools.partial(self._on_daemon, event))

        self.outbox = Outbox(Path(self.config.cache_dir))
        self.watch = Watch(self.backend, hand_over).start()  # type: ignore[arg-type]

    def _on_daemon(self, event: Any) -> None:
        """A watch event, now on the ioloop."""
        from edgeward.enforcement.kubearmor import backend as ka

        assert self.outbox is not None  # made with the watch
        if isinstance(event, ka.AlertSeen):
            self.outbox.add("alert", event.alert, self.clock())
        elif isinstance(event, ka.LogSeen):
            self.outbox.add("log", event.log, self.clock())
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
        if self.outbox is None:
            return
        counts = self.outbox.kept + self.outbox.dropped
        if counts == self._summarised or now < self._summary_at:
            return
        self._summarised = Counter(counts)
        self._summary_at = now + OUTBOX_SUMMARY_SECONDS
        kept, dropped = self.outbox.kept, self.outbox.dropped
        self.say(
            f"outbox: {kept['alert']} alerts, {kept['log']} logs kept since start"
            f" ({sum(dropped.values())} dropped, {len(self.outbox)} waiting)"
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
        if self.outbox is not None:
            self.outbox.flush()
            self._summarise_outbox(self.clock())
        self.ioloop.call_later(TICK_SECONDS, self._tick)


def run_agent(config_path: Path) -> int:
    config = AgentConfig.read(config_path)
    # The agent says what happened to its link in its own words; pika's log
    # would repeat each failure several times over.
    quiet_pika()
    agent = LocalEnforcer(config, out=lambda line: print(f"[{config.device}] {line}", flush=True))
    return agent.run()
