"""The agent core, rule by rule: events in, effects out.

No broker, no clock, no sleeps.  A ``FakeHost`` carries out the core's
effects the way the real shell (``actors/agent.py``) does: an ``Apply`` is
answered at once with an ``ApplyResult`` whose digest is the ``state_digest``
of the applied policies, and every other effect is recorded.  A
``ControlPlane`` signs real bundles with a fresh Ed25519 key.

The rule numbers in the section headers are those of the module docstring of
``edgeward.actors.core``.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.actors import core
from edgeward.actors.core import (
    Ack,
    AgentCore,
    Apply,
    ApplyResult,
    CacheRecord,
    Consume,
    Delivery,
    Emit,
    LinkLost,
    LinkUp,
    Persist,
    Report,
    RetryApply,
    SendHeartbeat,
    Started,
    Tick,
)
from edgeward.enforcement.digest import EMPTY_DIGEST, state_digest
from edgeward.transport.errors import LocalProtocolError
from edgeward.transport.signing import Signer, Verifier
from edgeward.transport.wire import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    Bundle,
    Heartbeat,
    SignedBundle,
    decode,
    encode,
)

DEVICE = "pos-berlin-01"
LABELS = {"store": "berlin", "tier": "pos"}
HEARTBEAT_INTERVAL = 10.0
RETRY_INTERVAL = 30.0
EFFECT_TYPES = (Apply, Persist, Ack, Consume, SendHeartbeat, Report, Emit)

# -- policy documents ----------------------------------------------------------


def host_policy(
    name: str,
    *,
    store: str | None = "berlin",
    match_labels: Mapping[str, str] | None = None,
    path: str = "/usr/bin/x",
    action: str = "Block",
) -> dict[str, Any]:
    """A KubeArmorHostPolicy selecting ``store=<store>`` (or ``match_labels``)."""
    labels = dict(match_labels) if match_labels is not None else {"store": store}
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": labels},
            "process": {"matchPaths": [{"path": path}]},
            "action": action,
        },
    }


def container_policy(name: str) -> dict[str, Any]:
    """A KubeArmorPolicy: every device receives it, the daemon matches containers."""
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorPolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": "till"}},
            "file": {"matchPaths": [{"path": "/etc/shadow"}]},
            "action": "Block",
        },
    }


def names(policies: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(p["metadata"]["name"] for p in policies)


# -- the control plane: signs real bundles --------------------------------------


class ControlPlane:
    """Keeps a fleet state and signs deltas and snapshots of it."""

    def __init__(self, signer: Signer | None = None) -> None:
        self.signer = signer or Signer.generate()
        self.revision = 0
        self.fleet: dict[str, dict[str, Any]] = {}
        self.history: dict[int, bytes] = {}

    @property
    def verifier(self) -> Verifier:
        return Verifier({self.signer.key_id: self.signer.public_b64})

    @property
    def digest(self) -> str:
        return state_digest(self.fleet.values())

    def sign(self, bundle: Bundle, signer: Signer | None = None) -> bytes:
        return (signer or self.signer).sign(bundle).encode()

    def delta(self, *put: dict[str, Any], delete: Iterable[str] = ()) -> bytes:
        """Advance one revision and return the signed delta for it."""
        self.revision += 1
        deleted = tuple(delete)
        for name in deleted:
            self.fleet.pop(name, None)
        for doc in put:
            self.fleet[doc["metadata"]["name"]] = doc
        body = self.sign(
            Bundle(
                revision=self.revision,
                issued_at=float(self.revision),
                mode="delta",
                policies=tuple(put),
                deleted=deleted,
                sha256=self.digest,
            )
        )
        self.history[self.revision] = body
        return body

    def snapshot(self, *, sha256: str | None = None, revision: int | None = None) -> bytes:
        """The whole fleet state at the current revision (or a forged one)."""
        return self.sign(
            Bundle(
                revision=revision if revision is not None else self.revision,
                issued_at=float(self.revision),
                mode="snapshot",
                policies=tuple(self.fleet[n] for n in sorted(self.fleet)),
                sha256=sha256 if sha256 is not None else self.digest,
            )
        )

    def skip(self) -> None:
        """A revision the device never sees (retention dropped it)."""
        self.revision += 1

    def cache(
        self,
        *,
        offset: int | None = 41,
        applied_revision: int | None = None,
        digest: str = "",
    ) -> CacheRecord:
        """What a device that handled the latest revision has on disk;
        ``digest`` is what its backend had in force after its last good apply."""
        return CacheRecord(
            revision=self.revision,
            offset=offset,
            applied_revision=self.revision if applied_revision is None else applied_revision,
            fleet=tuple(self.fleet[n] for n in sorted(self.fleet)),
            bundle=self.snapshot(),
            digest=digest,
        )


# -- the fake host: carries out effects like the real shell ---------------------


class FakeHost:
    """Feeds events to one core and carries out its effects, in order.

    ``Apply`` is answered at once with ``ApplyResult(ok, state_digest(policies))``
    (or a failure, see :meth:`fail_next_applies`), unless ``hold_applies`` is
    set: then the Apply waits in ``pending`` until :meth:`finish_apply`.
    """

    def __init__(self, core_: AgentCore) -> None:
        self.core = core_
        self.now = 0.0
        self.backend_digest = EMPTY_DIGEST
        self.effects: list[core.Effect] = []  # every effect, in order
        self.applied: list[Apply] = []
        self.persisted: list[CacheRecord] = []
        self.acked: list[int] = []
        self.consumed: list[int | str] = []
        self.heartbeats: list[Heartbeat] = []
        self.reports: list[Report] = []
        self.emitted: list[Emit] = []
        self.hold_applies = False
        self.pending: list[Apply] = []
        self._failures: list[str] = []
        self._next_tag = 0
        self._next_offset = 100

    # -- events ----------------------------------------------------------------

    def feed(self, event: core.Event) -> list[core.Effect]:
        """Handle one event and every follow-up; return the effects carried out."""
        out: list[core.Effect] = []
        queue = list(self.core.handle(event))
        while queue:
            effect = queue.pop(0)
            out.append(effect)
            follow_up = self._carry_out(effect)
            if follow_up is not None:
                queue = self.core.handle(follow_up) + queue
        self.effects.extend(out)
        return out

    def start(self, cache: CacheRecord | None = None) -> list[core.Effect]:
        return self.feed(Started(self.now, cache))

    def link_up(self) -> list[core.Effect]:
        self._next_tag = 0  # delivery tags are per channel
        return self.feed(LinkUp(self.now))

    def link_lost(self) -> list[core.Effect]:
        return self.feed(LinkLost(self.now, "connection reset"))

    def tick(self, now: float) -> list[core.Effect]:
        self.now = now
        return self.feed(Tick(now))

    def deliver(self, body: bytes, *, offset: int | None = None) -> list[core.Effect]:
        return self.feed(self.delivery(body, offset=offset))

    def delivery(self, body: bytes, *, offset: int | None = None) -> Delivery:
        """The next delivery of the stream (tags and offsets count up)."""
        self._next_tag += 1
        if offset is None:
            offset = self._next_offset
        self._next_offset = offset + 1
        return Delivery(self.now, self._next_tag, offset, body)

    def finish_apply(self, *, ok: bool = True, error: str = "") -> list[core.Effect]:
        apply = self.pending.pop(0)
        return self.feed(self._result(apply, ok=ok, error=error))

    def fail_next_applies(self, count: int = 1, error: str = "daemon not running") -> None:
        self._failures.extend([error] * count)

    # -- effects ---------------------------------------------------------------

    def _result(self, apply: Apply, *, ok: bool, error: str = "") -> ApplyResult:
        if ok:
            self.backend_digest = state_digest(apply.policies)
        return ApplyResult(self.now, ok, self.backend_digest, error)

    def _carry_out(self, effect: core.Effect) -> core.Event | None:
        assert isinstance(effect, EFFECT_TYPES), f"unknown effect {effect!r}"
        match effect:
            case Apply():
                self.applied.append(effect)
                if self.hold_applies:
                    self.pending.append(effect)
                    return None
                if self._failures:
                    return self._result(effect, ok=False, error=self._failures.pop(0))
                return self._result(effect, ok=True)
            case Persist(record=record):
                self.persisted.append(record)
            case Ack(tag=tag):
                self.acked.append(tag)
            case Consume(offset=offset):
                self.consumed.append(offset)
            case SendHeartbeat(heartbeat=hb):
                self.heartbeats.append(hb)
            case Report():
                self.reports.append(effect)
            case Emit():
                self.emitted.append(effect)
        return None

    # -- what the device says ----------------------------------------------------

    @property
    def last_heartbeat(self) -> Heartbeat:
        assert self.heartbeats, "no heartbeat was sent"
        return self.heartbeats[-1]


def make_core(cp: ControlPlane, **kwargs: Any) -> AgentCore:
    kwargs.setdefault("heartbeat_interval", HEARTBEAT_INTERVAL)
    kwargs.setdefault("retry_interval", RETRY_INTERVAL)
    device = kwargs.pop("device", DEVICE)
    labels = kwargs.pop("labels", LABELS)
    return AgentCore(device, labels, cp.verifier, **kwargs)


def of_type(effects: Iterable[core.Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def kinds(effects: Iterable[core.Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


@pytest.fixture
def cp() -> ControlPlane:
    return ControlPlane()


@pytest.fixture
def host(cp: ControlPlane) -> FakeHost:
    """A device started without a cache, linked, consuming from "first"."""
    h = FakeHost(make_core(cp))
    h.start()
    h.link_up()
    return h


@pytest.fixture
def berlin_x(cp: ControlPlane, host: FakeHost) -> FakeHost:
    """A linked device at revision 1 with ``block-x`` (store=berlin) in force."""
    host.deliver(cp.delta(host_policy("block-x")))
    assert host.core.state.revision == 1
    assert host.core.state.in_force_digest == state_digest([host_policy("block-x")])
    return host


# -- refused bodies, by reason (rule 4) ------------------------------------------


def _envelope(cp: ControlPlane, **override: Any) -> bytes:
    signed = cp.signer.sign(
        Bundle(revision=2, issued_at=2.0, mode="delta", policies=(), sha256=cp.digest)
    )
    obj = {
        "v": 1,
        "kind": "bundle",
        "key_id": signed.key_id,
        "sig": signed.sig,
        "body": signed.body,
    }
    obj.update(override)
    obj = {k: v for k, v in obj.items() if v is not None}
    return cbor2.dumps(obj, canonical=True)


def _signed_raw(cp: ControlPlane, inner: dict[str, Any]) -> bytes:
    body = encode(inner)
    return SignedBundle(cp.signer.key_id, cp.signer.private_key.sign(body), body).encode()


def _revision_2(**override: Any) -> dict[str, Any]:
    obj = {
        "v": 1,
        "kind": "revision",
        "revision": 2,
        "issued_at": 2.0,
        "mode": "delta",
        "policies": [],
        "deleted": [],
        "sha256": "0" * 64,
    }
    obj.update(override)
    return {k: v for k, v in obj.items() if v is not None}


def _bad_signature(cp: ControlPlane) -> bytes:
    signed = cp.signer.sign(
        Bundle(revision=2, issued_at=2.0, mode="delta", policies=(), sha256=cp.digest)
    )
    sig = bytes([signed.sig[0] ^ 0x01]) + signed.sig[1:]
    return SignedBundle(signed.key_id, sig, signed.body).encode()


def _tampered_body(cp: ControlPlane) -> bytes:
    """A good signature over a body someone then changed (another policy slipped in)."""
    signed = cp.signer.sign(
        Bundle(revision=2, issued_at=2.0, mode="delta", policies=(), sha256=cp.digest)
    )
    evil = Bundle(
        revision=2,
        issued_at=2.0,
        mode="delta",
        policies=(host_policy("allow-all", action="Allow"),),
        sha256=cp.digest,
    )
    return SignedBundle(signed.key_id, signed.sig, evil.encode_body()).encode()


def _unknown_key(cp: ControlPlane) -> bytes:
    stranger = Signer.generate()
    return cp.sign(
        Bundle(
            revision=2,
            issued_at=2.0,
            mode="delta",
            policies=(host_policy("allow-all", action="Allow"),),
            sha256=cp.digest,
        ),
        signer=stranger,
    )


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _heartbeat_on_the_stream(cp: ControlPlane) -> bytes:
    return Heartbeat("pos-paris-07", 1.0, 1, 1, EMPTY_DIGEST, "ok").encode()


REFUSALS = [
    # (id, body builder, counted reason)
    ("garbage", lambda cp: b"\xff\x00\x13\x37", "malformed"),
    ("truncated-cbor", lambda cp: b"\x9f", "malformed"),
    ("cbor-not-a-map", lambda cp: cbor2.dumps([1, 2, 3]), "malformed"),
    ("empty-body", lambda cp: b"", "malformed"),
    ("too-large", lambda cp: b"\x00" * (MAX_BODY_BYTES + 1), "too_large"),
    ("too-deep", lambda cp: _envelope(cp, x=_nested(MAX_DEPTH)), "too_deep"),
    ("a-tag", lambda cp: _envelope(cp, issued=cbor2.CBORTag(1, 0)), "malformed"),
    ("envelope-with-an-extra-field", lambda cp: _envelope(cp, x=1), "malformed"),
    ("version-true", lambda cp: _envelope(cp, v=True), "unknown_version"),
    ("unknown-version", lambda cp: _envelope(cp, v=2), "unknown_version"),
    ("no-version", lambda cp: _envelope(cp, v=None), "unknown_version"),
    ("not-a-bundle", _heartbeat_on_the_stream, "unknown_kind"),
    ("envelope-without-sig", lambda cp: _envelope(cp, sig=None), "malformed"),
    ("key-id-not-a-string", lambda cp: _envelope(cp, key_id=7), "malformed"),
    ("bad-signature", _bad_signature, "bad_signature"),
    ("tampered-body", _tampered_body, "bad_signature"),
    ("unknown-key-id", _unknown_key, "unknown_key"),
    ("forged-key-id", lambda cp: _envelope(cp, key_id="0123456789abcdef"), "unknown_key"),
    (
        "signed-body-of-another-kind",
        lambda cp: _signed_raw(cp, _revision_2(kind="x")),
        "unknown_kind",
    ),
    (
        "signed-body-without-digest",
        lambda cp: _signed_raw(cp, _revision_2(sha256=None)),
        "malformed",
    ),
    (
        "signed-body-unknown-mode",
        lambda cp: _signed_raw(cp, _revision_2(mode="merge")),
        "malformed",
    ),
    ("signed-body-revision-0", lambda cp: _signed_raw(cp, _revision_2(revision=0)), "malformed"),
    (
        "signed-policy-without-name",
        lambda cp: _signed_raw(cp, _revision_2(policies=[{"kind": "KubeArmorHostPolicy"}])),
        "malformed",
    ),
    (
        "signed-body-unknown-version",
        lambda cp: _signed_raw(cp, _revision_2(v=9)),
        "unknown_version",
    ),
]


# == protocol misuse =============================================================


@pytest.mark.parametrize(
    "event",
    [
        LinkUp(0.0),
        LinkLost(0.0),
        Delivery(0.0, 1, 0, b""),
        ApplyResult(0.0, True, EMPTY_DIGEST),
        Tick(0.0),
    ],
    ids=lambda e: type(e).__name__,
)
def test_agent_refuses_any_event_before_started(cp: ControlPlane, event: core.Event) -> None:
    # Given a core that has not been started
    agent = make_core(cp)
    # When anything but Started arrives
    # Then it is our own code's mistake
    with pytest.raises(LocalProtocolError, match="before Started"):
        agent.handle(event)


def test_agent_refuses_to_be_started_twice(cp: ControlPlane) -> None:
    # Given a started core
    agent = make_core(cp)
    agent.handle(Started(0.0))
    # When it is started again
    # Then that is refused
    with pytest.raises(LocalProtocolError):
        agent.handle(Started(1.0))


def test_agent_refuses_a_delivery_while_the_link_is_down(cp: ControlPlane) -> None:
    # Given a started device that has no link
    host = FakeHost(make_core(cp))
    host.start()
    # When a delivery arrives anyway
    # Then the host misused the core
    with pytest.raises(LocalProtocolError):
        host.deliver(cp.delta(host_policy("block-x")))


def test_agent_refuses_an_apply_result_it_did_not_ask_for(host: FakeHost) -> None:
    # Given a linked device with no apply in flight
    # When an ApplyResult arrives
    # Then the host misused the core
    with pytest.raises(LocalProtocolError):
        host.feed(ApplyResult(host.now, True, EMPTY_DIGEST))


def test_agent_refuses_something_that_is_not_an_event(cp: ControlPlane) -> None:
    # Given a started core
    agent = make_core(cp)
    agent.handle(Started(0.0))

    # When it is handed something with a time that is no agent event
    @dataclass(frozen=True)
    class Reboot:
        now: float

    # Then it says so
    with pytest.raises(LocalProtocolError, match="not an agent event"):
        agent.handle(Reboot(1.0))  # type: ignore[arg-type]


# == rule 1: the cache is put in force first ===================================


def test_agent_starts_empty_and_ok_without_a_cache(cp: ControlPlane) -> None:
    # Given a device with nothing on disk
    host = FakeHost(make_core(cp))
    # When it starts
    effects = host.start()
    # Then nothing is applied or consumed, and it is at revision 0 with nothing in force
    assert effects == []
    assert host.core.state.revision == 0
    assert host.core.state.status == "ok"
    assert host.core.state.in_force_digest == EMPTY_DIGEST


def test_agent_puts_cached_policies_in_force_before_touching_the_network(
    cp: ControlPlane,
) -> None:
    # Given a cache holding revision 2 with a berlin and a paris policy
    cp.delta(host_policy("block-x"))
    cp.delta(host_policy("block-y", store="paris", path="/usr/bin/y"))
    cache = cp.cache(offset=41)
    host = FakeHost(make_core(cp))
    # When the device starts (no link yet)
    effects = host.start(cache)
    # Then the first effect puts the berlin policy of revision 2 in force
    assert isinstance(effects[0], Apply)
    assert names(effects[0].policies) == ["block-x"]
    assert effects[0].revision == 2
    # And nothing touched the network
    assert of_type(effects, Consume) == []
    assert of_type(effects, SendHeartbeat) == []
    assert of_type(effects, Ack) == []
    # And the device now enforces the cached set at revision 2
    state = host.core.state
    assert (state.revision, state.offset, state.status) == (2, 41, "ok")
    assert state.in_force_digest == state_digest([host_policy("block-x")])


def test_agent_applies_an_empty_set_when_no_cached_policy_selects_it(cp: ControlPlane) -> None:
    # Given a cache whose only policy selects store=paris
    cp.delta(host_policy("block-y", store="paris"))
    host = FakeHost(make_core(cp))
    # When a berlin device starts from it
    effects = host.start(cp.cache())
    # Then it still puts the (empty) cached set in force first
    assert isinstance(effects[0], Apply)
    assert effects[0].policies == ()
    assert host.core.state.revision == 1


def test_agent_reports_the_cached_revision_once_linked(cp: ControlPlane) -> None:
    # Given a device started from a cache at revision 3
    cp.delta(host_policy("block-x"))
    cp.delta(host_policy("block-y", path="/usr/bin/y"))
    cp.delta(host_policy("block-z", store="paris"))
    host = FakeHost(make_core(cp))
    host.start(cp.cache(offset=7))
    # When the link comes up
    effects = host.link_up()
    # Then it consumes after the cached offset and reports what is in force at once
    assert effects[0] == Consume(8)
    hb = host.last_heartbeat
    assert (hb.revision, hb.applied_revision, hb.status) == (3, 3, "ok")
    assert hb.hash == state_digest(
        [host_policy("block-x"), host_policy("block-y", path="/usr/bin/y")]
    )
    assert hb.rejected == {}


def _fleet_altered(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    evil = host_policy("block-x", action="Allow")
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, (evil,), cache.bundle)


def _policy_added(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    fleet = (*cache.fleet, host_policy("allow-shell", path="/bin/sh", action="Allow"))
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, fleet, cache.bundle)


def _policy_removed(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, (), cache.bundle)


def _unknown_signer(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    stranger = ControlPlane(Signer.generate())
    stranger.fleet = dict(cp.fleet)
    stranger.revision = cp.revision
    return CacheRecord(
        cache.revision, cache.offset, cache.applied_revision, cache.fleet, stranger.snapshot()
    )


def _bad_cache_signature(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    signed = SignedBundle.from_message(decode(cache.bundle))
    sig = bytes([signed.sig[0] ^ 0x80]) + signed.sig[1:]
    bundle = SignedBundle(signed.key_id, sig, signed.body).encode()
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, cache.fleet, bundle)


def _revision_raised(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    return CacheRecord(99, cache.offset, cache.applied_revision, cache.fleet, cache.bundle)


def _bundle_garbage(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, cache.fleet, b"\xff")


def _bundle_missing(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, cache.fleet, b"")


def _fleet_unreadable(cp: ControlPlane, cache: CacheRecord) -> CacheRecord:
    fleet = ({"kind": "KubeArmorHostPolicy", "spec": {}},)
    return CacheRecord(cache.revision, cache.offset, cache.applied_revision, fleet, cache.bundle)


@pytest.mark.parametrize(
    "tamper",
    [
        _fleet_altered,
        _policy_added,
        _policy_removed,
        _unknown_signer,
        _bad_cache_signature,
        _revision_raised,
        _bundle_garbage,
        _bundle_missing,
        _fleet_unreadable,
    ],
    ids=lambda f: f.__name__.strip("_").replace("_", "-"),
)
def test_agent_does_not_trust_a_tampered_cache(cp: ControlPlane, tamper) -> None:
    # Given a good cache at revision 2 that was then tampered with
    cp.delta(host_policy("block-x"))
    cp.delta(host_policy("block-y", path="/usr/bin/y"))
    cache = tamper(cp, cp.cache(offset=41))
    host = FakeHost(make_core(cp))
    # When the device starts from it
    effects = host.start(cache)
    # Then nothing of it is put in force and the device starts empty at revision 0
    assert of_type(effects, Apply) == []
    state = host.core.state
    assert (state.revision, state.offset, state.fleet) == (0, None, {})
    assert state.in_force_digest == EMPTY_DIGEST
    # And the corrupt cache is counted and said
    assert state.rejected == Counter({"cache_corrupt": 1})
    assert [r.level for r in of_type(effects, Report)] == ["warning"]
    # And the stream is read again from the first message
    assert host.link_up()[0] == Consume("first")
    assert host.last_heartbeat.rejected == {"cache_corrupt": 1}


def test_agent_resumes_from_what_it_persisted(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a device that handled revisions 1 and 2 and persisted them
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")), offset=250)
    record = berlin_x.persisted[-1]
    # When a new device process starts from that record
    host = FakeHost(make_core(cp))
    effects = host.start(record)
    # Then the record is trusted and its set put in force
    assert isinstance(effects[0], Apply)
    assert names(effects[0].policies) == ["block-x", "block-y"]
    assert host.core.state.rejected == Counter()
    assert host.core.state.revision == 2
    # And consumption resumes after the persisted offset
    assert host.link_up()[0] == Consume(251)


def test_agent_queues_deliveries_until_the_cached_set_is_in_force(cp: ControlPlane) -> None:
    # Given a device whose startup apply of cached revision 1 is still running
    cp.delta(host_policy("block-x"))
    host = FakeHost(make_core(cp))
    host.hold_applies = True
    host.start(cp.cache(offset=5))
    host.link_up()
    # When revision 2 is delivered meanwhile
    effects = host.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")), offset=6)
    # Then it waits
    assert effects == []
    # When the startup apply finishes
    host.hold_applies = False
    effects = host.finish_apply()
    # Then revision 2 is handled after it
    assert kinds(effects)[:2] == ["SendHeartbeat", "Apply"]
    assert host.core.state.revision == 2
    assert host.acked == [1]


# == rule 2: where consumption starts, and what a lost link forgets ============


def test_agent_consumes_from_first_without_a_cache(cp: ControlPlane) -> None:
    # Given a device started without a cache
    host = FakeHost(make_core(cp))
    host.start()
    # When the link comes up
    effects = host.link_up()
    # Then it consumes the stream from its first message and reports at once
    assert kinds(effects) == ["Consume", "SendHeartbeat"]
    assert effects[0] == Consume("first")
    assert host.last_heartbeat.revision == 0


def test_agent_consumes_after_the_cached_offset(cp: ControlPlane) -> None:
    # Given a device started from a cache stored at stream offset 41
    cp.delta(host_policy("block-x"))
    host = FakeHost(make_core(cp))
    host.start(cp.cache(offset=41))
    # When the link comes up
    effects = host.link_up()
    # Then it consumes from offset 42
    assert effects[0] == Consume(42)


def test_agent_consumes_from_first_when_the_cache_has_no_offset(cp: ControlPlane) -> None:
    # Given a cache without a stream offset
    cp.delta(host_policy("block-x"))
    host = FakeHost(make_core(cp))
    host.start(cp.cache(offset=None))
    # When the link comes up
    # Then it consumes from the first message
    assert host.link_up()[0] == Consume("first")


def test_agent_resumes_after_the_last_handled_delivery_on_reconnect(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device that handled offsets up to 205, the last one refused
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")), offset=204)
    berlin_x.deliver(b"\xff", offset=205)
    # When the link is lost and comes back
    berlin_x.link_lost()
    effects = berlin_x.link_up()
    # Then it consumes after the last delivery it handled, refused or not
    assert effects[0] == Consume(206)


def test_agent_forgets_queued_deliveries_when_the_link_is_lost(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given revision 1 being applied and revisions 2 and 3 queued behind it
    host.hold_applies = True
    host.deliver(cp.delta(host_policy("block-x")), offset=10)
    host.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")), offset=11)
    host.deliver(cp.delta(host_policy("block-z", path="/usr/bin/z")), offset=12)
    # When the link is lost and then the apply finishes
    host.link_lost()
    host.hold_applies = False
    effects = host.finish_apply()
    # Then only revision 1 was handled; 2 and 3 were forgotten, not acked
    assert host.core.state.revision == 1
    assert of_type(effects, Apply) == []
    assert 2 not in host.acked and 3 not in host.acked
    assert [r.offset for r in host.persisted] == [10]
    # And the broker gives them again after the next LinkUp
    assert host.link_up()[0] == Consume(11)


def test_agent_sends_nothing_while_the_link_is_lost(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a linked device
    # When the link is lost
    effects = berlin_x.link_lost()
    # Then the core asks for nothing
    assert effects == []
    assert berlin_x.core.state.link_up is False


def test_agent_asks_to_consume_only_after_the_apply_in_flight_finished(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given revision 1 being applied when the link drops and comes back
    host.hold_applies = True
    host.deliver(cp.delta(host_policy("block-x")), offset=10)
    host.link_lost()
    effects = host.link_up()
    # Then it does not consume yet
    assert effects == []
    # When the apply finishes
    host.hold_applies = False
    effects = host.finish_apply()
    # Then it consumes after the delivery it just handled
    assert Consume(11) in effects
    assert host.core.state.revision == 1


def test_agent_never_acks_a_delivery_of_a_lost_link_on_the_next_link(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given revision 1 (tag 1 of the old channel) being applied
    host.hold_applies = True
    host.deliver(cp.delta(host_policy("block-x")), offset=10)
    # When the link drops, comes back, and then the apply finishes
    host.link_lost()
    host.link_up()
    host.hold_applies = False
    effects = host.finish_apply()
    # Then the revision is kept and persisted, consumption resumes after it...
    assert host.core.state.revision == 1
    assert Consume(11) in effects
    # ...and the dead channel's tag 1 is not acked on the new channel
    assert of_type(effects, Ack) == []


# == rule 3: every delivery acked exactly once, never rejected =================


def test_agent_has_no_effect_that_rejects_a_delivery() -> None:
    # Given the effects the core can return
    effect_names = {t.__name__ for t in EFFECT_TYPES}
    # Then none of them nacks or rejects, and the module defines none
    assert not effect_names & {"Nack", "Reject"}
    assert not hasattr(core, "Nack") and not hasattr(core, "Reject")


def test_agent_acks_every_delivery_exactly_once_whatever_it_holds(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given a stream mixing good, refused, stale, gapped, skipped and recovering bundles
    rev1 = cp.delta(host_policy("block-x"))
    bodies = [
        rev1,
        b"\xff\x00",
        cp.delta(host_policy("block-p", store="paris")),  # unchanged set
        rev1,  # stale replay
        _unknown_key(cp),
    ]
    cp.skip()
    bodies += [
        cp.delta(host_policy("block-y", path="/usr/bin/y")),  # gap
        cp.delta(host_policy("block-z", path="/usr/bin/z")),  # skipped while waiting
        cp.snapshot(),  # recovery
        cp.snapshot(),  # same revision: skipped silently
    ]
    # When each is delivered
    tags = []
    for body in bodies:
        delivery = host.delivery(body)
        tags.append(delivery.tag)
        effects = host.feed(delivery)
        # Then each delivery is acked once, in the effects of its own handling
        assert [a.tag for a in of_type(effects, Ack)] == [delivery.tag]
    # And nothing else was ever acked
    assert host.acked == tags
    assert host.core.state.revision == cp.revision


def test_agent_acks_a_delivery_only_after_its_apply_finished(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given a delivery that changes the device's set
    host.hold_applies = True
    # When it is delivered
    effects = host.deliver(cp.delta(host_policy("block-x")))
    # Then the core applies and waits: no ack, no persist yet
    assert kinds(effects) == ["Apply"]
    assert host.acked == [] and host.persisted == []
    # When the apply finishes
    effects = host.finish_apply()
    # Then it persists, acks and reports, in that order
    assert kinds(effects) == ["Persist", "Ack", "SendHeartbeat"]


# == rule 4: refused deliveries change nothing =================================


@pytest.mark.parametrize(
    ("make_body", "reason"),
    [(make, reason) for _, make, reason in REFUSALS],
    ids=[name for name, _, _ in REFUSALS],
)
def test_agent_keeps_last_good_policy_when_a_delivery_is_refused(
    cp: ControlPlane, berlin_x: FakeHost, make_body, reason: str
) -> None:
    # Given a device at revision 1 with block-x in force
    before = copy.deepcopy(berlin_x.core.state.fleet)
    digest = berlin_x.core.state.in_force_digest
    persisted = len(berlin_x.persisted)
    # When a delivery arrives that is refused for `reason`
    delivery = berlin_x.delivery(make_body(cp))
    effects = berlin_x.feed(delivery)
    # Then it is counted under that reason and acked, once
    assert berlin_x.core.state.rejected == Counter({reason: 1})
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    # And nothing is applied or persisted: revision, fleet and set in force stay
    assert of_type(effects, Apply) == [] and len(berlin_x.persisted) == persisted
    state = berlin_x.core.state
    assert (state.revision, state.fleet, state.in_force_digest) == (1, before, digest)
    assert state.awaiting_snapshot is False
    # And a heartbeat says so at once, with the set in force unchanged
    hb = of_type(effects, SendHeartbeat)[-1].heartbeat
    assert hb.rejected == {reason: 1}
    assert (hb.revision, hb.hash, hb.status) == (1, digest, "ok")
    assert of_type(effects, Report)[0].level == "warning"


def test_agent_counts_each_refusal_under_its_own_reason(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1
    # When three garbage bodies, two of an unknown key and one badly signed arrive
    for body in [b"\xff", b"\x9f", b"", _unknown_key(cp), _unknown_key(cp), _bad_signature(cp)]:
        berlin_x.deliver(body)
    # Then each reason is counted on its own
    assert berlin_x.last_heartbeat.rejected == {
        "malformed": 3,
        "unknown_key": 2,
        "bad_signature": 1,
    }
    # And the next good revision still applies
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    assert berlin_x.core.state.revision == 2
    assert berlin_x.last_heartbeat.rejected == {
        "malformed": 3,
        "unknown_key": 2,
        "bad_signature": 1,
    }


# == rule 5: deltas in order; stale; gaps ======================================


def test_agent_applies_deltas_in_order(cp: ControlPlane, host: FakeHost) -> None:
    # Given three deltas: add x, add y, delete x
    bodies = [
        cp.delta(host_policy("block-x")),
        cp.delta(host_policy("block-y", path="/usr/bin/y")),
        cp.delta(delete=["block-x"]),
    ]
    # When they are delivered in order
    for body in bodies:
        host.deliver(body)
    # Then each one was applied on top of the previous one
    assert [(a.revision, names(a.policies)) for a in host.applied] == [
        (1, ["block-x"]),
        (2, ["block-x", "block-y"]),
        (3, ["block-y"]),
    ]
    # And the device reports revision 3 with block-y in force
    hb = host.last_heartbeat
    assert (hb.revision, hb.applied_revision, hb.status) == (3, 3, "ok")
    assert hb.hash == state_digest([host_policy("block-y", path="/usr/bin/y")])
    assert set(host.core.state.fleet) == {"block-y"}


def test_agent_replaces_a_changed_policy_of_the_same_name(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given block-x in force in Block mode
    # When a delta changes block-x to Audit
    effects = berlin_x.deliver(cp.delta(host_policy("block-x", action="Audit")))
    # Then the changed document is applied
    (apply,) = of_type(effects, Apply)
    assert [p["spec"]["action"] for p in apply.policies] == ["Audit"]


def test_agent_persists_revision_offset_and_fleet_in_one_record_before_acking(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1
    body = cp.delta(
        host_policy("block-y", path="/usr/bin/y"), host_policy("block-p", store="paris")
    )
    # When revision 2 arrives at stream offset 300
    delivery = berlin_x.delivery(body, offset=300)
    effects = berlin_x.feed(delivery)
    # Then exactly one record is persisted, holding everything, before the ack
    (persist,) = of_type(effects, Persist)
    assert effects.index(persist) < effects.index(Ack(delivery.tag))
    assert effects.index(of_type(effects, Apply)[0]) < effects.index(persist)
    record = persist.record
    assert record.revision == 2
    assert record.offset == 300
    assert record.applied_revision == 2
    assert names(record.fleet) == ["block-p", "block-x", "block-y"]
    assert state_digest(record.fleet) == cp.digest
    assert record.bundle == body


@pytest.mark.parametrize(
    "replay",
    [
        pytest.param(lambda cp: cp.history[1], id="older-delta"),
        pytest.param(lambda cp: cp.history[2], id="delta-of-the-current-revision"),
        pytest.param(lambda cp: cp.snapshot(revision=1), id="older-snapshot"),
    ],
)
def test_agent_refuses_a_replayed_older_revision_as_stale(
    cp: ControlPlane, host: FakeHost, replay
) -> None:
    # Given a device at revision 2
    host.deliver(cp.delta(host_policy("block-x")))
    host.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    digest = host.core.state.in_force_digest
    fleet = dict(host.core.state.fleet)
    applies = len(host.applied)
    # When an older (or the same) revision is replayed, properly signed
    delivery = host.delivery(replay(cp))
    effects = host.feed(delivery)
    # Then it is refused as stale, acked, and changes nothing
    assert host.core.state.rejected == Counter({"stale": 1})
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    assert len(host.applied) == applies and of_type(effects, Persist) == []
    state = host.core.state
    assert (state.revision, state.fleet, state.in_force_digest) == (2, fleet, digest)
    assert host.last_heartbeat.rejected == {"stale": 1}


def test_agent_waits_for_a_snapshot_after_a_gap(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a device at revision 1 that never sees revision 2
    cp.skip()
    digest = berlin_x.core.state.in_force_digest
    # When revision 3 arrives
    delivery = berlin_x.delivery(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    effects = berlin_x.feed(delivery)
    # Then it is acked but not applied, and the gap is counted (not as a rejection)
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    assert of_type(effects, Apply) == [] and of_type(effects, Persist) == []
    state = berlin_x.core.state
    assert (state.revision, state.in_force_digest, state.gaps) == (1, digest, 1)
    assert state.rejected == Counter()
    # And a heartbeat says at once that the device awaits a snapshot
    hb = of_type(effects, SendHeartbeat)[-1].heartbeat
    assert hb.awaiting_snapshot is True and hb.gaps == 1
    assert of_type(effects, Report)[0].level == "warning"


def test_agent_skips_deltas_while_awaiting_a_snapshot_without_counting_them(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device awaiting a snapshot after a gap
    cp.skip()
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # When further deltas arrive, the next one in line included
    for body in [
        cp.delta(host_policy("block-z", path="/usr/bin/z")),
        cp.delta(host_policy("block-w", path="/usr/bin/w")),
    ]:
        delivery = berlin_x.delivery(body)
        effects = berlin_x.feed(delivery)
        # Then each is only acked
        assert effects == [Ack(delivery.tag)]
    # And nothing moved and nothing was counted as refused or as a further gap
    state = berlin_x.core.state
    assert (state.revision, state.gaps, state.awaiting_snapshot) == (1, 1, True)
    assert state.rejected == Counter()


def test_agent_says_it_awaits_a_snapshot_in_every_heartbeat(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device awaiting a snapshot after a gap at t=0
    cp.skip()
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    sent = len(berlin_x.heartbeats)
    # When time passes over several heartbeat intervals
    for now in (10.0, 20.0, 30.0):
        berlin_x.tick(now)
    # Then every heartbeat says so
    later = berlin_x.heartbeats[sent:]
    assert len(later) == 3
    assert all(hb.awaiting_snapshot and hb.gaps == 1 for hb in later)


def test_agent_recovers_from_a_gap_with_a_snapshot(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a device awaiting a snapshot after a gap (revision 2 lost, 3 seen)
    cp.skip()
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y"), delete=["block-x"]))
    # When the control plane answers with a snapshot of revision 3
    delivery = berlin_x.delivery(cp.snapshot(), offset=500)
    effects = berlin_x.feed(delivery)
    # Then revision 3's set is put in force, persisted and acked
    (apply,) = of_type(effects, Apply)
    assert (apply.revision, names(apply.policies)) == (3, ["block-y"])
    assert of_type(effects, Persist)[0].record.offset == 500
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    # And the wait is over: the heartbeat says so and the next delta applies
    hb = berlin_x.last_heartbeat
    assert (hb.revision, hb.awaiting_snapshot, hb.status) == (3, False, "ok")
    assert hb.gaps == 1
    assert any(r.level == "info" and "recovered" in r.text for r in of_type(effects, Report))
    berlin_x.deliver(cp.delta(host_policy("block-z", path="/usr/bin/z")))
    assert berlin_x.core.state.revision == 4


def test_agent_treats_a_fresh_stream_starting_after_revision_one_as_a_gap(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given a fresh device and a stream whose retention dropped revisions 1..4
    for _ in range(4):
        cp.delta(host_policy("block-x"))
    # When the first delta it sees is revision 5
    host.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # Then it waits for a snapshot instead of building on nothing
    assert host.core.state.awaiting_snapshot is True
    assert host.applied == []
    # And the snapshot brings it to revision 5
    host.deliver(cp.snapshot())
    assert host.core.state.revision == 5
    assert names(host.applied[-1].policies) == ["block-x", "block-y"]


# == rule 6: snapshots ===========================================================


def test_agent_replaces_its_fleet_state_with_a_newer_snapshot(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1 with block-x, and a control plane at revision 3
    # that dropped block-x and added block-y
    cp.delta(host_policy("block-y", path="/usr/bin/y"))
    cp.delta(delete=["block-x"])
    # When the snapshot of revision 3 arrives
    effects = berlin_x.deliver(cp.snapshot())
    # Then the fleet state is replaced, not merged
    assert set(berlin_x.core.state.fleet) == {"block-y"}
    (apply,) = of_type(effects, Apply)
    assert names(apply.policies) == ["block-y"]
    assert berlin_x.core.state.revision == 3


def test_agent_skips_a_snapshot_of_its_current_revision_silently(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1
    state_before = copy.deepcopy(berlin_x.core.state)
    # When the snapshot of revision 1 (same digest) arrives
    delivery = berlin_x.delivery(cp.snapshot())
    effects = berlin_x.feed(delivery)
    # Then it is only acked: nothing applied, persisted, counted or reported
    assert effects == [Ack(delivery.tag)]
    state = berlin_x.core.state
    assert state.rejected == Counter() and state.gaps == 0
    assert (state.revision, state.fleet, state.in_force_digest) == (
        state_before.revision,
        state_before.fleet,
        state_before.in_force_digest,
    )


def test_agent_refuses_a_snapshot_of_its_current_revision_with_another_digest(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1 with block-x
    # And a signed snapshot claiming revision 1 but holding another fleet state
    other = ControlPlane(cp.signer)
    other.delta(host_policy("allow-all", action="Allow"))
    # When it arrives
    delivery = berlin_x.delivery(other.snapshot())
    effects = berlin_x.feed(delivery)
    # Then it is refused, counted, acked, and block-x stays in force
    assert berlin_x.core.state.rejected == Counter({"conflicting_snapshot": 1})
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    assert of_type(effects, Apply) == []
    assert set(berlin_x.core.state.fleet) == {"block-x"}


def test_agent_refuses_an_older_snapshot_as_stale(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a snapshot of revision 1, and a device that then moved to revision 2
    old = cp.snapshot()
    berlin_x.deliver(cp.delta(delete=["block-x"]))
    # When the old snapshot is delivered again
    effects = berlin_x.deliver(old)
    # Then it is refused as stale and block-x does not come back
    assert berlin_x.core.state.rejected == Counter({"stale": 1})
    assert of_type(effects, Apply) == []
    assert berlin_x.core.state.fleet == {}
    assert berlin_x.core.state.revision == 2


def test_agent_accepts_a_snapshot_when_it_has_no_state_yet(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given a fresh device at revision 0 and a control plane at revision 2
    cp.delta(host_policy("block-x"))
    cp.delta(host_policy("block-p", store="paris"))
    # When the snapshot arrives
    effects = host.deliver(cp.snapshot())
    # Then only its own policies are put in force, at revision 2
    (apply,) = of_type(effects, Apply)
    assert (apply.revision, names(apply.policies)) == (2, ["block-x"])
    assert names(host.core.state.fleet.values()) == ["block-p", "block-x"]


# == rule 7: the signed digest must match ======================================


def test_agent_awaits_a_snapshot_when_a_delta_does_not_match_its_signed_digest(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1 with block-x
    digest = berlin_x.core.state.in_force_digest
    # And a signed revision-2 delta whose digest is not that of the state it yields
    bad = cp.sign(
        Bundle(
            revision=2,
            issued_at=2.0,
            mode="delta",
            policies=(host_policy("block-y", path="/usr/bin/y"),),
            sha256=state_digest([host_policy("something-else")]),
        )
    )
    # When it arrives
    delivery = berlin_x.delivery(bad)
    effects = berlin_x.feed(delivery)
    # Then nothing is applied or persisted, it is acked, and the device awaits a snapshot
    assert of_type(effects, Apply) == [] and of_type(effects, Persist) == []
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    state = berlin_x.core.state
    assert (state.revision, state.in_force_digest, state.awaiting_snapshot) == (1, digest, True)
    assert set(state.fleet) == {"block-x"}
    assert of_type(effects, SendHeartbeat)[-1].heartbeat.awaiting_snapshot is True
    # And the control plane's snapshot recovers it
    cp.delta(host_policy("block-y", path="/usr/bin/y"))
    berlin_x.deliver(cp.snapshot())
    assert (berlin_x.core.state.revision, berlin_x.core.state.awaiting_snapshot) == (2, False)


def test_agent_refuses_a_snapshot_that_does_not_match_its_signed_digest(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device at revision 1 and a signed revision-2 snapshot with a wrong digest
    cp.delta(host_policy("allow-all", action="Allow"))
    bad = cp.snapshot(sha256="0" * 64)
    # When it arrives
    effects = berlin_x.deliver(bad)
    # Then it is refused as digest_mismatch and changes nothing
    assert berlin_x.core.state.rejected == Counter({"digest_mismatch": 1})
    assert of_type(effects, Apply) == []
    assert berlin_x.core.state.revision == 1
    assert set(berlin_x.core.state.fleet) == {"block-x"}


# == rule 8: selection, apply, persist, ack, heartbeat =========================


def test_agent_does_not_apply_a_policy_for_another_store_but_advances_the_revision(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a berlin device at revision 1 with block-x in force
    digest = berlin_x.core.state.in_force_digest
    # When revision 2 adds a policy selecting store=paris
    delivery = berlin_x.delivery(cp.delta(host_policy("block-y", store="paris")), offset=400)
    effects = berlin_x.feed(delivery)
    # Then nothing is applied, the set in force stays
    assert of_type(effects, Apply) == []
    assert berlin_x.core.state.in_force_digest == digest
    # But the fleet revision advances, holding the paris policy, and is persisted then acked
    assert kinds(effects)[:2] == ["Persist", "Ack"]
    record = of_type(effects, Persist)[0].record
    assert (record.revision, record.offset) == (2, 400)
    assert names(record.fleet) == ["block-x", "block-y"]
    assert berlin_x.core.state.revision == 2
    assert berlin_x.core.state.status == "ok"


def test_agent_persists_and_acks_without_apply_when_its_set_is_unchanged(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a berlin device at revision 1
    # When revision 2 re-sends block-x unchanged and deletes a name the fleet never had
    delivery = berlin_x.delivery(cp.delta(host_policy("block-x"), delete=["no-such-policy"]))
    effects = berlin_x.feed(delivery)
    # Then it is persisted and acked, without an apply
    assert of_type(effects, Apply) == []
    assert kinds(effects)[:2] == ["Persist", "Ack"]
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    assert berlin_x.core.state.revision == 2


def test_agent_removes_a_deleted_policy_from_force(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given block-x in force
    # When revision 2 deletes it
    effects = berlin_x.deliver(cp.delta(delete=["block-x"]))
    # Then the empty set is put in force and reported
    (apply,) = of_type(effects, Apply)
    assert apply.policies == ()
    assert berlin_x.last_heartbeat.hash == EMPTY_DIGEST


def test_agent_sends_a_heartbeat_at_once_after_a_change(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a device whose last heartbeat went out at t=0
    berlin_x.now = 3.0
    # When revision 2 changes its set at t=3
    effects = berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # Then a heartbeat reporting the new set goes out right after the ack
    assert kinds(effects) == ["Apply", "Persist", "Ack", "SendHeartbeat"]
    hb = effects[-1].heartbeat
    assert (hb.time, hb.revision, hb.applied_revision) == (3.0, 2, 2)
    assert hb.hash == state_digest(
        [host_policy("block-x"), host_policy("block-y", path="/usr/bin/y")]
    )
    # And the next periodic one is a full interval later
    assert berlin_x.tick(12.0) == []
    assert kinds(berlin_x.tick(13.0)) == ["SendHeartbeat"]


@pytest.mark.parametrize(
    ("policy", "applies"),
    [
        (host_policy("p", match_labels={"store": "berlin"}), True),
        (host_policy("p", match_labels={"store": "paris"}), False),
        (host_policy("p", match_labels={"store": "berlin", "tier": "pos"}), True),
        (host_policy("p", match_labels={"store": "berlin", "tier": "kiosk"}), False),
        (host_policy("p", match_labels={"region": "eu"}), False),
        (host_policy("p", match_labels={"kubearmor.io/hostname": DEVICE}), True),
        (host_policy("p", match_labels={"kubearmor.io/hostname": f"pos-paris-1, {DEVICE}"}), True),
        (host_policy("p", match_labels={"kubearmor.io/hostname": "pos-berlin-02"}), False),
        (host_policy("p", match_labels={"kubearmor.io/hostname": "*"}), True),
        (host_policy("p", match_labels={"kubearmor.io/hostnamereg": "pos-berlin-*"}), True),
        (host_policy("p", match_labels={"kubearmor.io/hostnamereg": "pos-[0-9]+"}), False),
        (host_policy("p", match_labels={}), False),
        (container_policy("p"), True),
    ],
    ids=[
        "own-store",
        "other-store",
        "all-labels-match",
        "one-label-differs",
        "label-it-lacks",
        "own-hostname",
        "hostname-in-a-list",
        "other-hostname",
        "hostname-star",
        "hostname-regex",
        "hostname-regex-not-matching",
        "empty-selector",
        "container-policy",
    ],
)
def test_agent_applies_exactly_the_policies_that_select_it(
    cp: ControlPlane, host: FakeHost, policy: dict[str, Any], applies: bool
) -> None:
    # Given a fresh device pos-berlin-01 {store: berlin, tier: pos}
    # When a revision adds the policy
    effects = host.deliver(cp.delta(policy))
    # Then it is applied exactly when its selector selects the device
    assert [names(a.policies) for a in of_type(effects, Apply)] == ([["p"]] if applies else [])
    # And the revision advances either way
    assert host.core.state.revision == 1


def test_agent_applies_its_whole_set_sorted_by_name(cp: ControlPlane, host: FakeHost) -> None:
    # Given a revision with several policies for several stores
    body = cp.delta(
        host_policy("c-block", path="/usr/bin/c"),
        host_policy("a-block", path="/usr/bin/a"),
        host_policy("b-paris", store="paris"),
        container_policy("d-container"),
    )
    # When it is delivered
    effects = host.deliver(body)
    # Then the device's whole set (not only the delta) is applied, by name
    (apply,) = of_type(effects, Apply)
    assert [p["metadata"]["name"] for p in apply.policies] == ["a-block", "c-block", "d-container"]


def test_agent_queues_deliveries_while_an_apply_is_in_flight_and_handles_them_in_order(
    cp: ControlPlane, host: FakeHost
) -> None:
    # Given revision 1 being applied
    host.hold_applies = True
    host.deliver(cp.delta(host_policy("block-x")), offset=10)
    # When revisions 2 (paris only), 3 (berlin) and a garbage body arrive meanwhile
    queued = [
        host.delivery(cp.delta(host_policy("block-p", store="paris")), offset=11),
        host.delivery(cp.delta(host_policy("block-y", path="/usr/bin/y")), offset=12),
        host.delivery(b"\xff", offset=13),
    ]
    for delivery in queued:
        # Then they wait
        assert host.feed(delivery) == []
    assert host.acked == []
    # When the apply of revision 1 finishes
    effects = host.finish_apply()
    # Then revision 1 is committed, revision 2 handled, and revision 3 applied (and waits)
    assert kinds(effects) == ["Persist", "Ack", "SendHeartbeat", "Persist", "Ack", "Apply"]
    assert [e.tag for e in of_type(effects, Ack)] == [1, 2]
    assert of_type(effects, Apply)[0].revision == 3
    # When that apply finishes
    effects = host.finish_apply()
    # Then revision 3 is committed and the garbage is refused after it, in stream order
    assert [e.tag for e in of_type(effects, Ack)] == [3, 4]
    assert [r.offset for r in host.persisted] == [10, 11, 12]
    assert host.core.state.revision == 3
    assert host.core.state.rejected == Counter({"malformed": 1})
    assert host.acked == [1, 2, 3, 4]


# == rule 9: failed applies ======================================================


def test_agent_keeps_the_previous_set_when_an_apply_fails(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given block-x in force at revision 1
    digest = berlin_x.core.state.in_force_digest
    berlin_x.fail_next_applies(1, "kubearmor: connection refused")
    # When revision 2 cannot be put in force
    delivery = berlin_x.delivery(cp.delta(host_policy("block-y", path="/usr/bin/y")), offset=700)
    effects = berlin_x.feed(delivery)
    # Then the bundle is still kept: persisted at revision 2 and acked
    (persist,) = of_type(effects, Persist)
    assert (persist.record.revision, persist.record.offset) == (2, 700)
    assert persist.record.applied_revision == 1
    assert of_type(effects, Ack) == [Ack(delivery.tag)]
    # And the heartbeat reports the failure with the previous set still in force
    hb = of_type(effects, SendHeartbeat)[-1].heartbeat
    assert (hb.revision, hb.applied_revision, hb.status) == (2, 1, "failed")
    assert hb.hash == digest
    assert hb.error == "kubearmor: connection refused"
    assert any(r.level == "warning" for r in of_type(effects, Report))


def test_agent_retries_a_failed_apply_on_tick_after_the_retry_interval(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given an apply of revision 2 that failed at t=100
    berlin_x.now = 100.0
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # When ticks come before the retry interval has passed
    for now in (101.0, 110.0, 129.9):
        # Then nothing is retried
        assert of_type(berlin_x.tick(now), Apply) == []
    # When the retry interval has passed
    effects = berlin_x.tick(130.0)
    # Then revision 2's set is applied again
    (apply,) = of_type(effects, Apply)
    assert (apply.revision, names(apply.policies)) == (2, ["block-x", "block-y"])


def test_agent_retries_a_failed_apply_at_once_when_the_host_sees_the_backend_return(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given an apply of revision 2 that failed at t=100 (retry due at t=130)
    berlin_x.now = 100.0
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # When the host says at t=105 that the backend (or the broker) is back
    berlin_x.now = 105.0
    effects = berlin_x.feed(RetryApply(105.0))
    # Then revision 2's set is applied now, not at t=130, and reported ok
    (apply,) = of_type(effects, Apply)
    assert (apply.revision, names(apply.policies)) == (2, ["block-x", "block-y"])
    assert of_type(effects, SendHeartbeat)[-1].heartbeat.status == "ok"
    # And no retry is left for t=130
    assert of_type(berlin_x.tick(130.0), Apply) == []


def test_agent_ignores_a_retry_hint_when_no_apply_failed(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given block-x in force and nothing pending
    # When the host says the backend is back
    # Then nothing happens
    assert berlin_x.feed(RetryApply(50.0)) == []


def test_agent_reports_ok_after_a_successful_retry(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given an apply of revision 2 that failed at t=0, reported by a heartbeat at t=29
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    assert berlin_x.tick(29.0)[0].heartbeat.status == "failed"
    # When the retry succeeds at t=30
    effects = berlin_x.tick(RETRY_INTERVAL)
    # Then the device reports revision 2 applied and in force, at once
    (effect,) = of_type(effects, SendHeartbeat)
    hb = effect.heartbeat
    assert (hb.revision, hb.applied_revision, hb.status, hb.error) == (2, 2, "ok", "")
    assert hb.hash == state_digest(
        [host_policy("block-x"), host_policy("block-y", path="/usr/bin/y")]
    )
    # And no further retry follows
    assert of_type(berlin_x.tick(RETRY_INTERVAL * 3), Apply) == []


def test_agent_last_heartbeat_after_a_successful_retry_is_not_stale(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given an apply of revision 2 that failed at t=0 (next heartbeat due at t=10)
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # When the first tick after that is at t=30: retry due and heartbeat due
    effects = berlin_x.tick(RETRY_INTERVAL)
    # Then the retry succeeded
    assert berlin_x.core.state.status == "ok"
    # And every heartbeat sent after the apply, the last above all, says so
    after_apply = effects[effects.index(of_type(effects, Apply)[0]) :]
    reported = [e.heartbeat for e in of_type(after_apply, SendHeartbeat)]
    assert reported, "no heartbeat after the retry"
    assert [(hb.status, hb.applied_revision) for hb in reported] == [("ok", 2)] * len(reported)
    assert reported[-1].hash == berlin_x.backend_digest


def test_agent_retries_again_when_the_retry_fails(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given an apply that failed at t=0 and whose retry at t=30 fails too
    berlin_x.fail_next_applies(2)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    assert len(of_type(berlin_x.tick(30.0), Apply)) == 1
    assert berlin_x.core.state.status == "failed"
    # When ticks go on
    # Then the next retry comes one retry interval after the failed one
    assert of_type(berlin_x.tick(59.0), Apply) == []
    assert len(of_type(berlin_x.tick(60.0), Apply)) == 1
    assert berlin_x.core.state.status == "ok"


def test_agent_retries_a_failed_startup_apply(cp: ControlPlane) -> None:
    # Given a device whose cached set could not be put in force at start
    cp.delta(host_policy("block-x"))
    host = FakeHost(make_core(cp))
    host.fail_next_applies(1, "daemon starting")
    host.start(cp.cache())
    assert host.core.state.status == "failed"
    assert host.core.state.in_force_digest == EMPTY_DIGEST
    # When the retry interval has passed
    effects = host.tick(RETRY_INTERVAL)
    # Then the cached set is applied again and is now in force
    (apply,) = of_type(effects, Apply)
    assert names(apply.policies) == ["block-x"]
    assert host.core.state.status == "ok"
    assert host.core.state.in_force_digest == state_digest([host_policy("block-x")])


def test_agent_reapplies_an_unchanged_set_while_its_last_apply_failed(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a failed apply of revision 2
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # When revision 3 arrives and does not change the device's set
    effects = berlin_x.deliver(cp.delta(host_policy("block-p", store="paris")))
    # Then the set is applied anyway, which repairs the failure
    (apply,) = of_type(effects, Apply)
    assert apply.revision == 3
    hb = berlin_x.last_heartbeat
    assert (hb.revision, hb.applied_revision, hb.status) == (3, 3, "ok")


def test_agent_queues_deliveries_during_a_retry(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a failed apply of revision 2 whose retry is in flight
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    berlin_x.hold_applies = True
    berlin_x.tick(RETRY_INTERVAL)
    # When revision 3 arrives
    delivery = berlin_x.delivery(cp.delta(host_policy("block-z", path="/usr/bin/z")))
    # Then it waits for the retry
    assert berlin_x.feed(delivery) == []
    # When the retry finishes
    berlin_x.hold_applies = False
    effects = berlin_x.finish_apply()
    # Then revision 3 is handled after it
    assert Ack(delivery.tag) in effects
    assert berlin_x.core.state.revision == 3


def test_agent_does_not_retry_once_a_later_apply_succeeded(
    cp: ControlPlane, berlin_x: FakeHost
) -> None:
    # Given a failed apply of revision 2 at t=0
    berlin_x.fail_next_applies(1)
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # And revision 3 applied successfully at t=5, before any retry
    berlin_x.now = 5.0
    berlin_x.deliver(cp.delta(host_policy("block-z", path="/usr/bin/z")))
    assert berlin_x.core.state.status == "ok"
    # When the retry interval of the old failure passes
    effects = berlin_x.tick(RETRY_INTERVAL)
    # Then nothing is applied again: the set in force is already right
    assert of_type(effects, Apply) == []


def test_agent_reports_the_cached_revision_as_applied_after_a_successful_startup_apply(
    cp: ControlPlane,
) -> None:
    # Given a cache at revision 2 whose apply had failed: revision 1's set
    # was the last in force (applied_revision 1)
    cp.delta(host_policy("block-x"))
    cp.delta(host_policy("block-y", path="/usr/bin/y"))
    host = FakeHost(make_core(cp))
    # When the device starts and puts revision 2's set in force successfully
    host.start(cp.cache(applied_revision=1, digest=state_digest([host_policy("block-x")])))
    host.link_up()
    # Then it reports revision 2 as applied
    hb = host.last_heartbeat
    assert (hb.status, hb.revision) == ("ok", 2)
    assert hb.hash == state_digest(
        [host_policy("block-x"), host_policy("block-y", path="/usr/bin/y")]
    )
    assert hb.applied_revision == 2


def test_agent_reports_the_digest_the_backend_reports_after_a_failed_apply(
    cp: ControlPlane,
) -> None:
    # Given a device whose backend already enforces some set from before the agent started
    cp.delta(host_policy("block-x"))
    host = FakeHost(make_core(cp))
    host.backend_digest = state_digest([host_policy("left-over")])
    host.fail_next_applies(1)
    # When the startup apply fails
    host.start(cp.cache())
    host.link_up()
    # Then the heartbeat reports what the backend says is in force
    assert host.last_heartbeat.status == "failed"
    assert host.last_heartbeat.hash == host.backend_digest


# == rule 10: periodic heartbeats ===============================================


def test_agent_sends_a_heartbeat_every_interval_while_linked(cp: ControlPlane) -> None:
    # Given a device linked at t=0 (which reports at once)
    host = FakeHost(make_core(cp))
    host.start()
    host.link_up()
    assert len(host.heartbeats) == 1
    # When ticks come every second for 35 seconds
    sent_at = []
    for second in range(1, 36):
        if of_type(host.tick(float(second)), SendHeartbeat):
            sent_at.append(second)
    # Then a heartbeat went out every heartbeat_interval
    assert sent_at == [10, 20, 30]
    assert [hb.time for hb in host.heartbeats] == [0.0, 10.0, 20.0, 30.0]


def test_agent_sends_no_heartbeat_while_the_link_is_down(cp: ControlPlane) -> None:
    # Given a device that was never linked, and one whose link was lost
    never = FakeHost(make_core(cp))
    never.start()
    lost = FakeHost(make_core(cp))
    lost.start()
    lost.link_up()
    lost.link_lost()
    # When time passes
    for now in (10.0, 20.0, 100.0):
        # Then neither sends a heartbeat
        assert never.tick(now) == []
        assert lost.tick(now) == []


def test_agent_reports_at_once_when_the_link_comes_back(cp: ControlPlane, host: FakeHost) -> None:
    # Given a device whose link was lost at t=2
    host.now = 2.0
    host.link_lost()
    # When it comes back at t=3, before the next heartbeat was due
    host.now = 3.0
    effects = host.link_up()
    # Then a heartbeat goes out at once, and the next one an interval later
    assert kinds(effects) == ["Consume", "SendHeartbeat"]
    assert host.tick(12.0) == []
    assert kinds(host.tick(13.0)) == ["SendHeartbeat"]


def test_agent_heartbeat_describes_the_device(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a device at revision 1
    # When a periodic heartbeat goes out at t=10
    (effect,) = berlin_x.tick(10.0)
    hb = effect.heartbeat
    # Then it names the device, its labels, the time and what it enforces
    assert hb.device == DEVICE and hb.labels == LABELS
    assert (hb.time, hb.revision, hb.applied_revision, hb.status) == (10.0, 1, 1, "ok")
    assert hb.hash == state_digest([host_policy("block-x")])
    assert (hb.gaps, hb.awaiting_snapshot, hb.rejected, hb.error) == (0, False, {}, "")
    # And it survives the wire
    assert Heartbeat.from_message(decode(hb.encode())) == hb


def test_agent_never_lets_time_run_backwards(cp: ControlPlane, berlin_x: FakeHost) -> None:
    # Given a device that saw t=50
    berlin_x.tick(50.0)
    # When an event carries an earlier time
    berlin_x.now = 40.0
    berlin_x.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))
    # Then heartbeats keep the latest time
    assert berlin_x.last_heartbeat.time == 50.0


# == properties over any stream ==================================================

_KINDS = st.sampled_from(["next", "replay", "garbage", "stranger", "gap", "snapshot", "paris"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(_KINDS, min_size=1, max_size=12),
    failures=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_agent_acks_each_delivery_once_and_never_goes_back_whatever_the_stream(
    steps: list[str], failures: list[bool]
) -> None:
    # Given a fresh linked device and a control plane
    cp = ControlPlane()
    host = FakeHost(make_core(cp))
    host.start()
    host.link_up()
    tags: list[int] = []
    revisions = [0]
    # When any mix of bundles arrives, some applies failing
    for i, step in enumerate(steps):
        if failures[i]:
            host.fail_next_applies(1)
        if step == "next":
            body = cp.delta(host_policy(f"p{i}", path=f"/usr/bin/p{i}"))
        elif step == "paris":
            body = cp.delta(host_policy(f"p{i}", store="paris"))
        elif step == "replay":
            body = cp.history.get(max(cp.revision - 1, 1)) or b"\xff"
        elif step == "garbage":
            body = b"\xff\x00"
        elif step == "stranger":
            body = _unknown_key(cp)
        elif step == "gap":
            cp.skip()
            body = cp.delta(host_policy(f"p{i}", path=f"/usr/bin/p{i}"))
        else:
            body = cp.snapshot() if cp.revision else b"\xff"
        delivery = host.delivery(body)
        tags.append(delivery.tag)
        effects = host.feed(delivery)
        # Then every delivery is acked once, while it is handled
        assert [a.tag for a in of_type(effects, Ack)] == [delivery.tag]
        # And every persisted record is acked right after, never before
        for persist in of_type(effects, Persist):
            assert effects.index(persist) < effects.index(Ack(delivery.tag))
        revisions.append(host.core.state.revision)
        # And the heartbeat never claims a set that is not in force
        assert host.core.state.in_force_digest == host.backend_digest
    assert host.acked == tags
    # And the revision never goes back, and never passes the control plane's
    assert revisions == sorted(revisions)
    assert revisions[-1] <= cp.revision
    # And a device that is not waiting for a snapshot holds the control plane's state
    if not host.core.state.awaiting_snapshot and host.core.state.revision == cp.revision:
        assert state_digest(host.core.state.fleet.values()) == cp.digest


# == rules 12-13: the core's own events as telemetry records =====================


def _events(effects: Iterable[core.Effect]) -> list[str]:
    return [e.body["event"] for e in of_type(effects, Emit)]


def _recording_host(cp: ControlPlane) -> FakeHost:
    """A linked device at revision 1 (``block-x`` in force) that keeps records."""
    h = FakeHost(make_core(cp, records=True))
    h.start()
    h.link_up()
    h.deliver(cp.delta(host_policy("block-x")))
    return h


def _applies_a_new_revision(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    return h.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))


def _refuses_a_forged_bundle(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    return h.deliver(_unknown_key(cp))


def _refuses_a_replayed_revision(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    return h.deliver(cp.history[1])


def _sees_a_gap(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    cp.skip()
    return h.deliver(cp.delta(host_policy("block-y", path="/usr/bin/y")))


def _fails_an_apply(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    h.fail_next_applies(1, "daemon not running")
    return _applies_a_new_revision(cp, h)


def _retries_a_failed_apply_that_now_works(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    _fails_an_apply(cp, h)
    return h.tick(RETRY_INTERVAL + 1.0)


def _advances_without_a_change_to_its_set(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    return h.deliver(cp.delta(host_policy("paris-only", store="paris")))


def _sends_a_periodic_heartbeat(cp: ControlPlane, h: FakeHost) -> list[core.Effect]:
    return h.tick(HEARTBEAT_INTERVAL * 2)


EMITTED = [
    # (id, what happens to a recording device at revision 1, the effects' kinds,
    #  the event bodies it emits, without their "event" key)
    (
        "a-bundle-put-in-force-emits-revision-applied-before-its-persist-and-ack",
        _applies_a_new_revision,
        ["Apply", "Emit", "Persist", "Ack", "SendHeartbeat"],
        {"revision_applied": {"revision": 2, "policies": 2}},
    ),
    (
        "a-forged-bundle-emits-bundle-refused-with-its-reason-before-its-ack",
        _refuses_a_forged_bundle,
        ["Report", "Emit", "Ack", "SendHeartbeat"],
        {"bundle_refused": {"reason": "unknown_key"}},
    ),
    (
        "a-replayed-revision-emits-bundle-refused-as-stale",
        _refuses_a_replayed_revision,
        ["Report", "Emit", "Ack", "SendHeartbeat"],
        {"bundle_refused": {"reason": "stale"}},
    ),
    (
        "a-gap-emits-gap-naming-the-revision-held-before-its-ack",
        _sees_a_gap,
        ["Report", "Emit", "Ack", "SendHeartbeat"],
        {"gap": {"revision": 1}},
    ),
    (
        "a-failed-apply-emits-apply-failed-with-the-error-before-its-persist",
        _fails_an_apply,
        ["Apply", "Report", "Emit", "Persist", "Ack", "SendHeartbeat"],
        {"apply_failed": {"revision": 2, "error": "daemon not running"}},
    ),
    (
        "a-retry-that-works-emits-revision-applied-before-its-persist",
        _retries_a_failed_apply_that_now_works,
        ["Apply", "Emit", "Persist", "SendHeartbeat"],
        {"revision_applied": {"revision": 2, "policies": 2}},
    ),
    (
        "a-revision-that-leaves-the-set-unchanged-emits-nothing",
        _advances_without_a_change_to_its_set,
        ["Persist", "Ack"],
        {},
    ),
    (
        "a-periodic-heartbeat-emits-nothing",
        _sends_a_periodic_heartbeat,
        ["SendHeartbeat"],
        {},
    ),
]


@pytest.mark.parametrize(
    "happens, expected_kinds, expected", [row[1:] for row in EMITTED], ids=[r[0] for r in EMITTED]
)
def test_agent_that_keeps_records_emits_its_own_events(
    cp: ControlPlane, happens, expected_kinds: list[str], expected: dict[str, dict[str, Any]]
) -> None:
    # Given a device that keeps telemetry records, at revision 1
    h = _recording_host(cp)
    # When something happens to it
    effects = happens(cp, h)
    # Then the effects come in this order, and the events say what happened
    assert kinds(effects) == expected_kinds
    emitted = of_type(effects, Emit)
    assert _events(effects) == list(expected)
    for emit, (name, details) in zip(emitted, expected.items(), strict=True):
        assert emit.type == "event" and emit.body["event"] == name
        assert details.items() <= dict(emit.body).items()


def test_agent_that_keeps_records_emits_revision_applied_with_the_digest_in_force(
    cp: ControlPlane,
) -> None:
    # Given a device that keeps records
    h = FakeHost(make_core(cp, records=True))
    h.start()
    h.link_up()
    # When its first revision is put in force
    effects = h.deliver(cp.delta(host_policy("block-x")))
    # Then the event names the revision and the digest the backend reports
    (emit,) = of_type(effects, Emit)
    assert emit.body == {
        "event": "revision_applied",
        "revision": 1,
        "digest": state_digest([host_policy("block-x")]),
        "policies": 1,
    }


def test_agent_that_keeps_records_emits_cache_refused_for_a_tampered_cache(
    cp: ControlPlane,
) -> None:
    # Given a cache whose fleet state does not match its signed bundle
    cp.delta(host_policy("block-x"))
    cache = cp.cache()
    tampered = CacheRecord(
        cache.revision, cache.offset, cache.applied_revision, (), cache.bundle, cache.digest
    )
    # When a recording device starts from it
    effects = FakeHost(make_core(cp, records=True)).start(tampered)
    # Then it says so as an event, as well as in its log
    assert _events(effects) == ["cache_refused"]


def test_agent_that_keeps_records_does_not_emit_for_its_cached_set_at_start(
    cp: ControlPlane,
) -> None:
    # Given a good cache at revision 1
    cp.delta(host_policy("block-x"))
    # When a recording device starts from it and puts it in force
    effects = FakeHost(make_core(cp, records=True)).start(cp.cache())
    # Then no revision_applied goes out: the revision was applied before
    assert of_type(effects, Apply) and of_type(effects, Emit) == []


def test_agent_emits_nothing_unless_it_keeps_records(cp: ControlPlane, host: FakeHost) -> None:
    # Given a device made without records (the simulator's)
    # When a revision is applied, a bundle refused and a gap seen
    host.deliver(cp.delta(host_policy("block-x")))
    host.deliver(_unknown_key(cp))
    cp.skip()
    host.deliver(cp.delta(host_policy("block-y")))
    # Then it emitted nothing
    assert host.emitted == []
