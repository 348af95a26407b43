"""The agent core: one device's policy logic as a sans-IO state machine.

It does no I/O and reads no clock: the host (the real agent, a simulated
device, a test) feeds it events and carries out the effects it returns, in
order.  The same class runs on a point-of-sale terminal and 35,000 times in
the simulator.

Rules
-----
1.  ``Started(cache)`` puts the cached set in force (an ``Apply`` effect)
    before anything touches the network.  A cache whose fleet state does not
    match the signed bundle stored with it is not trusted: the device starts
    empty at revision 0 and counts ``cache_corrupt``.
2.  ``LinkUp`` asks to consume the policy stream from the stored offset + 1
    (``"first"`` when there is none).  ``LinkLost`` forgets deliveries not yet
    handled: the broker gives them again after the next ``LinkUp``.
3.  Every delivery is acknowledged exactly once, after it was handled, and
    never rejected: on RabbitMQ 3.10-3.12 a nack on a stream closes the
    connection.
4.  A delivery that does not decode, is signed by an unknown key or not
    signed right, or does not hold together is counted by reason, acked, and
    changes nothing.  The set in force stays.
5.  A delta must be exactly ``revision + 1``.  Older or equal: ``stale``.
    Newer: a *gap* (retention dropped what the device missed).  The device
    then waits for a snapshot, skipping deltas, says so in every heartbeat
    (``awaiting_snapshot``; the control plane answers with a snapshot) and
    counts the gap.
6.  A snapshot newer than ``revision`` replaces the fleet state (and ends a
    wait).  One equal to ``revision`` with the same digest is skipped
    silently; any other is refused.
7.  After a bundle the fleet state's digest must equal the bundle's signed
    ``sha256``.  A delta that does not add up means the device's state went
    wrong: counted as a gap, and it waits for a snapshot.  A snapshot that
    does not add up is refused (``digest_mismatch``).
8.  The device's set is the fleet policies whose selectors match its name
    and labels.  If that set changed, it is applied (``Apply``) and the core
    waits for ``ApplyResult``; deliveries arriving meanwhile queue up.  Then
    bundle, revision, offset and fleet state are persisted in one write
    (``Persist``), the delivery is acked, and a heartbeat goes out at once.
9.  A failed apply leaves the previous set in force; the fleet revision
    still moves (the bundle was good), the status is ``failed``, and the
    apply is retried on ``Tick`` after ``retry_interval``.
10. ``Tick(now)`` sends a heartbeat every ``heartbeat_interval`` while the
    link is up.  Heartbeats report the digest the backend reports in force.
11. ``RetryApply(now)`` (the host saw the backend or the broker come back)
    brings a pending retry of a failed apply forward to now; with nothing
    pending it changes nothing.

Trust (keys and rollback)

14. A bundle is verified against the keys the device trusts now: those of
    the last bundle it accepted (``Bundle.keyring``), or its config's before
    the first. A key with an ``until`` is trusted only for bundles issued up
    to then (``key_expired``). Once a bundle is accepted, its keyring is
    what the device trusts (a key left out is revoked); a keyring that names
    a bad key is refused (``bad_keyring``) before anything changes.
15. ``Started(floor)``: the host's record of the highest revision this
    device accepted, kept apart from the cache. Without a trusted cache, or
    with one older than the floor (put in force anyway: an old signed set
    beats none; counted ``rollback``), the device accepts only a snapshot,
    and never one older than the floor (skipped, as deltas are while it
    waits).

Telemetry records (only a core made with ``records=True``: the real agent,
and the simulator's devices unless a scenario says ``telemetry = false``)

12. What the core itself does that the control plane's audit trail must hold
    goes out as ``Emit(type="event", body)``, whose ``body["event"]`` names
    it: ``revision_applied`` (a bundle's set, or a retried set, is in force;
    with ``revision``, ``digest``, ``policies``), ``apply_failed``
    (``revision``, ``error``), ``bundle_refused`` (``reason``, ``detail``,
    ``offset``), ``gap`` (``revision``, ``offset``, ``detail``) and
    ``cache_refused`` (``detail``).  The host keeps each in its outbox, where
    it gets its sequence number: numbering is I/O, not the core's.
13. An ``Emit`` comes before the ``Persist`` and the ``Ack`` of the delivery
    behind it: a crash in between may repeat the event (the delivery comes
    again), never lose it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeward.enforcement.digest import EMPTY_DIGEST, combine, doc_digest, name_of
from edgeward.enforcement.selector import selects
from edgeward.transport.errors import LocalProtocolError, RemoteProtocolError
from edgeward.transport.signing import Verifier
from edgeward.transport.wire import Bundle, Heartbeat, SignedBundle, decode, policy_name

Doc = Mapping[str, Any]

# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class CacheRecord:
    """What the disk cache holds; written in one piece."""

    revision: int
    offset: int | None
    applied_revision: int
    fleet: tuple[Doc, ...]
    bundle: bytes  # the signed envelope of the last bundle handled
    digest: str = ""  # what the backend reported in force after the last good apply


@dataclass(frozen=True)
class Started:
    now: float
    cache: CacheRecord | None = None
    # The highest fleet revision this device ever accepted, kept apart from
    # the cache (rule 14): 0 when unknown.
    floor: int = 0


@dataclass(frozen=True)
class LinkUp:
    now: float


@dataclass(frozen=True)
class LinkLost:
    now: float
    reason: str = ""


@dataclass(frozen=True)
class Delivery:
    now: float
    tag: int
    offset: int
    body: bytes


@dataclass(frozen=True)
class ApplyResult:
    now: float
    ok: bool
    digest: str
    error: str = ""


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class RetryApply:
    now: float


Event = Started | LinkUp | LinkLost | Delivery | ApplyResult | Tick | RetryApply

# -- effects -----------------------------------------------------------------


@dataclass(frozen=True)
class Apply:
    policies: tuple[Doc, ...]
    revision: int
    digest: str = ""  # the digest of exactly these policies, from the signed per-policy digests


@dataclass(frozen=True)
class Persist:
    record: CacheRecord


@dataclass(frozen=True)
class Ack:
    tag: int


@dataclass(frozen=True)
class Consume:
    offset: int | str  # a stream offset or "first"


@dataclass(frozen=True)
class SendHeartbeat:
    heartbeat: Heartbeat


@dataclass(frozen=True)
class Report:
    """Something a person reading the agent's log should know."""

    level: str  # "info" | "warning"
    text: str


@dataclass(frozen=True)
class Emit:
    """A telemetry record the core produced (rules 12-13): the host numbers it
    and keeps it in its outbox before carrying out the next effect."""

    type: str  # a record type of transport.wire.RECORD_TYPES; the core emits "event"
    body: Mapping[str, Any]


Effect = Apply | Persist | Ack | Consume | SendHeartbeat | Report | Emit


# -- selection ---------------------------------------------------------------


def match_labels(doc: Doc) -> Mapping[str, str] | None:
    """The node selector of a host policy; None for container policies,
    which every device receives (the daemon matches containers itself)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "KubeArmorPolicy":
        return None
    selector = spec.get("nodeSelector") or {}
    return selector.get("matchLabels") or {}


def select_names(fleet: Mapping[str, Doc], device: str, labels: Mapping[str, str]) -> list[str]:
    """The names of the fleet policies that apply to one device, sorted."""
    chosen = []
    for name in sorted(fleet):
        wanted = match_labels(fleet[name])
        if wanted is None or selects(wanted, device, labels):
            chosen.append(name)
    return chosen


def select_for(fleet: Mapping[str, Doc], device: str, labels: Mapping[str, str]) -> list[Doc]:
    """The fleet policies that apply to one device, by name."""
    return [fleet[name] for name in select_names(fleet, device, labels)]


class SharedState:
    """One copy of identical state for many cores in one process (the simulator).

    A device on its own never needs this.  Thousands of simulated devices at
    the same revision hold the same policies, the same fleet state and the
    same bundle bytes; sharing them keeps the simulator's client cost per
    device near a real connection's.  Sharing is sound because a fleet state
    is fixed by its signed digest, a policy by its signed digest, and the core
    never changes a fleet dict in place (a bundle builds new ones).  The
    tables grow with the distinct revisions of a run, which are few.
    """

    def __init__(self) -> None:
        self.docs: dict[str, Doc] = {}
        self.states: dict[str, tuple[dict[str, Doc], dict[str, str]]] = {}
        self.blobs: dict[bytes, bytes] = {}

    def doc(self, digest: str, doc: Doc) -> Doc:
        return self.docs.setdefault(digest, doc)

    def state(
        self, sha256: str, fleet: dict[str, Doc], digests: dict[str, str]
    ) -> tuple[dict[str, Doc], dict[str, str]]:
        return self.states.setdefault(sha256, (fleet, digests))

    def blob(self, data: bytes) -> bytes:
        return self.blobs.setdefault(data, data)


# -- the core ----------------------------------------------------------------


@dataclass
class _InFlight:
    delivery: Delivery
    bundle: Bundle
    fleet: dict[str, Doc]
    digests: dict[str, str]
    link: int  # which link the delivery came on: its tag means nothing on another


@dataclass
class AgentState:
    revision: int = 0
    offset: int | None = None
    applied_revision: int = 0
    fleet: dict[str, Doc] = field(default_factory=dict)
    fleet_digests: dict[str, str] = field(default_factory=dict)  # name -> policy digest
    last_bundle: bytes = b""
    in_force_digest: str = EMPTY_DIGEST
    status: str = "starting"  # starting | ok | failed
    error: str = ""
    awaiting_snapshot: bool = False
    link_up: bool = False
    gaps: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class AgentCore:
    def __init__(
        self,
        device: str,
        labels: Mapping[str, str],
        verifier: Verifier,
        *,
        heartbeat_interval: float = 10.0,
        retry_interval: float = 30.0,
        shared: SharedState | None = None,
        records: bool = False,
    ) -> None:
        self.device = device
        # Emit telemetry records of the core's own events (rules 12-13)?
        self.records = records
        # Many cores in one process (the simulator) share one copy of
        # identical state; a device keeps its own.
        self.shared = shared
        self.labels = dict(labels)
        self.verifier = verifier
        self.heartbeat_interval = heartbeat_interval
        self.retry_interval = retry_interval
        self.state = AgentState()
        self._now = 0.0
        self._started = False
        self._in_flight: _InFlight | None = None
        self._apply_wanted_at: float | None = None
        self._startup_apply = False
        self._retrying = False
        self._cached_digest = ""
        self._link = 0
        self._queue: list[Delivery] = []  # short and rare: a list is the smaller
        self._consume_wanted = False
        self._next_heartbeat = 0.0

    #: The highest revision accepted before (rule 15); set only when known, as
    #: most of a simulated fleet's cores never have one.
    floor = 0

    # The one entry point.
    def handle(self, event: Event) -> list[Effect]:
        self._now = max(self._now, event.now)
        if not self._started and not isinstance(event, Started):
            raise LocalProtocolError(f"{type(event).__name__} before Started")
        method = getattr(self, "_on_" + type(event).__name__, None)
        if method is None:
            raise LocalProtocolError(f"not an agent event: {event!r}")
        return method(event)

    @property
    def selected(self) -> list[Doc]:
        return select_for(self.state.fleet, self.device, self.labels)

    def heartbeat(self) -> Heartbeat:
        s = self.state
        return Heartbeat(
            device=self.device,
            time=self._now,
            revision=s.revision,
            applied_revision=s.applied_revision,
            hash=s.in_force_digest,
            status=s.status,
            rejected=dict(s.rejected),
            gaps=s.gaps,
            awaiting_snapshot=s.awaiting_snapshot,
            labels=self.labels,
            error=s.error,
        )

    # -- handlers ------------------------------------------------------------

    def _on_Started(self, ev: Started) -> list[Effect]:
        if self._started:
            raise LocalProtocolError("Started twice")
        self._started = True
        if ev.floor > 0:
            self.floor = ev.floor
        effects: list[Effect] = []
        if ev.cache is not None:
            problem, digests = self._check_cache(ev.cache)
            if problem:
                self.state.rejected["cache_corrupt"] += 1
                effects.append(Report("warning", f"cache not trusted ({problem}); starting empty"))
                effects.extend(self._emit("cache_refused", detail=problem))
            else:
                s = self.state
                s.revision = ev.cache.revision
                s.offset = ev.cache.offset
                s.applied_revision = ev.cache.applied_revision
                s.fleet = {policy_name(dict(d)): d for d in ev.cache.fleet}
                s.fleet_digests = digests
                s.last_bundle = ev.cache.bundle
                self._cached_digest = ev.cache.digest
                self._startup_apply = True
                effects.append(self._apply_selected())
                effects.append(
                    Report("info", f"cached revision {s.revision} loaded, putting it in force")
                )
        if not self._startup_apply:
            self.state.status = "ok"
        if self.state.revision < self.floor:
            # The cache is gone, or older than what this device accepted
            # before (restored from a backup?): only a snapshot at or past
            # the floor brings it back.
            self.state.awaiting_snapshot = True
            if ev.cache is not None:
                self.state.rejected["rollback"] += 1
            effects.append(
                Report(
                    "warning",
                    f"cache at revision {self.state.revision}, but this device accepted "
                    f"revision {self.floor} before: waiting for a snapshot of at least that",
                )
            )
            effects.extend(
                self._emit("rollback_guard", revision=self.state.revision, floor=self.floor)
            )
        return effects

    def _check_cache(self, cache: CacheRecord) -> tuple[str, dict[str, str]]:
        """Why the cache is not to be trusted ("" if it is), and its policies' digests."""
        try:
            bundle = self.verifier.verify(SignedBundle.from_message(decode(cache.bundle)))
        except RemoteProtocolError as exc:
            return f"stored bundle: {exc}", {}
        if bundle.revision != cache.revision:
            return "stored bundle is of another revision", {}
        try:
            digests = {name_of(d): doc_digest(d) for d in cache.fleet}
        except (KeyError, TypeError):
            return "stored fleet state unreadable", {}
        if combine(digests) != bundle.sha256:
            return "fleet state does not match the signed digest", {}
        return "", digests

    def _on_LinkUp(self, ev: LinkUp) -> list[Effect]:
        self.state.link_up = True
        self._link += 1
        self._queue.clear()
        self._next_heartbeat = self._now  # report at once
        if self._in_flight is not None:
            self._consume_wanted = True
            return []
        return [self._consume(), *self._maybe_heartbeat()]

    def _consume(self) -> Consume:
        offset = self.state.offset
        return Consume("first" if offset is None else offset + 1)

    def _on_LinkLost(self, ev: LinkLost) -> list[Effect]:
        self.state.link_up = False
        self._queue.clear()
        self._consume_wanted = False
        return []

    def _on_Tick(self, ev: Tick) -> list[Effect]:
        effects: list[Effect] = []
        if (
            self._apply_wanted_at is not None
            and self._in_flight is None
            and self._now >= self._apply_wanted_at
        ):
            self._apply_wanted_at = None
            self._startup_apply = True  # a retry: no delivery behind it
            self._retrying = True
            # The heartbeat follows the apply's result, not before it.
            return [self._apply_selected()]
        effects.extend(self._maybe_heartbeat())
        return effects

    def _on_RetryApply(self, ev: RetryApply) -> list[Effect]:
        if self._apply_wanted_at is None:
            return []
        self._apply_wanted_at = min(self._apply_wanted_at, self._now)
        return self._on_Tick(Tick(ev.now))

    def _maybe_heartbeat(self) -> list[Effect]:
        if not self.state.link_up or self._now < self._next_heartbeat:
            return []
        self._next_heartbeat = self._now + self.heartbeat_interval
        return [SendHeartbeat(self.heartbeat())]

    def _heartbeat_now(self) -> list[Effect]:
        self._next_heartbeat = self._now
        return self._maybe_heartbeat()

    def _on_Delivery(self, ev: Delivery) -> list[Effect]:
        if not self.state.link_up:
            raise LocalProtocolError("Delivery while the link is down")
        if self._in_flight is not None or self._startup_apply:
            self._queue.append(ev)
            return []
        return self._handle_delivery(ev)

    def _emit(self, event: str, **details: Any) -> list[Effect]:
        """The core's own event as a telemetry record, if it keeps records."""
        if not self.records:
            return []
        return [Emit("event", {"event": event, **details})]

    def _reject(self, ev: Delivery, reason: str, detail: str) -> list[Effect]:
        self.state.rejected[reason] += 1
        self.state.offset = ev.offset
        return [
            Report("warning", f"bundle at offset {ev.offset} refused: {reason} {detail}".rstrip()),
            *self._emit("bundle_refused", reason=reason, detail=detail, offset=ev.offset),
            Ack(ev.tag),
            *self._heartbeat_now(),
        ]

    def _skip(self, ev: Delivery) -> list[Effect]:
        self.state.offset = ev.offset
        return [Ack(ev.tag)]

    def _handle_delivery(self, ev: Delivery) -> list[Effect]:
        s = self.state
        try:
            signed = SignedBundle.from_message(decode(ev.body))
            bundle = self.verifier.verify(signed)
        except RemoteProtocolError as exc:
            return self._reject(ev, exc.reason, exc.detail)
        try:
            self.verifier.rekeyed(bundle.keyring)  # a bad key refuses the bundle, now
        except ValueError as exc:
            return self._reject(ev, "bad_keyring", str(exc))

        if bundle.mode == "delta":
            if bundle.revision <= s.revision:
                return self._reject(ev, "stale", f"revision {bundle.revision} <= {s.revision}")
            if s.awaiting_snapshot:
                return self._skip(ev)
            if bundle.revision > s.revision + 1:
                return self._gap(ev, f"expected revision {s.revision + 1}, got {bundle.revision}")
            fleet = dict(s.fleet)
            digests = dict(s.fleet_digests)
            for name in bundle.deleted:
                fleet.pop(name, None)
                digests.pop(name, None)
            for doc in bundle.policies:
                fleet[policy_name(doc)] = doc
            digests.update(bundle.digests)
            self._share_docs(fleet, bundle.digests)
        else:
            if bundle.revision < s.revision:
                return self._reject(ev, "stale", f"snapshot {bundle.revision} < {s.revision}")
            if bundle.revision < self.floor:
                # Older than what this device accepted before its cache went:
                # history on the stream (or a replay); it waits on.
                return self._skip(ev)
            if bundle.revision == s.revision:
                if bundle.sha256 == combine(s.fleet_digests):
                    return self._skip(ev)
                return self._reject(ev, "conflicting_snapshot", f"revision {bundle.revision}")
            fleet = {policy_name(doc): doc for doc in bundle.policies}
            digests = dict(bundle.digests)
            self._share_docs(fleet, digests)

        if combine(digests) != bundle.sha256:
            if bundle.mode == "snapshot":
                return self._reject(ev, "digest_mismatch", f"snapshot {bundle.revision}")
            return self._gap(ev, f"state after revision {bundle.revision} does not match")

        was_awaiting = s.awaiting_snapshot
        s.awaiting_snapshot = False
        effects: list[Effect] = []
        if was_awaiting:
            effects.append(Report("info", f"recovered from snapshot {bundle.revision}"))
        names = select_names(fleet, self.device, self.labels)
        chosen = [fleet[n] for n in names]
        digest = combine({n: digests[n] for n in names})
        if digest == s.in_force_digest and s.status != "failed":
            effects.extend(self._commit(ev, bundle, fleet, digests, changed=False, link=self._link))
            return effects
        self._in_flight = _InFlight(ev, bundle, fleet, digests, self._link)
        effects.append(Apply(tuple(chosen), bundle.revision, digest))
        return effects

    def _share_docs(self, fleet: dict[str, Doc], digests: Mapping[str, str]) -> None:
        if self.shared is not None:
            for name, digest in digests.items():
                fleet[name] = self.shared.doc(digest, fleet[name])

    def _apply_selected(self) -> Apply:
        s = self.state
        names = select_names(s.fleet, self.device, self.labels)
        digest = combine({n: s.fleet_digests[n] for n in names})
        return Apply(tuple(s.fleet[n] for n in names), s.revision, digest)

    def _gap(self, ev: Delivery, detail: str) -> list[Effect]:
        s = self.state
        s.gaps += 1
        s.awaiting_snapshot = True
        s.offset = ev.offset
        return [
            Report("warning", f"gap in the policy stream ({detail}); waiting for a snapshot"),
            *self._emit("gap", revision=s.revision, offset=ev.offset, detail=detail),
            Ack(ev.tag),
            *self._heartbeat_now(),
        ]

    def _record(self) -> CacheRecord:
        s = self.state
        return CacheRecord(
            revision=s.revision,
            offset=s.offset,
            applied_revision=s.applied_revision,
            fleet=tuple(s.fleet[n] for n in sorted(s.fleet)),
            bundle=s.last_bundle,
            digest=s.in_force_digest if s.status == "ok" else self._cached_digest,
        )

    def _commit(
        self,
        ev: Delivery,
        bundle: Bundle,
        fleet: dict[str, Doc],
        digests: dict[str, str],
        *,
        changed: bool,
        link: int,
    ) -> list[Effect]:
        s = self.state
        s.revision = bundle.revision
        s.offset = ev.offset
        s.last_bundle = ev.body
        keys_changed = self._adopt_keyring(bundle)
        if self.shared is not None:
            fleet, digests = self.shared.state(bundle.sha256, fleet, digests)
            s.last_bundle = self.shared.blob(ev.body)
        s.fleet = fleet
        s.fleet_digests = digests
        effects: list[Effect] = list(keys_changed)
        if changed:
            s.applied_revision = bundle.revision
            self._cached_digest = s.in_force_digest
            effects.extend(self._applied_event())
        effects.append(Persist(self._record()))
        # A delivery tag belongs to the link it came on; after a reconnect the
        # broker gives the message again (we consume from the stored offset).
        if link == self._link and s.link_up:
            effects.append(Ack(ev.tag))
        if changed:
            effects.extend(self._heartbeat_now())
        return effects

    def _adopt_keyring(self, bundle: Bundle) -> list[Effect]:
        """Rule 14: the keys of an accepted bundle are the ones trusted next."""
        before = self.verifier
        try:
            self.verifier = before.rekeyed(bundle.keyring)
        except ValueError:  # checked when the bundle came: cannot happen
            return []
        if self.verifier is before:
            return []
        ids = ", ".join(
            k + ("" if e["until"] is None else f" (until {e['until']:.0f})")
            for k, e in self.verifier.keyring.items()
        )
        return [
            Report("info", f"trusted signing keys now: {ids}"),
            *self._emit("keys_changed", keys=sorted(self.verifier.key_ids)),
        ]

    def _applied_event(self) -> list[Effect]:
        s = self.state
        policies = len(select_names(s.fleet, self.device, self.labels)) if self.records else 0
        return self._emit(
            "revision_applied",
            revision=s.revision,
            digest=s.in_force_digest,
            policies=policies,
        )

    def _on_ApplyResult(self, ev: ApplyResult) -> list[Effect]:
        s = self.state
        effects: list[Effect] = []
        if ev.ok:
            s.in_force_digest = ev.digest
            s.status = "ok"
            s.error = ""
            self._apply_wanted_at = None
        else:
            # Report what the backend says is in force, whatever we hoped.
            s.in_force_digest = ev.digest or s.in_force_digest
            s.status = "failed"
            s.error = ev.error
            self._apply_wanted_at = self._now + self.retry_interval
            effects.append(Report("warning", f"apply failed: {ev.error}"))
            revision = self._in_flight.bundle.revision if self._in_flight else s.revision
            effects.extend(self._emit("apply_failed", revision=revision, error=ev.error))

        if self._in_flight is not None:
            flight, self._in_flight = self._in_flight, None
            effects.extend(
                self._commit(
                    flight.delivery,
                    flight.bundle,
                    flight.fleet,
                    flight.digests,
                    changed=ev.ok,
                    link=flight.link,
                )
            )
            if not ev.ok:
                effects.extend(self._heartbeat_now())
        elif self._startup_apply:
            # The cached set (at start) or a retry: no delivery behind it.
            self._startup_apply = False
            changed = bool(self._cached_digest) and ev.digest != self._cached_digest
            if ev.ok and (self._retrying or changed):
                # The set in force changed since the last good apply: it is
                # the current revision's now.
                s.applied_revision = s.revision
                self._cached_digest = ev.digest
                if self._retrying:
                    effects.extend(self._applied_event())
                effects.append(Persist(self._record()))
            self._retrying = False
            effects.extend(self._heartbeat_now())
        else:
            raise LocalProtocolError("ApplyResult without an Apply")

        if self._consume_wanted:
            self._consume_wanted = False
            effects.append(self._consume())
        while self._queue and self._in_flight is None and not self._startup_apply:
            effects.extend(self._handle_delivery(self._queue.pop(0)))
        return effects
