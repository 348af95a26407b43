"""The simulator's Thespian actors.

* :class:`SimulationDirector` — one per run.  Creates a WorkerShard per
  worker process, hands each its slice of the fleet, publishes the signed
  bundles and probes (it timestamps them), scrapes the broker nodes'
  metrics, and folds the shards' reports into the run's data.
* :class:`WorkerShard` — one per worker process, hosting thousands of
  simulated devices in an asyncio loop.  The loop runs in slices of
  ``SLICE`` seconds from ``wakeupAfter``, so Thespian serves messages
  between slices and no thread runs behind its back.
* :class:`TelemetryCounter` — one per edgeward phase, in a process of its
  own: reads the phase's ``edgeward.telemetry`` stream from its first record
  to the end of the phase and counts what reached it (distinct (device, seq),
  and each record's end-to-end latency), in slices like a shard.

Shards may run on other hosts (``simulate --worker-host``): a WorkerShard
can only be made in an actor system that offers :data:`WORKER_CAPABILITY`
(``edgeward simulate-worker`` starts one); the run's own system offers it
unless worker hosts were named, and the director brings those into the run's
convention (see docs/simulator.md).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pika
import pika.exceptions
from thespian.actors import (
    ActorExitRequest,
    ActorSystemConventionUpdate,
    ActorTypeDispatcher,
    WakeupMessage,
)

from edgeward.transport import topology
from edgeward.transport.connection import connect_blocking
from edgeward.transport.errors import BrokerUnreachable
from edgeward.transport.signing import Signer

from . import model
from .shard import Shard, ShardConfig
from .telemetry import StreamTally

SLICE = 0.1
# A zero delay would starve Thespian's socket reads (the wakeup is always
# due, so the transport never selects): resume after a couple of ms instead.
RESUME = timedelta(milliseconds=2)
REPORT_EVERY = 1.0
SCRAPE_EVERY = 2.0
# A self-driven actor whose wakeup is this late is re-armed when the silence
# is noticed (Driven.rearm_if_stalled).
STALL_SECONDS = 5.0
# How often a shard makes sure its director is still there (seconds).
DIRECTOR_CHECK = 10.0
# The telemetry counter: its prefetch and how often it acks (a stream
# consumer gets no more than its prefetch unacknowledged); at the end, it
# reads on until the stream was quiet this long, or the limit passed.
COUNTER_PREFETCH = 2000
COUNTER_ACK_EVERY = 500
COUNTER_RETRY = 2.0
FINISH_QUIET = 1.0
FINISH_LIMIT = 15.0
# How long the director waits for the counter's final count before it ends
# the phase without it.
FINISH_PATIENCE = 30.0

#: The capability of an actor system that hosts shards: the worker host's
#: name (``edgeward simulate-worker``), or True in the run's own system.
WORKER_CAPABILITY = "edgeward-sim-worker"
#: Set by ``edgeward simulate-worker`` to its name: shards report where they ran.
WORKER_ENV = "EDGEWARD_SIM_WORKER"


def worker_name() -> str:
    """Where this process's shard runs: its worker host's name, or this host's."""
    return os.environ.get(WORKER_ENV) or socket.gethostname() + model.OWN_HOST


# -- messages -------------------------------------------------------------------


@dataclass(frozen=True)
class StartPhase:
    mode: str  # "raw" | "edgeward"
    urls: tuple[str, ...]  # device-facing URLs (with the phase's vhost)
    publish_url: str
    configs: tuple[ShardConfig, ...]
    metrics_urls: tuple[tuple[str, str], ...] = ()  # (node, url)
    signing_key_pem: bytes = b""
    started_at: float = 0.0


@dataclass(frozen=True)
class Command:
    kind: str  # cut | restore | churn | node-down | node-up
    arg: Any = None


@dataclass(frozen=True)
class Acked:
    """A shard has taken a command the director must hear back on (node-down)."""

    shard: int
    kind: str


#: Commands the director answers only once every shard has taken them: a
#: node must not stop before its devices' shards know, or its closes would
#: be counted unexpected by a shard deep in a long loop turn.
ACKED_COMMANDS = ("node-down",)


@dataclass(frozen=True)
class PublishRevision:
    revision: int
    policies: tuple[dict, ...]  # the whole fleet state
    changed: tuple[str, ...]
    deleted: tuple[str, ...] = ()
    targeted: int = 0
    selector: dict | None = None  # match labels of the changed policies; None: all devices


@dataclass(frozen=True)
class Probe:
    number: int
    size: int = 5  # bytes of the message body


@dataclass(frozen=True)
class EndPhase:
    pass


@dataclass(frozen=True)
class Progress:
    pass


@dataclass(frozen=True)
class JoinWorkers:
    """Bring these worker hosts' actor systems (``host:port``) into the run's
    convention; answered, as is each later ask, with :class:`WorkersJoined`."""

    hosts: tuple[str, ...]


@dataclass(frozen=True)
class WorkersJoined:
    names: tuple[str, ...]  # the worker hosts that offer shards, by their names


@dataclass(frozen=True)
class ShardReport:
    shard: int
    t: float
    data: dict
    final: dict | None = None


@dataclass(frozen=True)
class CountTelemetry:
    urls: tuple[str, ...]  # the phase's nodes, with its vhost


@dataclass(frozen=True)
class FinishCount:
    pass


@dataclass(frozen=True)
class TelemetryCount:
    counts: dict  # StreamTally.counts()
    latency_ms: dict | None = None  # with the final count: StreamTally.latency_ms()
    errors: dict = field(default_factory=dict)  # connection failures by kind
    final: bool = False


@dataclass
class PhaseResult:
    mode: str
    samples: list = field(default_factory=list)
    broker: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    fanouts: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    unexpected_closes: int = 0
    revisions: list = field(default_factory=list)
    online: list = field(default_factory=list)
    heartbeats: int = 0
    base_rss: int = 0
    notes: list = field(default_factory=list)
    telemetry: dict = field(default_factory=dict)  # the devices' outboxes at the end, summed
    telemetry_stream: TelemetryCount | None = None  # what the counter read
    hosts: dict = field(default_factory=dict)  # worker host -> devices it ran


def fleet_sample(t: float, totals: dict[str, Any]) -> model.FleetSample:
    """The fleet at ``t`` from the director's totals (``_totals``, as a
    progress poll also receives them)."""
    return model.FleetSample(
        t=t,
        connected=totals.get("connected", 0),
        in_sync=totals.get("in_sync", 0),
        online=totals.get("online", 0),
        errors=sum(totals.get("errors", {}).values()),
        deliveries=totals.get("deliveries", 0),
        heartbeats=totals.get("heartbeats", 0),
        client_rss_bytes=totals.get("rss", 0),
        client_cpu_seconds=totals.get("cpu", 0.0),
    )


# -- the worker shard -------------------------------------------------------------


class Driven:
    """An actor that drives itself with ``wakeupAfter``, one wakeup at a time.

    Once, in a 35,000-device run, a shard's wakeup was never delivered: its
    process sat in Thespian's select with no timer, its devices frozen
    mid-ramp, and nothing in any log. So each wakeup carries a generation;
    :meth:`rearm_if_stalled` (called when someone notices the silence: the
    director, for its shards and, on each progress poll, for itself) arms a
    new one, and a late original is then ignored as stale, so the actor
    never runs two chains of wakeups.
    """

    _generation = 0
    _due = 0.0  # monotonic time the armed wakeup is due
    stalls = 0  # wakeups re-armed after a stall

    def arm(self, delay: float | timedelta) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        self._generation += 1
        self._due = time.monotonic() + seconds
        self.wakeupAfter(delay, payload=self._generation)  # type: ignore[attr-defined]

    def current(self, msg: WakeupMessage) -> bool:
        """Whether ``msg`` is the armed wakeup (not one a re-arm replaced)."""
        return msg.payload == self._generation

    def rearm_if_stalled(self, delay: float | timedelta) -> bool:
        if self._due and time.monotonic() - self._due > STALL_SECONDS:
            self.stalls += 1
            self.arm(delay)
            return True
        return False


class WorkerShard(Driven, ActorTypeDispatcher):
    @staticmethod
    def actorSystemCapabilityCheck(capabilities: dict, requirements: dict) -> bool:
        # Only where shards are offered: a worker host's system, or the run's
        # own when no worker host was named.
        return bool(capabilities.get(WORKER_CAPABILITY))

    def __init__(self) -> None:
        super().__init__()
        self.shard: Shard | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.director: Any = None
        self.number = 0
        self.next_report = 0.0
        self.stopping_until: float | None = None
        self.slowest = 0.0  # the longest loop slice since the last report (s)
        # Only on a worker host is the director not this process's parent.
        self.on_worker_host = WORKER_ENV in os.environ
        self.next_director_check = 0.0
        self.director_misses = 0  # the director's socket unreachable, times running

    def receiveMsg_tuple(self, msg: tuple, sender: Any) -> None:
        number, config = msg
        self.number, self.director = number, sender
        self.parent_pid = os.getppid()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.shard = Shard(config, self.loop)
        self.shard.start()
        self.next_report = time.monotonic() + REPORT_EVERY
        self.arm(RESUME)

    def receiveMsg_Command(self, msg: Command, sender: Any) -> None:
        shard = self.shard
        if shard is None:
            if msg.kind in ACKED_COMMANDS:
                self.send(sender, Acked(self.number, msg.kind))
            return
        if msg.kind == "cut":
            shard.cut()
        elif msg.kind == "restore":
            shard.restore()
        elif msg.kind == "churn":
            shard.start_churn()
        elif msg.kind == "quiet":
            shard.stop_alerts()
        elif msg.kind == "latest":
            shard.set_latest(*msg.arg)
        elif msg.kind == "node-down":
            shard.down_nodes.add(msg.arg)
        elif msg.kind == "node-up":
            shard.down_nodes.discard(msg.arg)
        elif msg.kind == "nudge":
            # The director has not heard from this shard for a while.
            if self.rearm_if_stalled(RESUME):
                shard.errors["shard_stalled"] += 1
        if msg.kind in ACKED_COMMANDS:
            self.send(sender, Acked(self.number, msg.kind))

    def receiveMsg_EndPhase(self, msg: EndPhase, sender: Any) -> None:
        if self.shard is not None and self.stopping_until is None:
            # who was meant to be online, before stopping; and where it ran
            self.final = {**self.shard.final(), "host": worker_name()}
            self.shard.stop()
            self.stopping_until = time.monotonic() + 10.0

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if self.loop is None or self.shard is None or not self.current(msg):
            return
        if os.getppid() != self.parent_pid or self._director_gone():
            # The director's process is gone (killed): do not run on alone.
            self.shard.stop()
            self.loop.run_until_complete(asyncio.sleep(1.0))
            os._exit(0)
        began = time.monotonic()
        self.loop.run_until_complete(asyncio.sleep(SLICE))
        now = time.monotonic()
        # One asyncio turn runs every ready callback (5,000 deliveries at
        # once): on an overloaded machine a slice can last many seconds.
        self.slowest = max(self.slowest, now - began)
        if self.stopping_until is not None:
            closed = not any(link.conn is not None for link in self.shard.links)
            if closed or now >= self.stopping_until:
                self.send(
                    self.director,
                    ShardReport(self.number, time.time(), self.shard.snapshot(), final=self.final),
                )
                self.shard = None
                return
        elif now >= self.next_report:
            self.next_report = now + REPORT_EVERY
            snapshot = self.shard.snapshot()
            snapshot["slowest_turn_s"] = round(self.slowest, 3)
            self.slowest = 0.0
            self.send(self.director, ShardReport(self.number, time.time(), snapshot))
        self.arm(RESUME)

    def _director_gone(self) -> bool:
        """Whether the director's process has gone, looked at every
        ``DIRECTOR_CHECK`` seconds. Locally the parent process tells (the
        director forked this one); on a worker host the parent is that
        host's admin, and Thespian keeps undeliverable reports to itself: so
        ask the director's own socket. Refused, or unreachable three times
        running: gone."""
        now = time.monotonic()
        if not self.on_worker_host or now < self.next_director_check:
            return False
        self.next_director_check = now + DIRECTOR_CHECK
        try:
            address = self.director.addressDetails.connectArgs[0]
        except (AttributeError, IndexError, TypeError):
            return False  # not a TCP address (a test's): nothing to ask
        try:
            socket.create_connection(address, timeout=2.0).close()
            self.director_misses = 0
        except ConnectionRefusedError:
            return True
        except OSError:
            self.director_misses += 1
        return self.director_misses >= 3

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        if self.loop is not None:
            self.loop.close()


# -- the telemetry counter ----------------------------------------------------------


class TelemetryCounter(ActorTypeDispatcher):
    """Reads the phase's telemetry stream from its start and tallies it.

    Each message is stamped with the time it was read, in the callback pika
    dispatches as it reads the socket (the loop runs in slices of ``SLICE``
    blocking in pika's own select), and counted by :class:`StreamTally`.
    A lost connection is reopened on any node, from the offset after the
    last one read; repeats are deduplicated anyway.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tally = StreamTally()
        self.urls: list[str] = []
        self.director: Any = None
        self.conn: Any = None
        self.offset: int | str = "first"
        self.unacked = 0
        self.retry_at = 0.0
        self.next_report = 0.0
        self.last_read = 0.0
        self.finish_by: float | None = None
        self.finish_to: Any = None
        self.errors: Counter[str] = Counter()

    def receiveMsg_CountTelemetry(self, msg: CountTelemetry, sender: Any) -> None:
        self.urls, self.director = list(msg.urls), sender
        self.parent_pid = os.getppid()
        self._connect()
        self.next_report = time.monotonic() + REPORT_EVERY
        self.wakeupAfter(RESUME)

    def _connect(self) -> None:
        try:
            conn = connect_blocking(self.urls, name="edgeward-sim-telemetry-counter")
            channel = conn.channel()
            channel.basic_qos(prefetch_count=COUNTER_PREFETCH)
            channel.basic_consume(
                topology.TELEMETRY_STREAM,
                self._on_message,
                arguments={"x-stream-offset": self.offset},
            )
        except (BrokerUnreachable, pika.exceptions.AMQPError, OSError) as exc:
            self.errors[type(exc).__name__] += 1
            self.retry_at = time.monotonic() + COUNTER_RETRY
            return
        self.conn = conn
        self.unacked = 0

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        now = time.time()
        offset = (properties.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self.offset = offset + 1
        self.tally.add(body, now, properties.user_id)
        self.last_read = time.monotonic()
        self.unacked += 1
        if self.unacked >= COUNTER_ACK_EVERY:
            channel.basic_ack(method.delivery_tag, multiple=True)
            self.unacked = 0

    def receiveMsg_FinishCount(self, msg: FinishCount, sender: Any) -> None:
        now = time.monotonic()
        self.finish_to = sender
        self.finish_by = now + FINISH_LIMIT
        self.last_read = now  # read at least FINISH_QUIET more

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if self.director is None:
            return
        if os.getppid() != self.parent_pid:
            os._exit(0)  # the director's process is gone
        if self.conn is None:
            if time.monotonic() >= self.retry_at:
                self._connect()
            else:
                time.sleep(SLICE)
        else:
            try:
                self.conn.process_data_events(time_limit=SLICE)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.errors[type(exc).__name__] += 1
                self._close()
        now = time.monotonic()
        if self.finish_by is not None:
            if now - self.last_read >= FINISH_QUIET or now >= self.finish_by:
                self._close()
                self.send(
                    self.finish_to,
                    TelemetryCount(
                        self.tally.counts(),
                        latency_ms=self.tally.latency_ms(),
                        errors=dict(self.errors),
                        final=True,
                    ),
                )
                self.director = None
                return
        elif now >= self.next_report:
            self.next_report = now + REPORT_EVERY
            self.send(self.director, TelemetryCount(self.tally.counts(), errors=dict(self.errors)))
        self.wakeupAfter(RESUME)

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


# -- the director -------------------------------------------------------------------


class SimulationDirector(Driven, ActorTypeDispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.phase: StartPhase | None = None
        self.result: PhaseResult | None = None
        self.shards: list[Any] = []
        self.last: dict[int, dict] = {}
        self.finals: dict[int, dict] = {}
        self.reported_at: dict[int, float] = {}  # shard -> monotonic time of its last report
        self.nudged: set[int] = set()  # shards nudged that have not reported since
        self.rollouts: dict[int, model.Rollout] = {}
        self.fanouts: dict[int, list[float]] = {}
        self.publish_conn: Any = None
        self.signer: Signer | None = None
        self.next_sample = 0.0
        self.scraper: Any = None  # a NodeScraper while a phase runs
        self.waiting_end: Any = None
        self.probes_sent: dict[int, float] = {}
        self.counter: Any = None  # the phase's TelemetryCounter (edgeward phase)
        self.counted: TelemetryCount | None = None  # its latest count
        self.counted_final: TelemetryCount | None = None
        self.count_deadline: float | None = None
        self.worker_hosts: dict[str, str] = {}  # admin address -> name, of those joined
        # A command answered once every shard took it: (asker, kind, shards waited for).
        self.acking: tuple[Any, str, set[int]] | None = None

    def _t(self, when: float | None = None) -> float:
        assert self.phase is not None
        return (when or time.time()) - self.phase.started_at

    def receiveMsg_StartPhase(self, msg: StartPhase, sender: Any) -> None:
        self.phase = msg
        self.result = PhaseResult(mode=msg.mode)
        self.last, self.finals, self.rollouts, self.fanouts = {}, {}, {}, {}
        if msg.signing_key_pem:
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_private_key(msg.signing_key_pem, password=None)
            self.signer = Signer(key)  # type: ignore[arg-type]
        self._stop_scraper(keep=False)  # a phase that never finished: not this one's
        if msg.metrics_urls:
            from .metrics import NodeScraper

            # The idle broker, before any device connects, then every few
            # seconds on the scraper's thread (a node under load can take
            # seconds to answer: not on this loop, which answers progress).
            self.scraper = NodeScraper(msg.metrics_urls, SCRAPE_EVERY)
            self._keep(self.scraper.once())
            self.scraper.start()
        self.shards = []
        self.counter, self.counted, self.counted_final = None, None, None
        self.count_deadline = None
        if msg.mode == "edgeward":
            # Reading from the stream's start before any device connects.
            self.counter = self.createActor(TelemetryCounter)
            self.send(self.counter, CountTelemetry(msg.urls))
        for number, config in enumerate(msg.configs):
            shard = self.createActor(WorkerShard)
            self.shards.append(shard)
            self.send(shard, (number, config))
        self.next_sample = time.monotonic() + REPORT_EVERY
        self.reported_at = dict.fromkeys(range(len(self.shards)), time.monotonic())
        self.nudged = set()
        self.arm(0.5)
        self.send(sender, {"started": len(self.shards)})

    def receiveMsg_Command(self, msg: Command, sender: Any) -> None:
        for shard in self.shards:
            self.send(shard, msg)
        if msg.kind in ACKED_COMMANDS and self.shards:
            self.acking = (sender, msg.kind, set(range(len(self.shards))))
            return
        self.send(sender, {"ok": True})

    def receiveMsg_Acked(self, msg: Acked, sender: Any) -> None:
        if self.acking is None or self.acking[1] != msg.kind:
            return
        asker, kind, waiting = self.acking
        waiting.discard(msg.shard)
        if not waiting:
            self.acking = None
            self.send(asker, {"ok": True, "acked": kind})

    # -- worker hosts --------------------------------------------------------------

    def receiveMsg_JoinWorkers(self, msg: JoinWorkers, sender: Any) -> None:
        if msg.hosts:
            # The run's system invites them (they need not know it), and tells
            # this actor of each that answers, with the capabilities it offers.
            self.notifyOnSystemRegistrationChanges(True)
            for host in msg.hosts:
                self.preRegisterRemoteSystem(host, {})
        self.send(sender, WorkersJoined(tuple(sorted(self.worker_hosts.values()))))

    def receiveMsg_ActorSystemConventionUpdate(
        self, msg: ActorSystemConventionUpdate, sender: Any
    ) -> None:
        name = (msg.remoteCapabilities or {}).get(WORKER_CAPABILITY)
        address = str(msg.remoteAdminAddress)
        if msg.remoteAdded and name:
            self.worker_hosts[address] = str(name)
        else:
            self.worker_hosts.pop(address, None)

    # -- publishing --------------------------------------------------------------

    def _publish(self, body: bytes, headers: dict) -> float:
        assert self.phase is not None
        for attempt in range(3):
            try:
                if self.publish_conn is None or not self.publish_conn.is_open:
                    self.publish_conn = connect_blocking(
                        [self.phase.publish_url], name="edgeward-sim-director"
                    )
                    self.publish_channel = self.publish_conn.channel()
                    self.publish_channel.confirm_delivery()
                sent = time.time()
                # AMQP tables have no floats: microseconds as an integer.
                headers = {**headers, "published_us": int(sent * 1e6)}
                self.publish_channel.basic_publish(
                    topology.POLICY_EXCHANGE,
                    "",
                    body,
                    pika.BasicProperties(
                        content_type="application/cbor", delivery_mode=2, headers=headers
                    ),
                )
                return sent
            except (pika.exceptions.AMQPError, OSError):
                self.publish_conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def receiveMsg_PublishRevision(self, msg: PublishRevision, sender: Any) -> None:
        assert self.signer is not None and self.result is not None
        from .run import delta_bundle

        by_name = {p["metadata"]["name"]: p for p in msg.policies}
        bundle = delta_bundle(msg.revision, by_name, msg.changed, msg.deleted)
        body = self.signer.sign(bundle).encode()
        sent = self._publish(body, {"revision": msg.revision})
        self.rollouts[msg.revision] = model.Rollout(
            revision=msg.revision,
            t=self._t(sent),
            targeted=msg.targeted,
            online_at_publish=0,  # the shards count their targeted devices online now
        )
        for shard in self.shards:
            self.send(shard, Command("latest", (msg.revision, msg.selector)))
        self.send(sender, {"published": msg.revision, "t": self._t(sent), "bytes": len(body)})

    def receiveMsg_Probe(self, msg: Probe, sender: Any) -> None:
        body = b"probe".ljust(max(5, msg.size), b"\0")
        sent = self._publish(body, {"probe": msg.number})
        self.probes_sent[msg.number] = sent
        self.fanouts.setdefault(msg.number, [])
        self.send(sender, {"probe": msg.number})

    # -- reports --------------------------------------------------------------------

    def receiveMsg_ShardReport(self, msg: ShardReport, sender: Any) -> None:
        self.last[msg.shard] = msg.data
        self.reported_at[msg.shard] = time.monotonic()
        self.nudged.discard(msg.shard)
        for revision, latency, late in msg.data.get("applies", ()):
            rollout = self.rollouts.get(revision)
            if rollout is not None:
                (rollout.late if late else rollout.latencies).append(latency)
        for revision, (count, seconds) in msg.data.get("processing", {}).items():
            rollout = self.rollouts.get(revision)
            if rollout is not None:
                rollout.processed += int(count)
                rollout.processing_seconds += seconds
        for revision, count in msg.data.get("targeted_online", {}).items():
            if revision in self.rollouts:
                self.rollouts[revision].online_at_publish += count
        for probe, latency in msg.data.get("receipts", ()):
            self.fanouts.setdefault(probe, []).append(latency)
        if msg.final is not None:
            self.finals[msg.shard] = msg.final
            self._maybe_finish()

    def receiveMsg_TelemetryCount(self, msg: TelemetryCount, sender: Any) -> None:
        if msg.final:
            self.counted_final = msg
            self._maybe_finish()
        else:
            self.counted = msg

    def _telemetry(self) -> dict[str, Any]:
        """The shards' outboxes summed, and what the counter read so far."""
        out: dict[str, Any] = {}
        for d in self.last.values():
            for key, n in d.get("telemetry", {}).items():
                out[key] = out.get(key, 0) + n
        if self.counter is not None:
            counted = self.counted_final or self.counted
            out["received"] = counted.counts.get("received", 0) if counted else 0
        return out

    def _totals(self) -> dict[str, Any]:
        keys = (
            "devices",
            "connected",
            "online",
            "in_sync",
            "deliveries",
            "heartbeats",
            "rss",
            "base_rss",
            "unexpected_closes",
        )
        totals: dict[str, Any] = {k: sum(d.get(k, 0) for d in self.last.values()) for k in keys}
        totals["cpu"] = sum(d.get("cpu", 0.0) for d in self.last.values())
        errors: dict[str, int] = {}
        for d in self.last.values():
            for kind, n in d.get("errors", {}).items():
                errors[kind] = errors.get(kind, 0) + n
        totals["errors"] = errors
        totals["telemetry"] = self._telemetry()
        totals["slowest_turn_s"] = max(
            (d.get("slowest_turn_s", 0.0) for d in self.last.values()), default=0.0
        )
        return totals

    def receiveMsg_Progress(self, msg: Progress, sender: Any) -> None:
        if self.phase is not None:
            self.rearm_if_stalled(0.25)
        totals = self._totals()
        totals["shards_reporting"] = len(self.last)
        totals["rollouts"] = {
            r: {
                "latencies": len(x.latencies),
                "late": len(x.late),
                "targeted": x.targeted,
                "online_at_publish": x.online_at_publish,
            }
            for r, x in self.rollouts.items()
        }
        totals["probes"] = {p: len(v) for p, v in self.fanouts.items()}
        self.send(sender, totals)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if self.phase is None or self.result is None or not self.current(msg):
            return
        now = time.monotonic()
        for number, shard in enumerate(self.shards):
            if (
                number not in self.finals
                and number not in self.nudged
                and now - self.reported_at[number] > STALL_SECONDS
            ):
                # One nudge per silence, however long: a shard busy in a long
                # loop turn acknowledges nothing, and Thespian holds at most
                # 20 unacknowledged sends per actor before queueing the rest
                # (answers to progress polls among them) behind them.
                self.nudged.add(number)
                self.send(shard, Command("nudge"))
        # Once shards report their final counts the fleet is stopping (and
        # may wait on the telemetry counter): that is no sample of it running.
        if now >= self.next_sample and self.last and not self.finals:
            self.next_sample = now + REPORT_EVERY
            t = self._totals()
            self.result.samples.append(fleet_sample(self._t(), t))
        if self.scraper is not None:
            self._keep(self.scraper.take())
        if self.publish_conn is not None and self.publish_conn.is_open:
            try:
                self.publish_conn.process_data_events(time_limit=0)
            except (pika.exceptions.AMQPError, OSError):
                self.publish_conn = None
        if self.count_deadline is not None and now >= self.count_deadline:
            # The counter did not answer: end the phase with its last count.
            self.counted_final = TelemetryCount(
                self.counted.counts if self.counted else {},
                errors={"counter_did_not_answer": 1},
                final=True,
            )
            self._maybe_finish()
            if self.phase is None:
                return
        self.arm(0.25)

    def _keep(self, samples: list[tuple[float, str, dict[str, float]]]) -> None:
        assert self.phase is not None and self.result is not None
        for when, node, m in samples:
            self.result.broker.append(
                model.BrokerSample(
                    t=self._t(when),
                    node=node,
                    memory_bytes=m.get("memory_bytes", 0.0),
                    fds=m.get("fds", 0.0),
                    erlang_processes=m.get("erlang_processes", 0.0),
                    connections=m.get("connections", 0.0),
                    messages_in_total=m.get("messages_in_total", 0.0),
                    messages_out_total=m.get("messages_out_total", 0.0),
                    cpu_seconds=m.get("cpu_seconds", 0.0),
                )
            )

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._stop_scraper(keep=False)

    def _stop_scraper(self, keep: bool = True) -> None:
        if self.scraper is not None:
            left = self.scraper.stop()
            if keep and self.phase is not None and self.result is not None:
                self._keep(left)
            self.scraper = None

    def receiveMsg_EndPhase(self, msg: EndPhase, sender: Any) -> None:
        self.waiting_end = sender
        for shard in self.shards:
            self.send(shard, msg)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.waiting_end is None or len(self.finals) < len(self.shards):
            return
        if self.counter is not None and self.counted_final is None:
            # Every device has stopped: the counter reads what is left, then answers.
            if self.count_deadline is None:
                self.count_deadline = time.monotonic() + FINISH_PATIENCE
                self.send(self.counter, FinishCount())
            return
        assert self.result is not None
        self._stop_scraper()
        totals = self._totals()
        r = self.result
        r.errors = totals["errors"]
        r.unexpected_closes = totals["unexpected_closes"]
        r.heartbeats = totals["heartbeats"]
        r.base_rss = totals["base_rss"]
        r.rollouts = [self.rollouts[k] for k in sorted(self.rollouts)]
        r.fanouts = [[lat for lat in self.fanouts[k]] for k in sorted(self.fanouts)]
        for number in sorted(self.finals):
            final = self.finals[number]
            r.revisions.extend(final["revisions"])
            r.online.extend(final["online"])
            host = final.get("host", "?")
            r.hosts[host] = r.hosts.get(host, 0) + len(final["revisions"])
        r.telemetry = self._telemetry()
        r.telemetry_stream = self.counted_final
        for shard in self.shards:
            self.send(shard, ActorExitRequest())
        self.shards = []
        if self.counter is not None:
            self.send(self.counter, ActorExitRequest())
            self.counter, self.count_deadline = None, None
        if self.publish_conn is not None:
            try:
                self.publish_conn.close()
            except Exception:
                pass
            self.publish_conn = None
        sender, self.waiting_end = self.waiting_end, None
        self.send(sender, r)
        self.phase = None
