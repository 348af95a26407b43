"""Messages between the control plane's actors and the CLI.

Thespian does not copy messages between actors in one process, so every
message is a frozen dataclass; across processes they are pickled, so they
hold only plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# -- replies -----------------------------------------------------------------

#: Error codes a reply can carry; the CLI maps them to exit codes.
BAD_INPUT = "bad_input"
UNREACHABLE = "unreachable"
FAILED = "failed"


@dataclass(frozen=True)
class Reply:
    ok: bool
    value: Any = None
    error: str = ""
    code: str = ""

    @classmethod
    def fail(cls, code: str, error: str) -> Reply:
        return cls(False, None, error, code)


# -- set-up ------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    home: str
    broker_url: str
    snapshot_every: int = 10
    snapshot_cooldown: float = 5.0
    offline_after: float = 45.0
    retention_max_age: str = "30D"
    retention_max_bytes: int = 1024**3
    retention_segment_bytes: int = 16 * 1024**2
    # The audit trail (edgeward.telemetry stream) and its collector.
    telemetry_max_age: str = "90D"
    telemetry_max_bytes: int = 10 * 1024**3
    telemetry_segment_bytes: int = 16 * 1024**2
    collector_batch: int = 250  # commit after this many deliveries ...
    collector_batch_ms: float = 200.0  # ... or this long after a batch's first
    metrics_port: int = 0  # Prometheus /metrics (actors/metrics.py); 0: off
    # Devices share one broker login (development): accept telemetry and
    # heartbeats without a user_id (collector.Trust).
    allow_shared_login: bool = False


@dataclass(frozen=True)
class Configure:
    settings: Settings
    link: Any = None  # ActorAddress of the BrokerLink
    distributor: Any = None
    mirror: Any = None
    collector: Any = None


@dataclass(frozen=True)
class Status:
    """Asks an actor whether it is configured and connected."""


# -- CLI -> PolicyDistributor -------------------------------------------------


@dataclass(frozen=True)
class ApplyPolicies:
    documents: tuple[dict, ...]
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeletePolicy:
    name: str


@dataclass(frozen=True)
class Rollback:
    revision: int


@dataclass(frozen=True)
class ListPolicies:
    pass


@dataclass(frozen=True)
class History:
    pass


@dataclass(frozen=True)
class PublishSnapshot:
    reason: str = "on demand"


@dataclass(frozen=True)
class SigningIdentity:
    """Asks for the public keys devices must trust."""


# -- CLI -> DeviceMirror -----------------------------------------------------


@dataclass(frozen=True)
class Enroll:
    device: str
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RotateKey:
    """CLI -> PolicyDistributor: a new signing key; the active one retires
    for bundles issued more than ``overlap`` seconds from now."""

    overlap: float


@dataclass(frozen=True)
class RevokeKey:
    key_id: str


@dataclass(frozen=True)
class ListKeys:
    pass


@dataclass(frozen=True)
class Revoke:
    """CLI -> DeviceMirror and TelemetryCollector (-> its reader): the device is revoked."""

    device: str


@dataclass(frozen=True)
class ListDevices:
    state: str | None = None


# -- CLI -> TelemetryCollector ----------------------------------------------


@dataclass(frozen=True)
class Alerts:
    """Stored alerts matching the filters (see ``audit_store.AlertQuery``)."""

    device: str | None = None
    policy: str | None = None
    severity: int | None = None
    since: float | None = None
    after_offset: int | None = None
    limit: int | None = None


# -- between actors ----------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """PolicyDistributor -> BrokerLink: publish one signed bundle, confirmed."""

    body: bytes
    revision: int
    mode: str
    token: int


@dataclass(frozen=True)
class Published:
    token: int
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class Heartbeats:
    """BrokerLink -> DeviceMirror: decoded heartbeats, in batches."""

    items: tuple[dict, ...]
    malformed: int = 0
    refused: int = 0  # whose sender is not the device they name (collector.Trust)


@dataclass(frozen=True)
class FleetChanged:
    """PolicyDistributor -> DeviceMirror: a revision was published."""

    revision: int
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotWanted:
    """DeviceMirror -> PolicyDistributor: a device waits for a snapshot."""

    device: str


@dataclass(frozen=True)
class ReaderState:
    """TelemetryReader -> TelemetryCollector: how reading the stream goes."""

    pid: int
    connected: bool
    error: str = ""
    resumed_from: int | None = None  # stored offset the reader started after
    committed: int | None = None  # last offset stored
    received: int | None = None  # last offset delivered
    pending: int = 0  # delivered, not yet committed
