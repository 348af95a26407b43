"""What a simulation run records: the data the report is computed from.

The SimulationDirector fills a :class:`RunData` as the run goes; ``report``
turns it into ``report.json``, ``report.md`` and charts.  Everything here is
plain data (JSON-able through :func:`dataclasses.asdict`), so a partial run
(Ctrl-C) still writes a report from what it has.

Times are seconds since the run started (``t``), except ``started_at``
(Unix time).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class FleetSample:
    """The whole fleet at one moment (summed over worker shards)."""

    t: float
    connected: int  # devices with an open AMQP connection
    in_sync: int  # devices whose in-force revision is the latest published
    online: int  # devices meant to be online (not taken offline by churn or a cut)
    errors: int  # cumulative, all kinds
    deliveries: int  # cumulative policy deliveries received by devices
    heartbeats: int  # cumulative heartbeats sent by devices
    client_rss_bytes: int  # RSS of all worker processes
    client_cpu_seconds: float  # cumulative CPU of all worker processes


@dataclass
class BrokerSample:
    """One broker node at one moment (its rabbitmq_prometheus endpoint)."""

    t: float
    node: str
    memory_bytes: float  # the node's resident memory
    fds: float  # open file descriptors
    erlang_processes: float
    connections: float
    messages_in_total: float = 0.0  # cumulative messages published into queues/streams
    messages_out_total: float = 0.0  # cumulative messages delivered to consumers
    cpu_seconds: float = 0.0  # cumulative CPU of the node's Erlang runtime (0: not exported)


@dataclass
class Action:
    """One timeline action as carried out."""

    t: float
    kind: str  # apply | restart-node | cut | restore | churn
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """One published revision and when each device put it in force."""

    revision: int
    t: float  # publish time (seconds since start)
    targeted: int  # devices whose selected set this revision changes
    online_at_publish: int  # of those, meant to be online when it was published
    # Seconds from publish to in force, per device that put it in force
    # (online devices at publish; devices that came back later are in ``late``).
    latencies: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    # The simulator's own work on this revision's deliveries: how many it
    # handled and the CPU seconds the workers spent on them (decode, verify,
    # select, apply, cache, ack, heartbeat). A real fleet does this in
    # parallel, one CPU per device; here the workers share the machine.
    processed: int = 0
    processing_seconds: float = 0.0


@dataclass
class Baseline:
    """The raw floor: same connections and topology, devices only ack."""

    devices: int
    connected: int
    # Seconds from publish to receipt, per device, per probe message.
    fanouts: list[list[float]] = field(default_factory=list)
    # Size of each probe message: that of the run's largest bundle, so the
    # floor moves the same bytes edgeward does.
    probe_bytes: int = 0


#: A worker's asyncio turn this long (s) means the load generator was
#: overloaded: its devices' figures, and the commands it takes, are late by as much.
SLOW_TURN_S = 2.0

#: How a shard on the run's own host names where it ran (after the host name).
OWN_HOST = " (the run's own host)"


@dataclass
class RunData:
    scenario: dict[str, Any]
    devices: int
    workers: int
    verify: str  # every | cached
    share_connections: int  # 0: one connection per device
    brokers: list[str]  # node URLs (passwords redacted)
    nodes: list[str]  # node names
    broker_config: str  # "default" or the config file used for a local cluster
    started_at: float
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    samples: list[FleetSample] = field(default_factory=list)
    broker: list[BrokerSample] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    baseline: Baseline | None = None
    errors: dict[str, int] = field(default_factory=dict)  # by kind
    unexpected_closes: int = 0
    # Messages: bundles each online device should have received, and did.
    messages_expected: int = 0
    messages_received: int = 0
    heartbeats_sent: int = 0
    # Telemetry arithmetic: records devices put in their outboxes (alerts,
    # the core's events, drop reports) = distinct (device, seq) read from the
    # telemetry stream + records the outboxes dropped (and report).
    telemetry_sent: int = 0
    telemetry_received: int = 0
    telemetry_dropped_reported: int = 0
    telemetry_alerts: int = 0  # of the records sent, alerts
    telemetry_waiting: int = 0  # still in outboxes when the run ended
    telemetry_waiting_offline: int = 0  # of those, on devices meant offline then
    telemetry_duplicates: int = 0  # records read again (resent after a lost confirm)
    # Of the records read, those published with the AMQP user_id of their
    # device (None: not counted, a run from before the counter looked).
    telemetry_stamped: int | None = None
    # Whether every online device's outbox was empty and the stream had
    # everything before the end (None: no telemetry, or not waited for).
    telemetry_drained: bool | None = None
    # End-to-end latency of the records read (device's record time -> read
    # from the stream; one clock): p50, p90, p99, max in ms, and count.
    telemetry_latency_ms: dict[str, float | None] = field(default_factory=dict)
    # RSS of the worker processes before their devices were made: what the
    # per-device figure is measured above.
    client_base_rss_bytes: int = 0
    ramp_seconds: float | None = None  # first connect attempt -> all online devices connected
    # How devices logged in (logins.DeviceLogins.figures): "mode" is "device"
    # (a broker user each: "setup_s" = "users_s" before any phase + the
    # "grants_s" of each phase's vhost; "revoke_s" before each vhost went;
    # "removed" / "left" / "problem" at the end) or "shared" (the broker
    # URL's login, with "reason"). Empty: a run from before per-device users,
    # which all logged in with the shared login.
    logins: dict[str, Any] = field(default_factory=dict)
    reconnect: dict[str, float | None] = field(default_factory=dict)  # storm figures
    # Where the devices ran: worker host name -> devices (``--worker-host``),
    # or this host's name alone. Empty: a run from before it was recorded.
    worker_hosts: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    # The longest a worker's asyncio turn took (s): above a couple of
    # seconds the load generator was overloaded, and commands (cut, restore,
    # a publish's bookkeeping) reached its devices late by as much.
    slowest_turn_s: float = 0.0
    completed: bool = False  # False for a run stopped early (Ctrl-C)
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the raw run data as JSON (before any figure is computed)."""
        path.write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunData:
        """Read what :meth:`save` wrote; fields added since are left at their defaults."""
        data = json.loads(Path(path).read_text())
        nested = {
            "samples": FleetSample,
            "broker": BrokerSample,
            "actions": Action,
            "rollouts": Rollout,
        }
        for key, kind in nested.items():
            data[key] = [_build(kind, item) for item in data.get(key, [])]
        if data.get("baseline") is not None:
            data["baseline"] = _build(Baseline, data["baseline"])
        return _build(cls, data)


def _build(kind: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in data.items() if k in known})
