"""The thin shell around the agent core, shared by the real agent and the
simulator.

* :class:`AgentShell` — one device: its core, backend and cache.  It turns
  channel input and ticks into core events and carries out the effects, in
  order.  It does not own a connection: a channel is attached to it when a
  link is up and detached when the link goes.
* :class:`Link` — owns one AMQP connection for one or more shells (one on a
  real device; several when the simulator shares connections), opens a
  channel per shell, and reconnects forever with jittered backoff over the
  broker URL list.  It works with any pika connection class whose ioloop has
  ``call_later`` (``SelectConnection`` on a device, ``AsyncioConnection`` in
  the simulator).

pika's exceptions stop here: a lost link is a core event (``LinkLost``),
and why it was lost is classified by :func:`close_kind` for counting.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pika
import pika.exceptions

from edgeward.enforcement.backend import Backend, BackendError
from edgeward.transport import topology
from edgeward.transport.connection import Backoff, cancel_timer, parameters, redact, rotation

from . import core as c


class Cache(Protocol):
    def load(self) -> c.CacheRecord | None: ...
    def store(self, record: c.CacheRecord) -> None: ...


class MemoryCache:
    """A cache that lives as long as the process (the simulator's)."""

    def __init__(self) -> None:
        self.record: c.CacheRecord | None = None

    def load(self) -> c.CacheRecord | None:
        return self.record

    def store(self, record: c.CacheRecord) -> None:
        self.record = record


def close_kind(reason: object) -> str:
    """A short label for why a connection closed or could not open."""
    if isinstance(reason, pika.exceptions.ConnectionClosedByBroker):
        return f"closed_by_broker_{reason.reply_code}"
    if isinstance(reason, pika.exceptions.ConnectionClosedByClient):
        return "closed_by_client"
    if isinstance(reason, pika.exceptions.StreamLostError):
        return "connection_reset"
    if isinstance(reason, pika.exceptions.ProbableAuthenticationError):
        return "login_refused"
    if isinstance(reason, pika.exceptions.AMQPConnectionError):
        text = repr(reason)
        if "StackTimeout" in text or "timed out" in text.lower() or "timeout" in text.lower():
            return "handshake_timeout"
        if "refused" in text.lower():
            return "connection_refused"
        if "reset" in text.lower():
            return "connection_reset"
        return "connect_failed"
    return type(reason).__name__


class AgentShell:
    """One device: feeds its core and carries out the core's effects."""

    # The telemetry sender of a host that keeps one (SendsTelemetry): it
    # shares the channel, so it is told of every other publish on it.
    sender: Any = None

    def __init__(
        self,
        core: c.AgentCore,
        backend: Backend,
        cache: Cache,
        *,
        clock: Callable[[], float] = time.time,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.core = core
        self.backend = backend
        self.cache = cache
        self.clock = clock
        self.out = out
        self.device = core.device
        self.channel: Any = None
        self.deliveries = 0
        self.heartbeats = 0
        # The telemetry outbox (actors/outbox.py) of a host that keeps one:
        # the core's Emit effects go into it, and heartbeats report its depth
        # and drops.  The simulator's devices keep an in-memory one.
        self.outbox: Any = None
        self.confirm_latency: Any = None  # the Sender's ConfirmLatency, where one sends
        self.user_id: str | None = None  # the device's own broker login, when it has one

    # -- the shell's three jobs: input -> event -> effects --------------------

    def feed(self, event: c.Event) -> None:
        effects = self.core.handle(event)
        while effects:
            follow_up = self._carry_out(effects.pop(0))
            if follow_up is not None:
                effects = self.core.handle(follow_up) + effects

    def _carry_out(self, effect: c.Effect) -> c.Event | None:
        match effect:
            case c.Apply(policies=policies, revision=revision, digest=expected):
                try:
                    digest = self.put_in_force(policies, expected, revision)
                except BackendError as exc:
                    return c.ApplyResult(self.clock(), False, self.backend.digest, str(exc))
                self.applied(revision, policies)
                return c.ApplyResult(self.clock(), True, digest)
            case c.Persist(record=record):
                self.cache.store(record)
                self.persisted(record)
            case c.Ack(tag=tag):
                if self.channel is not None and self.channel.is_open:
                    self.channel.basic_ack(tag)
            case c.Consume(offset=offset):
                self._consume(offset)
            case c.SendHeartbeat(heartbeat=hb):
                if self.channel is not None and self.channel.is_open:
                    if self.outbox is not None:
                        hb = dataclasses.replace(
                            hb, outbox=len(self.outbox), dropped=dict(self.outbox.dropped)
                        )
                    if self.confirm_latency is not None:
                        confirms, seconds = self.confirm_latency.take()
                        hb = dataclasses.replace(hb, confirms=confirms, confirm_seconds=seconds)
                    self.channel.basic_publish(
                        topology.TELEMETRY_EXCHANGE,
                        topology.heartbeat_routing_key(self.device),
                        hb.encode(),
                        pika.BasicProperties(content_type="application/cbor", user_id=self.user_id),
                    )
                    self.heartbeats += 1
                    if self.sender is not None and self.sender.channel is self.channel:
                        self.sender.count_publish()  # it took a confirm number
            case c.Report(level=level, text=text):
                self.say(text if level == "info" else f"{level}: {text}")
            case c.Emit(type=kind, body=body):
                # Committed before the next effect (an Ack, a Persist) is carried out.
                if self.outbox is not None:
                    self.outbox.accept(kind, body, self.clock())
        return None

    # -- hooks for hosts --------------------------------------------------------

    def put_in_force(self, policies: Sequence[Any], digest: str, revision: int) -> str:
        """Hand a set to the backend (a host whose backend wants the revision
        too overrides this)."""
        return self.backend.apply(policies, digest)

    def persisted(self, record: c.CacheRecord) -> None:
        """The cache took ``record`` (a host that keeps more does it here)."""

    def floor(self) -> int:
        """The highest revision this device accepted, as kept apart from the cache."""
        return 0

    def applied(self, revision: int, policies: Sequence[Any]) -> None:
        """A set was put in force."""
        names = ", ".join(sorted(p["metadata"]["name"] for p in policies)) or "none"
        self.say(f"in force: revision {revision} ({len(policies)} policies: {names})")

    def say(self, line: str) -> None:
        if self.out is not None:
            self.out(line)

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Put the cached policy in force; touches no network."""
        self.feed(c.Started(self.clock(), self.cache.load(), self.floor()))

    def tick(self) -> None:
        self.feed(c.Tick(self.clock()))

    # -- the link, as a Link hands it over -----------------------------------------

    def attach(self, channel: Any, prefetch: int) -> None:
        self.channel = channel
        # Streams need a per-consumer (not global) prefetch.
        channel.basic_qos(prefetch_count=prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: Any) -> None:
        self.feed(c.LinkUp(self.clock()))

    def detach(self, reason: str) -> None:
        self.channel = None
        if self.core.state.link_up:
            self.feed(c.LinkLost(self.clock(), reason))

    def _consume(self, offset: int | str) -> None:
        if self.channel is None or not self.channel.is_open:
            return
        self.channel.basic_consume(
            topology.POLICY_STREAM,
            self._on_message,
            auto_ack=False,
            arguments={"x-stream-offset": offset},
        )

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        headers = properties.headers or {}
        offset = headers.get("x-stream-offset")
        if not isinstance(offset, int):
            # Not from a stream: still ours to ack, never to reject.
            channel.basic_ack(method.delivery_tag)
            return
        self.deliveries += 1
        self.feed(c.Delivery(self.clock(), method.delivery_tag, offset, body))


class Link:
    """One AMQP connection carrying the channels of one or more shells."""

    def __init__(
        self,
        shells: Sequence[Any],
        urls: list[str],
        connection_class: Any,
        loop: Any,
        *,
        name: str,
        prefetch: int = 64,
        heartbeat: int = 60,
        timeout: float = 10.0,
        on_event: Callable[[str, str], None] | None = None,
        backoff: Backoff | None = None,
        first_node: int | None = None,
    ) -> None:
        self.shells = list(shells)
        self.urls = urls
        self.connection_class = connection_class
        self.loop = loop
        self.name = name
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.on_event = on_event or (lambda kind, detail: None)
        self.backoff = backoff or Backoff()
        self._nodes = rotation(urls) if first_node is None else _from(urls, first_node % len(urls))
        self.conn: Any = None
        self.url = ""
        self.wanted = False  # should the link be up?
        self.stopped = False
        self._retry: Any = None

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.is_open

    def start(self, *, spread: bool = False) -> None:
        """Connect now, or (``spread``) after the backoff's first delay, as a
        device does that lost the broker together with the rest of its fleet."""
        self.wanted = True
        # A connection still closing after cut() is given up on: its close
        # callback must not count as a loss of the link being started.
        self.conn = None
        if spread:
            self._schedule_reconnect(self.backoff.after_loss())
        else:
            self._connect()

    def stop(self) -> None:
        """Close for good (the process is stopping)."""
        self.stopped = True
        self.cut()

    def cut(self) -> None:
        """Close the connection and do not reconnect until :meth:`start`."""
        self.wanted = False
        if self._retry is not None:
            cancel_timer(self.loop, self._retry)  # asyncio's handle or pika IOLoop's
            self._retry = None
        conn = self.conn
        if conn is not None and conn.is_open:
            conn.close()
        elif conn is not None and not (conn.is_closing or conn.is_closed):
            # Still in its handshake: pika's close() now can fail an assertion
            # inside its connection workflow (a traceback per connection).
            # Give it up instead; _on_open closes it if it ever opens.
            self.conn = None
        # The shells learn now: a start() may come before this close completes,
        # and the old connection's callbacks are ignored from then on.
        for shell in self.shells:
            shell.detach("cut")

    def _connect(self) -> None:
        self._retry = None
        if not self.wanted:
            return
        self.url = next(self._nodes)
        try:
            params = parameters(
                self.url, heartbeat=self.heartbeat, timeout=self.timeout, name=self.name
            )
            credentials = self.login()
            if credentials is not None:
                params.credentials = credentials
        except Exception as exc:  # a bad URL is a config error: say it and retry
            self.on_event("bad_url", f"{redact(self.url)}: {exc}")
            self._schedule_reconnect()
            return
        self.conn = self.connection_class(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self.loop,
        )

    def login(self) -> Any:
        """The pika credentials to log in with, or None for the URL's login
        (the simulator's per-device links derive theirs at each connect)."""
        return None

    def _schedule_reconnect(self, delay: float | None = None) -> None:
        if self.wanted and self._retry is None:
            if delay is None:
                delay = self.backoff.next_delay()
            self._retry = self.loop.call_later(delay, self._connect)

    def _on_open(self, conn: Any) -> None:
        if conn is not self.conn:
            conn.close()  # opened after a cut() that gave up on it
            return
        self.backoff.reset()
        self.on_event("connected", redact(self.url))
        for shell in self.shells:
            conn.channel(on_open_callback=lambda ch, s=shell: self._on_channel(s, ch))

    def _on_channel(self, shell: Any, channel: Any) -> None:
        channel.add_on_close_callback(
            lambda ch, reason, s=shell: self._on_channel_closed(s, reason)
        )
        shell.attach(channel, self.prefetch)

    def _on_channel_closed(self, shell: Any, reason: Any) -> None:
        shell.detach(str(reason))
        if self.is_open and self.wanted:
            # A channel closed by the broker (e.g. 406): start over cleanly.
            self.on_event("channel_closed", str(reason))
            self.conn.close()

    def _on_open_error(self, conn: Any, error: Any) -> None:
        if conn is not self.conn:
            return  # a connection given up on (cut) that failed on its own
        self.conn = None
        self.on_event(close_kind(error), f"{redact(self.url)}: {error or 'no answer'}")
        self._schedule_reconnect()

    def _on_closed(self, conn: Any, reason: Any) -> None:
        if conn is not self.conn:
            return  # an old connection, closed by cut() and since replaced
        self.conn = None
        for shell in self.shells:
            shell.detach(str(reason))
        if self.wanted:
            self.on_event("lost:" + close_kind(reason), f"{redact(self.url)}: {reason}")
            # Lost while up: likely with the rest of the fleet (a node or an
            # uplink went away), so the first attempt is spread out.
            self._schedule_reconnect(self.backoff.after_loss())
        else:
            self.on_event("closed", str(reason))


def _from(urls: list[str], start: int):
    i = start
    while True:
        yield urls[i % len(urls)]
        i += 1


DROP_REPORT_SECONDS = 60.0  # a drop report at most this often while connected


class SendsTelemetry:
    """The telemetry half of a host: the :class:`~edgeward.actors.outbox.Sender`
    drains the outbox over the policy channel itself, switched to confirm
    mode, with the outbox's drop reports going first.

    One channel, not a second one for telemetry: a second channel cost the
    broker ~60 KiB and 4 Erlang processes per device (BENCHMARKS.md, "One
    channel or two"), and bought no isolation — the heartbeats already
    publish on the policy channel, so a publish the broker refuses closes it
    either way, and the :class:`Link` then reconnects (the records wait in
    the outbox). Mixed into the real agent (LocalEnforcer) and the
    simulator's devices, which provide ``sender`` (or None), ``outbox``,
    ``clock`` and ``say``."""

    _drops_at = 0.0  # a class default: most simulated devices never set it

    def attach(self, channel: Any, prefetch: int) -> None:
        if self.sender is not None:
            # Confirm mode before the shell's first heartbeat, so that the
            # sender counts it (Sender.count_publish).
            self._report_drops(force=True)  # what was dropped offline goes first
            self.sender.attach(channel)
        super().attach(channel, prefetch)  # type: ignore[misc]

    def detach(self, reason: str) -> None:
        super().detach(reason)  # type: ignore[misc]
        if self.sender is not None:
            self.sender.detach()

    def _report_drops(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._drops_at:
            return
        record = self.outbox.report_drops(self.clock())
        if record is not None:
            self._drops_at = now + DROP_REPORT_SECONDS
            dropped = ", ".join(f"{n} {k}" for k, n in sorted(record.body["dropped"].items()))
            self.say(f"warning: outbox full: dropped {dropped} since first start")
