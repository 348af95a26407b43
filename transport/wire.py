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

``record``  (``edgeward.uplink`` exchange -> ``edgeward.telemetry`` stream, device -> collector)
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

import io
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from edgeward.enforcement.digest import doc_digest

from .errors import RemoteProtocolError

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/cbor"
MODES = ("delta", "snapshot")

# -- limits on what comes from outside ----------------------------------------
#
# Every body from the broker is hostile until it decodes.  decode() refuses,
# with RemoteProtocolError and a reason, instead of building what would cost
# too much; encode() refuses (ValueError) whatever decode() would refuse, so
# we never publish a message our own peers drop.
#
# What cbor2 (6.x, the Rust decoder) does with hostile bytes, measured:
# * A head declaring a 2**62-byte string or array allocates nothing: it reads
#   in chunks and stops at the end of the data ("premature end of stream").
# * Nesting is bounded by its max_depth (default 400); tags count as levels.
# * 1 MiB of one-byte items (empty maps, empty arrays) builds ~75 MB of
#   Python objects and takes ~0.25-0.8 s: the real amplification.  So the
#   number of items is bounded (MAX_ITEMS), checked on the raw bytes before
#   anything is built.
# * Tags decode into other types, some expensive or dangerous: tag 28/29
#   build self-referencing lists, tag 2 a 1 MiB integer (str() of it then
#   raises ValueError), tag 24 embedded CBOR, 35 compiles a regex, and a
#   date, a decimal, a UUID.  Our encoder emits none (policies are plain
#   JSON values, integers within 64 bits), so every tag is refused.
# * Bytes after the first item are ignored by cbor2.loads; we refuse them.

#: Largest body we encode or accept, refused by its length before parsing.
MAX_BODY_BYTES = 1024 * 1024
#: Deepest nesting of maps and arrays.  A bundle holds policies two levels
#: down (body -> policies -> document), and the policy validator accepts
#: documents nested up to enforcement.policy.MAX_DEPTH (64) levels.
MAX_DEPTH = 80
#: Most data items (keys, values, elements) in one message.  Real messages
#: hold one item per ~3-5 bytes, so a full-size bundle fits; 1 MiB of empty
#: maps would not (see above).  Only a message longer than this many bytes
#: can hold more items (each item takes at least one byte), so only those
#: are walked before decoding; cbor2 bounds depth and tags for the rest.
MAX_ITEMS = MAX_BODY_BYTES // 4
#: Most values (nested ones included) in a record's body and most entries in
#: a heartbeat's maps: what the collector and the control plane keep.
MAX_RECORD_VALUES = 1024
MAX_HEARTBEAT_ENTRIES = 256


class _EveryTag(Mapping[int, Any]):
    """cbor2's ``semantic_decoders``: every tag it knows maps to a refusal."""

    def __getitem__(self, tag: int) -> Any:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_tag(*_: Any) -> Any:
    raise ValueError("a CBOR tag: our messages carry none")


_EVERY_TAG = _EveryTag()


def encode(obj: dict[str, Any]) -> bytes:
    data = cbor2.dumps(obj, canonical=True)
    if len(data) > MAX_BODY_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        _scan(data)
    except RemoteProtocolError as exc:
        raise ValueError(f"message our peers would refuse: {exc}") from None
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Decode one body into a map with a known version, or refuse it."""
    if isinstance(data, memoryview):
        size = data.nbytes
    elif isinstance(data, bytes | bytearray):
        size = len(data)
    else:
        raise RemoteProtocolError("malformed", "body is not bytes")
    if size > MAX_BODY_BYTES:
        raise RemoteProtocolError("too_large", f"{size} bytes")
    data = bytes(data)
    if size > MAX_ITEMS:
        _scan(data)
    try:
        obj = _load(data)
    except Exception as exc:  # cbor2 raises several types for garbage
        _scan(data)  # the precise reason (too_deep, ...) where there is one
        raise RemoteProtocolError("malformed", f"not CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("malformed", "body is not a map")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise RemoteProtocolError("unknown_version", repr(version))
    if not isinstance(obj.get("kind"), str):
        raise RemoteProtocolError("malformed", "no kind")
    return obj


def _load(data: bytes) -> Any:
    """cbor2 with every limit it has: depth, no indefinite lengths, no
    duplicate or non-string keys, no tags, nothing after the item."""
    fp = io.BytesIO(data)
    obj = cbor2.CBORDecoder(
        fp,
        read_size=max(len(data), 1),  # one read: chunked reads cost a third more
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
        tag_hook=_refuse_tag,
        semantic_decoders=_EVERY_TAG,
    ).decode()
    if fp.tell() != len(data):
        raise ValueError(f"{len(data) - fp.tell()} bytes after the message")
    return obj


def _scan(data: bytes) -> None:
    """Walk the item heads of ``data`` without building anything; refuse what
    is nested deeper than MAX_DEPTH (``too_deep``), holds more than MAX_ITEMS
    items (``too_large``), or that _load refuses for its form (``malformed``:
    a tag, an indefinite length, a map key that is not a string, a length
    past the end, bytes after the item).  It accepts a little that _load
    refuses (bad UTF-8, duplicate keys): it bounds work, it does not decode.
    """
    end = len(data)
    pos = 0
    items = 1
    left, in_map = 1, False  # items still to read in the innermost container
    stack: list[tuple[int, bool]] = []  # the same for the containers around it
    while True:
        while not left:
            if not stack:
                if pos != end:
                    raise RemoteProtocolError("malformed", f"{end - pos} bytes after the message")
                return
            left, in_map = stack.pop()
        is_key = in_map and not left % 2
        left -= 1
        if pos >= end:
            raise RemoteProtocolError("malformed", "truncated")
        head = data[pos]
        pos += 1
        major, info = head >> 5, head & 0x1F
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if width > end - pos:
                raise RemoteProtocolError("malformed", "truncated")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
        elif info == 31 and 2 <= major <= 5:
            raise RemoteProtocolError("malformed", "an indefinite length")
        else:
            raise RemoteProtocolError("malformed", f"head 0x{head:02x} at byte {pos - 1}")
        if is_key and major not in (2, 3):
            raise RemoteProtocolError("malformed", "a map key that is not a string")
        if major in (2, 3):
            if arg > end - pos:
                raise RemoteProtocolError("malformed", f"a string of {arg} bytes past the end")
            pos += arg
        elif major in (4, 5):
            count = arg * 2 if major == 5 else arg
            if count > end - pos:
                raise RemoteProtocolError("malformed", f"{count} items past the end")
            items += count
            if items > MAX_ITEMS:
                raise RemoteProtocolError("too_large", f"more than {MAX_ITEMS} items")
            if count:
                stack.append((left, in_map))
                left, in_map = count, major == 5
                if len(stack) > MAX_DEPTH:
                    raise RemoteProtocolError("too_deep", f"nested more than {MAX_DEPTH} levels")
        elif major == 6:
            raise RemoteProtocolError("malformed", f"tag {arg}: our messages carry none")


def _require(obj: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise RemoteProtocolError("malformed", f"field {name!r} missing or of the wrong type")
    return value


def _optional(obj: dict[str, Any], name: str, typ: type, default: Any) -> Any:
    return _require(obj, name, typ) if name in obj else default


def _finite(obj: dict[str, Any], name: str) -> float:
    value = _require(obj, name, int | float)
    if not math.isfinite(value):
        raise RemoteProtocolError("malformed", f"field {name!r} must be a finite number")
    return float(value)


def _entries(value: dict[Any, Any], name: str) -> dict[Any, Any]:
    if len(value) > MAX_HEARTBEAT_ENTRIES:
        raise RemoteProtocolError(
            "malformed", f"{name!r} has more than {MAX_HEARTBEAT_ENTRIES} entries"
        )
    return value


def _counts(value: dict[Any, Any], name: str) -> dict[str, int]:
    """A map of counters: string keys, integer values, or refused."""
    if not all(isinstance(k, str) for k in _entries(value, name)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value.values()
    ):
        raise RemoteProtocolError("malformed", f"{name!r} must map names to integers")
    return dict(value)


def _labels(value: dict[Any, Any]) -> dict[str, str]:
    if not all(
        isinstance(k, str) and isinstance(v, str) for k, v in _entries(value, "labels").items()
    ):
        raise RemoteProtocolError("malformed", "'labels' must map names to strings")
    return dict(value)


def _body_problem(body: dict[str, Any]) -> str:
    """Why a record body cannot be kept ("" if it can): more than
    MAX_RECORD_VALUES values, nested ones included, or a key that is not a
    string at any depth (the audit store keeps bodies as JSON)."""
    stack: list[Any] = [body]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_RECORD_VALUES:
            return f"body of more than {MAX_RECORD_VALUES} values"
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return "record body keys must be strings"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return ""


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
        signed = cls(
            key_id=_require(obj, "key_id", str),
            sig=bytes(_require(obj, "sig", bytes)),
            body=bytes(_require(obj, "body", bytes)),
        )
        # Exactly these fields: a new one would be a new schema version.
        if len(obj) != len(_ENVELOPE_FIELDS):
            extra = sorted(repr(k) for k in obj if k not in _ENVELOPE_FIELDS)
            raise RemoteProtocolError("malformed", f"unknown fields {', '.join(extra)}")
        return signed


_ENVELOPE_FIELDS = frozenset({"v", "kind", "key_id", "sig", "body"})


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
    # The keys devices are to trust from this revision on (signing.py):
    # key id -> {"public": base64 raw Ed25519 key, "until": None, or the
    # latest ``issued_at`` a bundle signed by it may carry}. Empty: no
    # statement (devices keep the keys they have).
    keyring: dict[str, dict[str, Any]] = field(default_factory=dict)

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
                **({"keyring": self.keyring} if self.keyring else {}),
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
            issued_at=_finite(obj, "issued_at"),
            mode=mode,
            policies=tuple(policies),
            deleted=tuple(deleted),
            sha256=_require(obj, "sha256", str),
            digests=digests,
            keyring=_keyring(obj.get("keyring", {})),
        )


#: At most this many keys in a keyring (a rotation keeps two or three).
MAX_KEYS = 16


def _keyring(value: Any) -> dict[str, dict[str, Any]]:
    """A bundle's keyring, checked for shape (the keys themselves: signing.py)."""
    if not isinstance(value, dict) or len(value) > MAX_KEYS:
        raise RemoteProtocolError("bad_keyring", f"a map of at most {MAX_KEYS} keys")
    out: dict[str, dict[str, Any]] = {}
    for key_id, entry in value.items():
        if not isinstance(entry, dict) or set(entry) != {"public", "until"}:
            raise RemoteProtocolError("bad_keyring", f"key {str(key_id)[:32]!r}: public, until")
        public, until = entry["public"], entry["until"]
        if not isinstance(public, str) or len(public) > 64:
            raise RemoteProtocolError("bad_keyring", f"key {key_id!r}: public must be base64")
        if until is not None and (
            not isinstance(until, int | float)
            or isinstance(until, bool)
            or not math.isfinite(until)
        ):
            raise RemoteProtocolError("bad_keyring", f"key {key_id!r}: until must be a time")
        out[key_id] = {"public": public, "until": None if until is None else float(until)}
    if value and not any(e["until"] is None for e in out.values()):
        raise RemoteProtocolError("bad_keyring", "no key without an end: devices would trust none")
    return out


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
        return cls(
            device=_require(obj, "device", str),
            time=_finite(obj, "time"),
            revision=_require(obj, "revision", int),
            applied_revision=_require(obj, "applied_revision", int),
            hash=_require(obj, "hash", str),
            status=_require(obj, "status", str),
            rejected=_counts(_optional(obj, "rejected", dict, {}), "rejected"),
            gaps=_optional(obj, "gaps", int, 0),
            awaiting_snapshot=_optional(obj, "awaiting_snapshot", bool, False),
            labels=_labels(_optional(obj, "labels", dict, {})),
            error=_optional(obj, "error", str, ""),
            outbox=_optional(obj, "outbox", int, 0),
            dropped=_counts(_optional(obj, "dropped", dict, {}), "dropped"),
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
        problem = _body_problem(body)
        if problem:
            raise RemoteProtocolError("malformed", problem)
        return cls(
            device=device,
            seq=seq,
            time=_finite(obj, "time"),
            type=kind,
            body=body,
        )
