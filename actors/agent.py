"""The device agent: the LocalEnforcer shell around the agent core.

One process, one thread, one event loop (pika's ``SelectConnection`` ioloop):
the shell turns broker and timer input into core events, feeds the core, and
carries out the effects it returns.  It never lets an exception from the
network or a peer reach the core, and the core never sees a socket.

Start-up order is the design's promise: load the cache, put its policies in
force, say so, and only then connect.  A device with no network is
protected within a second.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection

from edgeward.enforcement.backend import Backend, BackendError, BuiltinBackend
from edgeward.transport import topology
from edgeward.transport.connection import Backoff, parameters, redact, rotation, split_urls
from edgeward.transport.signing import Verifier

from . import core as c
from .cache import AgentCache
from .config import AgentConfig

log = logging.getLogger("edgeward.agent")

TICK_SECONDS = 1.0


class LocalEnforcer:
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
        self.backend = backend or BuiltinBackend()
        self.clock = clock
        self.out = out or (lambda line: print(line, flush=True))
        self.cache = AgentCache(Path(config.cache_dir))
        self.core = c.AgentCore(
            config.device,
            config.labels,
            Verifier(config.trusted_keys),
            heartbeat_interval=config.heartbeat_interval,
        )
        self._nodes = rotation(self.urls)
        self._backoff = Backoff()
        self._conn: SelectConnection | None = None
        self._channel = None
        self._consumer_tag: str | None = None
        self._stopping = False
        self._ioloop = None
        self._current_url = ""

    # -- the shell's three jobs: input -> event -> effects --------------------

    def feed(self, event: c.Event) -> None:
        effects = self.core.handle(event)
        while effects:
            follow_up = self._carry_out(effects.pop(0))
            if follow_up is not None:
                effects = self.core.handle(follow_up) + effects

    def _carry_out(self, effect: c.Effect) -> c.Event | None:
        match effect:
            case c.Apply(policies=policies, revision=revision):
                try:
                    digest = self.backend.apply(policies)
                except BackendError as exc:
                    return c.ApplyResult(self.clock(), False, self.backend.digest, str(exc))
                names = ", ".join(sorted(p["metadata"]["name"] for p in policies)) or "none"
                self.out(f"in force: revision {revision} ({len(policies)} policies: {names})")
                return c.ApplyResult(self.clock(), True, digest)
            case c.Persist(record=record):
                self.cache.store(record)
            case c.Ack(tag=tag):
                if self._channel is not None and self._channel.is_open:
                    self._channel.basic_ack(tag)
            case c.Consume(offset=offset):
                self._start_consuming(offset)
            case c.SendHeartbeat(heartbeat=hb):
                if self._channel is not None and self._channel.is_open:
                    self._channel.basic_publish(
                        topology.TELEMETRY_EXCHANGE,
                        topology.heartbeat_routing_key(self.config.device),
                        hb.encode(),
                        pika.BasicProperties(content_type="application/cbor"),
                    )
            case c.Report(level=level, text=text):
                self.out(text if level == "info" else f"{level}: {text}")
        return None

    # -- start-up -------------------------------------------------------------

    def start_offline(self) -> None:
        """Put the cached policy in force; touches no network."""
        if self.cache.set_aside is not None:
            self.out(f"warning: damaged cache moved to {self.cache.set_aside}; starting empty")
        self.feed(c.Started(self.clock(), self.cache.load()))

    def run(self) -> int:
        self.start_offline()
        self._ioloop = IOLoop()
        self._install_signals()
        self._connect()
        self._ioloop.call_later(TICK_SECONDS, self._tick)
        self._ioloop.start()
        self.cache.close()
        return 0

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._ioloop.add_callback_threadsafe(self.stop))

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.out("stopping")
        if self._conn is not None and not (self._conn.is_closed or self._conn.is_closing):
            self._conn.close()
        else:
            self._ioloop.stop()

    def _tick(self) -> None:
        if self._stopping:
            return
        self.feed(c.Tick(self.clock()))
        self._ioloop.call_later(TICK_SECONDS, self._tick)

    # -- the broker link ------------------------------------------------------

    def _connect(self) -> None:
        if self._stopping:
            return
        url = next(self._nodes)
        self._current_url = url
        try:
            params = parameters(url, name=f"edgeward-agent {self.config.device}")
        except Exception as exc:  # a bad URL is a config error: say it and retry
            self.out(f"bad broker URL {redact(url)}: {exc}")
            self._schedule_reconnect()
            return
        self._conn = SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )

    def _schedule_reconnect(self) -> None:
        delay = self._backoff.next_delay()
        self._ioloop.call_later(delay, self._connect)

    def _on_open(self, conn: SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        # Streams need a per-consumer (not global) prefetch.
        channel.basic_qos(prefetch_count=self.config.prefetch, callback=self._on_qos)

    def _on_qos(self, _frame) -> None:
        self._backoff.reset()
        self.out(f"connected to {redact(self._current_url)}")
        self.feed(c.LinkUp(self.clock()))

    def _start_consuming(self, offset: int | str) -> None:
        assert self._channel is not None
        self._consumer_tag = self._channel.basic_consume(
            topology.POLICY_STREAM,
            self._on_message,
            auto_ack=False,
            arguments={"x-stream-offset": offset},
        )

    def _on_message(self, _channel, method, properties, body: bytes) -> None:
        headers = properties.headers or {}
        offset = headers.get("x-stream-offset")
        if not isinstance(offset, int):
            # Not from a stream: still ours to ack, never to reject.
            self._channel.basic_ack(method.delivery_tag)
            return
        self.feed(c.Delivery(self.clock(), method.delivery_tag, offset, body))

    def _on_open_error(self, _conn, error) -> None:
        self.out(f"broker {redact(self._current_url)} unreachable: {error or 'no answer'}")
        self._conn = None
        if self._stopping:
            self._ioloop.stop()
            return
        self._schedule_reconnect()

    def _on_channel_closed(self, _channel, reason) -> None:
        self._channel = None
        if self._conn is not None and self._conn.is_open and not self._stopping:
            self.out(f"channel closed: {reason}; reconnecting")
            self._conn.close()

    def _on_closed(self, _conn, reason) -> None:
        self._channel = None
        self._conn = None
        if self.core.state.link_up:
            self.feed(c.LinkLost(self.clock(), str(reason)))
        if self._stopping:
            self._ioloop.stop()
            return
        self.out(f"connection to {redact(self._current_url)} lost: {reason}")
        self._schedule_reconnect()


def run_agent(config_path: Path) -> int:
    config = AgentConfig.read(config_path)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    agent = LocalEnforcer(config, out=lambda line: print(f"[{config.device}] {line}", flush=True))
    return agent.run()
