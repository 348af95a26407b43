"""The envelope codec: what crosses the broker, and how it is checked.

Every body is a CBOR map with ``v`` (schema version) and ``kind``.  Decoding
never raises anything but :class:`RemoteProtocolError`, whose ``reason`` is a
short label that callers count.

Kinds (schema version 1):

``bundle``  (policy stream, control plane -> devices)
    ``{v, kind, key_id, sig, body}`` where ``body`` is the CBOR encoding of
    ``{v, kind="revision", revision, issued_at, mode, policies, digests, deleted, sha256}``
    and ``sig``
    the Ed25519 signature of exactly those bytes.  ``mode`` is ``delta``
    (``policies`` are the documents added or changed by this revision,
    ``deleted`` the names removed) or ``snapshot`` (``policies`` is the whole
    fleet state, ``deleted`` empty).  ``sha256`` is the digest of the whole
    fleet state after the revision (:func:`edgeward.enforcement.digest.state_digest`);
    ``digests`` maps each policy in ``policies`` to its digest, so a device
    gets the digest of any set it selects without serialising documents.

``heartbeat``  (telemetry exchange, device -> control plane)
    ``{v, kind, device, time, revision, applied_revision, hash, status,
    rejected, gaps, awaiting_snapshot}``: what the device actually enforces.

``record``  (telemetry exchange -> ``edgeward.telemetry`` stream, device -> collector)
    ``{v, kind, device, seq, time, type, body}``: one thing a device saw or
    did, numbered per device from 1 with no reuse (``seq`` survives restarts:
    it is kept in the outbox).  ``type`` is ``alert`` (a backend verdict or
    alert), ``log`` (a backend log) or ``event`` (the agent's own: revision
    applied, bundle refused, gap, records dropped).  ``body`` is a map whose
    keys depend on ``type`` (see :class:`Record`).  Published with routing key
    ``telemetry.<device>.<type>``, ``message_id`` ``"<device>:<seq>"``,
    ``content_type`` ``application/cbor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from edgeward.enforcement.digest import doc_digest

from .errors import RemoteProtocolError

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/cbor"
#: Largest body we encode or accept. Policies are small; anything bigger is
#: refused before it is parsed.
MAX_BODY_BYTES = 1024 * 1024
MODES = ("delta", "snapshot")


def encode(obj: dict[str, Any]) -> bytes:
    data = cbor2.dumps(obj, canonical=True)
    if len(data) > MAX_BODY_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_BODY_BYTES}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Decode one body into a map with a known version, or refuse it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError("malformed", "body is not bytes")
    if len(data) > MAX_BODY_BYTES:
        raise RemoteProtocolError("too_large", f"{len(data)} bytes")
    try:
        obj = cbor2.loads(bytes(data))
    except Exception as exc:  # cbor2 raises several types for garbage
        raise RemoteProtocolError("malformed", f"not CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("malformed", "body is not a map")
    if obj.get("v") != SCHEMA_VERSION:
        raise RemoteProtocolError("unknown_version", repr(obj.get("v")))
    if not isinstance(obj.get("kind"), str):
        raise RemoteProtocolError("malformed", "no kind")
    return obj


def _require(obj: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise RemoteProtocolError("malformed", f"field {name!r} missing or of the wrong type")
    return value


def _counts(value: dict[Any, Any], name: str) -> dict[str, int]:
    """A map of counters: string keys, integer values, or refused."""
    if not all(isinstance(k, str) for k in value) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value.values()
    ):
        raise RemoteProtocolError("malformed", f"{name!r} must map names to integers")
    return dict(value)


@dataclass(frozen=True)
class SignedBundle:
    """The outer, signed envelope of a bundle; ``body`` is still encoded."""

    key_id: str
    sig: bytes
    body: bytes

    def encode(self) -> bytes:
        return encode(
            {
                "v": SCHEMA_VERSION,
                "kind": "bundle",
                "key_id": self.key_id,
                "sig": self.sig,
                "body": self.body,
            }
        )

    @classmethod
    def from_message(cls, obj: dict[str, Any]) -> SignedBundle:
        if obj.get("kind") != "bundle":
            raise RemoteProtocolError("unknown_kind", repr(obj.get("kind")))
        return cls(
            key_id=_require(obj, "key_id", str),
            sig=bytes(_require(obj, "sig", bytes)),
            body=bytes(_require(obj, "body", bytes)),
        )


@dataclass(frozen=True)
class Bundle:
    """One fleet revision: a delta against the previous one, or a snapshot."""

    revision: int
    issued_at: float
    mode: str
    policies: tuple[dict[str, Any], ...]
    sha256: str
    deleted: tuple[str, ...] = ()
    digests: dict[str, str] = field(default_factory=dict)  # filled from policies if empty

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.revision < 1:
            raise ValueError("revision starts at 1")
        if not self.digests and self.policies:
            object.__setattr__(
                self, "digests", {policy_name(p): doc_digest(p) for p in self.policies}
            )

    def encode_body(self) -> bytes:
        return encode(
            {
                "v": SCHEMA_VERSION,
                "kind": "revision",
                "revision": self.revision,
                "issued_at": self.issued_at,
                "mode": self.mode,
                "policies": list(self.policies),
                "digests": dict(self.digests),
                "deleted": list(self.deleted),
                "sha256": self.sha256,
            }
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Bundle:
        obj = decode(body)
        if obj["kind"] != "revision":
            raise RemoteProtocolError("unknown_kind", f"signed body of kind {obj['kind']!r}")
        revision = _require(obj, "revision", int)
        mode = _require(obj, "mode", str)
        if mode not in MODES or revision < 1:
            raise RemoteProtocolError("malformed", f"mode {mode!r} revision {revision!r}")
        policies = _require(obj, "policies", list)
        deleted = _require(obj, "deleted", list)
        names = [_policy_name(p) if isinstance(p, dict) else None for p in policies]
        if not all(names):
            raise RemoteProtocolError("malformed", "a policy without metadata.name")
        if not all(isinstance(n, str) for n in deleted):
            raise RemoteProtocolError("malformed", "deleted names must be strings")
        digests = _require(obj, "digests", dict)
        if set(digests) != set(names) or not all(isinstance(d, str) for d in digests.values()):
            raise RemoteProtocolError("malformed", "digests must name exactly the policies")
        return cls(
            revision=revision,
            issued_at=float(_require(obj, "issued_at", int | float)),
            mode=mode,
            policies=tuple(policies),
            deleted=tuple(deleted),
            sha256=_require(obj, "sha256", str),
            digests=digests,
        )


def _policy_name(doc: dict[str, Any]) -> str | None:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None


def policy_name(doc: dict[str, Any]) -> str:
    name = _policy_name(doc)
    if name is None:
        raise RemoteProtocolError("malformed", "a policy without metadata.name")
    return name


@dataclass(frozen=True)
class Heartbeat:
    """What a device reports it actually enforces."""

    device: str
    time: float
    revision: int
    applied_revision: int
    hash: str
    status: str
    rejected: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    awaiting_snapshot: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    error: str = ""
    # The telemetry outbox: records waiting to be sent, and records dropped
    # since the agent's first start because the outbox was full, by type.
    outbox: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # Telemetry publish-confirm latency since the previous heartbeat: counts
    # per bucket of :data:`CONFIRM_BUCKETS` (the last one: slower than all),
    # not cumulative, and their sum in seconds. Empty: nothing confirmed.
    confirms: tuple[int, ...] = ()
    confirm_seconds: float = 0.0

    def encode(self) -> bytes:
        return encode(
            {
                "v": SCHEMA_VERSION,
                "kind": "heartbeat",
                "device": self.device,
                "time": self.time,
                "revision": self.revision,
                "applied_revision": self.applied_revision,
                "hash": self.hash,
                "status": self.status,
                "rejected": dict(self.rejected),
                "gaps": self.gaps,
                "awaiting_snapshot": self.awaiting_snapshot,
                "labels": dict(self.labels),
                "error": self.error,
                "outbox": self.outbox,
                "dropped": dict(self.dropped),
                "confirms": list(self.confirms),
                "confirm_seconds": self.confirm_seconds,
            }
        )

    @classmethod
    def from_message(cls, obj: dict[str, Any]) -> Heartbeat:
        if obj.get("kind") != "heartbeat":
            raise RemoteProtocolError("unknown_kind", repr(obj.get("kind")))
        rejected = obj.get("rejected", {})
        labels = obj.get("labels", {})
        dropped = obj.get("dropped", {})
        outbox = obj.get("outbox", 0)
        if not all(isinstance(m, dict) for m in (rejected, labels, dropped)):
            raise RemoteProtocolError("malformed", "rejected/labels/dropped must be maps")
        if not isinstance(outbox, int) or isinstance(outbox, bool):
            raise RemoteProtocolError("malformed", "outbox must be an integer")
        return cls(
            device=_require(obj, "device", str),
            time=float(_require(obj, "time", int | float)),
            revision=_require(obj, "revision", int),
            applied_revision=_require(obj, "applied_revision", int),
            hash=_require(obj, "hash", str),
            status=_require(obj, "status", str),
            rejected=_counts(rejected, "rejected"),
            gaps=int(obj.get("gaps", 0)),
            awaiting_snapshot=bool(obj.get("awaiting_snapshot", False)),
            labels={str(k): str(v) for k, v in labels.items()},
            error=str(obj.get("error", "")),
            outbox=outbox,
            dropped=_counts(dropped, "dropped"),
            confirms=_confirms(obj.get("confirms", [])),
            confirm_seconds=_seconds(obj.get("confirm_seconds", 0.0)),
        )


#: Upper bounds (seconds) of the publish-confirm latency buckets a heartbeat
#: reports; a final, unbounded bucket follows. Fixed: the control plane adds
#: the devices' counts bucket by bucket.
CONFIRM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _confirms(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) not in (0, len(CONFIRM_BUCKETS) + 1):
        raise RemoteProtocolError(
            "malformed", f"confirms must be {len(CONFIRM_BUCKETS) + 1} counts or none"
        )
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise RemoteProtocolError("malformed", "confirms must be counts")
    return tuple(value)


def _seconds(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e12:
        raise RemoteProtocolError("malformed", "confirm_seconds must be a duration")
    return float(value)


#: Record types and their outbox priority: when the outbox is full the oldest
#: record of the lowest priority goes first (heartbeats < logs < alerts; the
#: agent's own events are audit evidence and rank with alerts).
RECORD_TYPES = {"log": 1, "event": 2, "alert": 2}
HEARTBEAT_PRIORITY = 0
#: Keys an ``alert`` body carries (values may be None where they do not apply).
ALERT_KEYS = ("policy", "action", "severity", "operation", "resource", "source")


@dataclass(frozen=True)
class Record:
    """One telemetry record (an alert, a log line or an agent event).

    ``alert`` bodies hold at least :data:`ALERT_KEYS` plus ``tags``,
    ``message`` and ``revision`` (the edgeward revision the deciding policy
    came with); ``event`` bodies hold ``event`` (a short name such as
    ``revision_applied``, ``bundle_refused``, ``gap``, ``dropped``) and its
    details; ``log`` bodies are free maps from the backend.
    """

    device: str
    seq: int
    time: float
    type: str
    body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in RECORD_TYPES:
            raise ValueError(f"record type must be one of {sorted(RECORD_TYPES)}")
        if self.seq < 1:
            raise ValueError("seq starts at 1")

    @property
    def message_id(self) -> str:
        return f"{self.device}:{self.seq}"

    @property
    def routing_key(self) -> str:
        return f"telemetry.{self.device}.{self.type}"

    @property
    def priority(self) -> int:
        return RECORD_TYPES[self.type]

    def encode(self) -> bytes:
        return encode(
            {
                "v": SCHEMA_VERSION,
                "kind": "record",
                "device": self.device,
                "seq": self.seq,
                "time": self.time,
                "type": self.type,
                "body": dict(self.body),
            }
        )

    @classmethod
    def from_message(cls, obj: dict[str, Any]) -> Record:
        if obj.get("kind") != "record":
            raise RemoteProtocolError("unknown_kind", repr(obj.get("kind")))
        device = _require(obj, "device", str)
        seq = _require(obj, "seq", int)
        kind = _require(obj, "type", str)
        body = _require(obj, "body", dict)
        if not device or seq < 1 or kind not in RECORD_TYPES:
            raise RemoteProtocolError("malformed", f"record {device!r}:{seq!r} of type {kind!r}")
        if not all(isinstance(k, str) for k in body):
            raise RemoteProtocolError("malformed", "record body keys must be strings")
        return cls(
            device=device,
            seq=seq,
            time=float(_require(obj, "time", int | float)),
            type=kind,
            body=body,
        )
