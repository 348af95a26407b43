"""A shard of the simulated fleet: thousands of devices in one asyncio loop.

Each :class:`SimDevice` is the real :class:`~edgeward.actors.shell.AgentShell`
around the real agent core, with the ``builtin`` backend and an in-memory
cache; each has its own AMQP connection (pika ``AsyncioConnection``), or
shares one with ``share`` others.  Like the agent it keeps a telemetry outbox
(in memory, see ``telemetry.py``), drained by the agent's own sender over its
one channel, switched to confirm mode; it raises alerts at the
scenario's rate.  :class:`RawDevice` is the broker floor: the same
connection and stream consumer, but it only acks.

With a run secret (``ShardConfig.login_secret``) each connection logs in as
its device's own broker user (:class:`DeviceLink`; ``simulator/logins.py``
makes the users), and a :class:`SimDevice` stamps that login as ``user_id``
on its heartbeats and telemetry, as the agent does; without one, every
connection uses the URLs' login (shared connections always do).

The :class:`Shard` knows nothing of Thespian: the WorkerShard actor drives
its loop in slices, and tests can drive it directly.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pika

from edgeward.actors import core as c
from edgeward.actors.outbox import DEFAULT_MAX_RECORDS, Sender
from edgeward.actors.shell import AgentShell, Link, MemoryCache, SendsTelemetry
from edgeward.enforcement.evaluator import Event
from edgeward.enforcement.selector import selects
from edgeward.transport import topology
from edgeward.transport.connection import Backoff, quiet_pika
from edgeward.transport.signing import CachingVerifier, Verifier

from .lean import LeanConnection
from .logins import device_password
from .scenario import device_name
from .telemetry import ALERT_EVENT, MemoryOutbox, SimBackend, agent_default

PAGE = os.sysconf("SC_PAGE_SIZE")


def host_port(url: str) -> str:
    """``host:port`` of an AMQP URL (redacted or not): which node it names."""
    try:
        parts = urllib.parse.urlsplit(url)
        return f"{parts.hostname}:{parts.port or 5672}"
    except ValueError:
        return url


@dataclass
class ShardConfig:
    first: int  # index of the shard's first device
    labels: list[dict[str, str]]  # one per device
    urls: list[str]
    mode: str  # "edgeward" | "raw"
    # How raw devices receive: "stream" (a stream consumer each, like the
    # agent) or "queue" (an exclusive classic queue each, bound to the policy
    # exchange: the design's cheaper alternative, measured for comparison).
    delivery: str = "stream"
    trusted_keys: dict[str, str] = field(default_factory=dict)
    verify: str = "every"
    share: int = 1  # devices per connection
    heartbeat_interval: float = 10.0
    ramp_rate: float = 100.0  # connections per second for this shard
    offline_fraction: float = 0.0
    mean_offline: float = 30.0
    # Devices that come back together (``restore``) spread their first
    # attempt over this many seconds, like agents whose uplink returns.
    reconnect_spread: float = 0.0
    seed: int = 0
    # Telemetry (edgeward mode): each device keeps an outbox drained over its
    # channel in confirm mode, as the agent does; it raises ``alert_rate`` alerts per
    # second (Poisson) while its policies block ALERT_EVENT.
    telemetry: bool = True
    alert_rate: float = 0.0
    outbox_max_records: int = DEFAULT_MAX_RECORDS
    # The run's secret: each device logs in as its own broker user, with the
    # password derived from it (logins.device_password). Empty: the URLs'
    # login for every device. Needs share == 1 (a connection is one user).
    login_secret: bytes = b""


class DeviceLink(Link):
    """A link that logs in as its one device: the user is the device's name,
    the password is derived from the run's secret at each connect and kept
    only in the parameters pika holds for the connection."""

    def login(self) -> pika.PlainCredentials:
        shell = self.shells[0]
        secret = shell.shard.config.login_secret
        return pika.PlainCredentials(shell.device, device_password(secret, shell.device))


class SimDevice(SendsTelemetry, AgentShell):
    """One simulated device: the agent's shell, core, builtin backend and, as
    the agent does, a telemetry outbox drained over its one channel."""

    def __init__(
        self, shard: Shard, index: int, core: c.AgentCore, outbox: MemoryOutbox | None = None
    ) -> None:
        super().__init__(core, SimBackend(), MemoryCache())
        self.shard = shard
        self.index = index
        self.online_since = 0.0
        self.sender: Sender | None = None
        if shard.config.login_secret:
            # Logged in as itself: stamped on what it publishes, as the agent does.
            self.user_id = self.device
        if outbox is not None:
            # The agent's outbox settings and sender, on the shard's loop; one
            # random source per shard (a Random each would cost 2.5 KB a device).
            self.outbox = outbox
            self.sender = Sender(
                outbox,
                shard.loop,
                window=agent_default("telemetry_window"),
                rate=agent_default("telemetry_rate"),
                jitter=agent_default("telemetry_drain_jitter_s"),
                rng=shard.rng,
                clock=time.monotonic,
                user_id=self.user_id,
            )
            # Publish-to-confirm times go out in heartbeats, where the sender keeps them.
            self.confirm_latency = getattr(self.sender, "latency", None)

    @property
    def ioloop(self) -> asyncio.AbstractEventLoop:
        return self.shard.loop

    def put_in_force(self, policies: Sequence[Any], digest: str, revision: int) -> str:
        # As the agent does: alerts name the revision in force.
        return self.backend.apply(policies, digest, revision=revision)

    def applied(self, revision: int, policies: Sequence[Any]) -> None:
        self.shard.record_apply(self, revision)

    # -- telemetry, as the agent keeps it -------------------------------------------

    def judge(self, event: Event) -> None:
        """One event seen on the device (as the agent judges ``--events-from``
        lines): an alert in the outbox if the policies in force audit or block it."""
        backend: SimBackend = self.backend  # type: ignore[assignment]
        decision = backend.evaluate(event)
        if decision.action in ("Audit", "Block") and self.outbox is not None:
            self.outbox.accept("alert", backend.alert(event, decision), self.clock())
            self.shard.alerts += 1

    def tick(self) -> None:
        super().tick()
        if self.sender is not None and self.sender.draining:
            self._report_drops()

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        started = time.thread_time()  # CPU, not wall: other processes share the cores
        self.shard.note_publish(properties.headers)
        super()._on_message(channel, method, properties, body)
        self.shard.note_processing(properties.headers, time.thread_time() - started)


class RawDevice:
    """Same connection and stream consumer as a device; only acks."""

    def __init__(self, shard: Shard, index: int) -> None:
        self.shard = shard
        self.index = index
        self.device = device_name(index)
        self.channel: Any = None
        self.online_since = 0.0
        self.deliveries = 0
        self.heartbeats = 0

    def attach(self, channel: Any, prefetch: int) -> None:
        self.channel = channel
        channel.basic_qos(prefetch_count=prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: Any) -> None:
        if self.shard.config.delivery == "queue":
            self.channel.queue_declare("", exclusive=True, callback=self._on_queue)
            return
        self.channel.basic_consume(
            topology.POLICY_STREAM, self._on_message, arguments={"x-stream-offset": "next"}
        )

    def _on_queue(self, frame: Any) -> None:
        queue = frame.method.queue
        self.channel.queue_bind(
            queue,
            topology.POLICY_EXCHANGE,
            callback=lambda _f: self.channel.basic_consume(queue, self._on_message),
        )

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        self.deliveries += 1
        headers = properties.headers or {}
        sent = headers.get("published_us")
        if isinstance(sent, int):
            self.shard.receipts.append((int(headers.get("probe", 0)), time.time() - sent / 1e6))

    def detach(self, reason: str) -> None:
        self.channel = None

    def tick(self) -> None:
        pass


class Shard:
    def __init__(self, config: ShardConfig, loop: asyncio.AbstractEventLoop) -> None:
        # Links count and classify every failure; pika's own log would repeat
        # each one for thousands of devices.
        quiet_pika()
        self.base_rss = self._rss()
        self.config = config
        self.loop = loop
        self.rng = random.Random(config.seed)
        verifier: Verifier | None = None
        if config.mode == "edgeward":
            cls = CachingVerifier if config.verify == "cached" else Verifier
            verifier = cls(config.trusted_keys)
        self.devices: list[SimDevice | RawDevice] = []
        # One copy of identical policies, fleet states and bundle bytes per
        # worker: every device still decodes and verifies its own bundle, but
        # 5,000 devices do not keep 5,000 copies of the same state.
        self.shared = c.SharedState()
        for i, labels in enumerate(config.labels):
            index = config.first + i
            if config.mode == "raw":
                self.devices.append(RawDevice(self, index))
            else:
                telemetry = config.telemetry
                core = c.AgentCore(
                    device_name(index),
                    labels,
                    verifier,  # type: ignore[arg-type]
                    heartbeat_interval=config.heartbeat_interval,
                    shared=self.shared,
                    records=telemetry,
                )
                outbox = (
                    MemoryOutbox(core.device, max_records=config.outbox_max_records)
                    if telemetry
                    else None
                )
                self.devices.append(SimDevice(self, index, core, outbox))
        self.links: list[Link] = []
        group = max(1, config.share)
        if config.login_secret and group > 1:
            raise ValueError("per-device logins need a connection per device (share = 1)")
        link_class = DeviceLink if config.login_secret else Link
        for start in range(0, len(self.devices), group):
            members = self.devices[start : start + group]
            index = members[0].index
            self.links.append(
                link := link_class(
                    members,
                    config.urls,
                    LeanConnection,
                    loop,
                    name=f"edgeward-sim {device_name(index)}",
                    heartbeat=60,
                    timeout=30,
                    on_event=self._on_link_event,
                    backoff=Backoff(
                        base=1.0, cap=30.0, rng=self.rng, spread=config.reconnect_spread
                    ),
                    first_node=index,
                )
            )
            for member in members:
                member.link = link
        self.errors: Counter[str] = Counter()
        self.unexpected_closes = 0
        self.applies: list[tuple[int, float, bool]] = []  # (revision, latency s, late)
        self.receipts: list[tuple[int, float]] = []  # raw probes: (probe, latency s)
        self.published: dict[int, float] = {}
        self.processing: dict[int, list[float]] = {}  # revision -> [deliveries, seconds]
        self.latest = 0
        self.targeted_online: dict[int, int] = {}  # revision -> targeted devices online
        self.down_nodes: set[str] = set()
        self._offline: dict[int, asyncio.TimerHandle] = {}  # link index -> return timer
        self._ramp_task: asyncio.Task | None = None
        self._churn_task: asyncio.Task | None = None
        # Alerts: one Poisson process per device, drawn as their sum (below).
        self.alert_rng = random.Random(f"alerts-{config.seed}")
        self.alerts = 0  # alert records devices put in their outboxes
        self._alert_timer: asyncio.TimerHandle | None = None
        self._alerting: list[SimDevice] = []
        self._next_alert = 0.0  # loop time of the next alert
        self.cpu0 = self._cpu()
        # Thousands of long-lived devices: keep the collector off them.
        gc.collect()
        gc.freeze()

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        for device in self.devices:
            if isinstance(device, SimDevice):
                device.start()
        self._ramp_task = self.loop.create_task(self._ramp())
        self.loop.call_later(1.0, self._tick)
        self.start_alerts()

    async def _ramp(self) -> None:
        interval = 1.0 / self.config.ramp_rate if self.config.ramp_rate > 0 else 0.0
        started = time.monotonic()
        for n, link in enumerate(self.links):
            link.start()
            for shell in link.shells:
                shell.online_since = time.time()
            due = started + (n + 1) * interval * max(1, self.config.share)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    def _tick(self) -> None:
        for device in self.devices:
            device.tick()
        self.loop.call_later(1.0, self._tick)

    # -- alerts --------------------------------------------------------------------

    def start_alerts(self) -> None:
        """Each device raises alerts at ``alert_rate`` per second, a Poisson
        process of its own, online or not (an offline device's alerts wait in
        its outbox).

        n independent Poisson processes of rate r are, together, one of rate
        n*r whose every event belongs to a device drawn uniformly: drawn that
        way, the shard needs one timer instead of one per device.
        """
        devices = [d for d in self.devices if isinstance(d, SimDevice) and d.outbox is not None]
        rate = self.config.alert_rate * len(devices)
        if rate <= 0 or self._alert_timer is not None:
            return
        self._alerting = devices
        self._next_alert = self.loop.time() + self.alert_rng.expovariate(rate)
        self._alert_timer = self.loop.call_at(self._next_alert, self._alert)

    def _alert(self) -> None:
        devices = self._alerting
        rate = self.config.alert_rate * len(devices)
        now = self.loop.time()
        while self._next_alert <= now:
            devices[self.alert_rng.randrange(len(devices))].judge(ALERT_EVENT)
            self._next_alert += self.alert_rng.expovariate(rate)
        self._alert_timer = self.loop.call_at(self._next_alert, self._alert)

    def stop_alerts(self) -> None:
        """No more alerts (the run is ending: what was raised may drain)."""
        if self._alert_timer is not None:
            self._alert_timer.cancel()
            self._alert_timer = None

    def start_churn(self) -> None:
        if self.config.offline_fraction > 0 and self._churn_task is None:
            self._churn_task = self.loop.create_task(self._churn())

    async def _churn(self) -> None:
        """Each second, links leave at a rate that keeps the offline fraction."""
        f, mean_off = self.config.offline_fraction, self.config.mean_offline
        mean_on = mean_off * (1 - f) / f
        while True:
            await asyncio.sleep(1.0)
            p_leave = 1 - math.exp(-1.0 / mean_on)
            for i, link in enumerate(self.links):
                if i in self._offline or not link.wanted:
                    continue
                if self.rng.random() < p_leave:
                    link.cut()
                    back = self.rng.expovariate(1.0 / mean_off)
                    self._offline[i] = self.loop.call_later(back, self._return, i)

    def _return(self, i: int) -> None:
        self._offline.pop(i, None)
        link = self.links[i]
        for shell in link.shells:
            shell.online_since = time.time()
        link.start()

    def cut(self) -> None:
        if self._churn_task is not None:
            self._churn_task.cancel()
            self._churn_task = None
        for handle in self._offline.values():
            handle.cancel()
        self._offline.clear()
        if self._ramp_task is not None:
            self._ramp_task.cancel()
        for link in self.links:
            link.cut()

    def restore(self) -> None:
        now = time.time()
        for link in self.links:
            if not link.wanted:
                for shell in link.shells:
                    shell.online_since = now
                link.start(spread=True)

    def stop(self) -> None:
        self.stop_alerts()
        self.cut()
        for link in self.links:
            link.stopped = True

    def set_latest(self, revision: int, selector: dict[str, str] | None) -> None:
        """A revision was published; count the targeted devices online now."""
        self.latest = revision
        self.targeted_online[revision] = sum(
            1
            for d, labels in zip(self.devices, self.config.labels, strict=True)
            if d.link.wanted and (selector is None or selects(selector, d.device, labels))
        )

    # -- what devices tell the shard ------------------------------------------------

    def note_publish(self, headers: dict | None) -> None:
        if headers and "revision" in headers and "published_us" in headers:
            self.published.setdefault(int(headers["revision"]), headers["published_us"] / 1e6)

    def note_processing(self, headers: dict | None, seconds: float) -> None:
        revision = (headers or {}).get("revision")
        if isinstance(revision, int):
            entry = self.processing.setdefault(revision, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    def record_apply(self, device: SimDevice, revision: int) -> None:
        sent = self.published.get(revision)
        if sent is None:
            return  # the cached set at start, or a revision published before the run
        self.applies.append((revision, time.time() - sent, device.online_since > sent))

    def _on_link_event(self, kind: str, detail: str) -> None:
        if kind in ("connected", "closed"):
            return
        if kind.startswith("lost:"):
            # detail is "<redacted URL>: <reason>"; the URL names the run's
            # vhost, the down node's URL the node: compare host and port.
            lost_on = host_port(detail.split(": ", 1)[0])
            node_down = any(host_port(url) == lost_on for url in self.down_nodes)
            if not node_down:
                self.unexpected_closes += 1
        self.errors[kind] += 1

    # -- figures -------------------------------------------------------------------

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def final(self) -> dict[str, Any]:
        """Per-device end state: fleet revision reached and whether meant online."""
        return {
            "revisions": [
                d.core.state.revision if isinstance(d, SimDevice) else 0 for d in self.devices
            ],
            "online": [link.wanted for link in self.links for _ in link.shells],
        }

    def telemetry(self) -> dict[str, int]:
        """The outboxes now, summed (counts since the shard started)."""
        sent = dropped = waiting = waiting_offline = published = confirmed = 0
        for d in self.devices:
            outbox = d.outbox if isinstance(d, SimDevice) else None
            if outbox is None:
                continue
            sent += outbox.accepted
            if outbox.dropped:
                dropped += sum(outbox.dropped.values())
            if outbox.count:
                waiting += outbox.count
                if not d.link.wanted:
                    waiting_offline += outbox.count
            if d.sender is not None:
                published += d.sender.sent
                confirmed += d.sender.confirmed
        return {
            "sent": sent,  # records accepted into outboxes (alerts, events, drop reports)
            "alerts": self.alerts,
            "dropped": dropped,
            "waiting": waiting,  # still in outboxes
            "waiting_offline": waiting_offline,  # of which on devices meant offline
            "published": published,  # publishes, repeats included
            "confirmed": confirmed,
        }

    def snapshot(self) -> dict[str, Any]:
        """Counts now, and the samples gathered since the last snapshot."""
        connected = sum(len(link.shells) for link in self.links if link.is_open)
        online = sum(len(link.shells) for link in self.links if link.wanted)
        in_sync = 0
        if self.config.mode == "edgeward" and self.latest:
            in_sync = sum(
                1
                for d in self.devices
                if isinstance(d, SimDevice)
                and d.core.state.revision >= self.latest
                and d.channel is not None
            )
        rss = self._rss()
        applies, self.applies = self.applies, []
        receipts, self.receipts = self.receipts, []
        targeted, self.targeted_online = self.targeted_online, {}
        processing, self.processing = self.processing, {}
        return {
            "telemetry": self.telemetry(),
            "targeted_online": targeted,
            "devices": len(self.devices),
            "connected": connected,
            "online": online,
            "in_sync": in_sync,
            "errors": dict(self.errors),
            "unexpected_closes": self.unexpected_closes,
            "deliveries": sum(d.deliveries for d in self.devices),
            "heartbeats": sum(d.heartbeats for d in self.devices),
            "rss": rss,
            "base_rss": self.base_rss,
            "cpu": self._cpu() - self.cpu0,
            "applies": applies,
            "receipts": receipts,
            "processing": processing,
        }
