"""Signing keys that rotate and can be revoked, and a device that never goes
back: the agent core's rules 14 and 15, with real Ed25519 signatures."""

from __future__ import annotations

from typing import Any

import pytest
from test_agent_core import ControlPlane, FakeHost, host_policy

from edgeward.actors.core import AgentCore, CacheRecord, Started
from edgeward.enforcement.digest import state_digest
from edgeward.transport.errors import RemoteProtocolError
from edgeward.transport.signing import Signer, Verifier
from edgeward.transport.wire import Bundle, SignedBundle, decode

DEVICE = "pos-0001"
LABELS = {"store": "berlin"}


def entry(signer: Signer, until: float | None = None) -> dict[str, Any]:
    return {"public": signer.public_b64, "until": until}


class Fleet(ControlPlane):
    """The test's control plane, whose bundles carry a keyring."""

    def __init__(self) -> None:
        super().__init__()
        self.keyring: dict[str, dict[str, Any]] = {}

    def bundle(
        self, *put: dict[str, Any], signer: Signer | None = None, issued_at: float | None = None
    ) -> bytes:
        self.revision += 1
        for doc in put:
            self.fleet[doc["metadata"]["name"]] = doc
        body = self.sign(
            Bundle(
                revision=self.revision,
                issued_at=float(self.revision) if issued_at is None else issued_at,
                mode="delta",
                policies=tuple(put),
                sha256=self.digest,
                keyring=dict(self.keyring),
            ),
            signer,
        )
        self.history[self.revision] = body
        return body

    def snapshot_at(self, revision: int, signer: Signer | None = None) -> bytes:
        return self.sign(
            Bundle(
                revision=revision,
                issued_at=float(revision),
                mode="snapshot",
                policies=tuple(self.fleet[n] for n in sorted(self.fleet)),
                sha256=self.digest,
                keyring=dict(self.keyring),
            ),
            signer,
        )


def device(fleet: Fleet, *, floor: int = 0, cache: CacheRecord | None = None) -> FakeHost:
    host = FakeHost(AgentCore(DEVICE, LABELS, fleet.verifier, records=True))
    host.feed(Started(0.0, cache, floor))
    host.link_up()
    return host


def refused(host: FakeHost) -> dict[str, int]:
    return dict(host.core.state.rejected)


def policy(n: int) -> dict[str, Any]:
    return host_policy(f"p{n}", path=f"/usr/bin/tool-{n}")


# == rotation ======================================================================


def test_a_new_key_announced_by_a_trusted_one_signs_what_follows() -> None:
    fleet = Fleet()
    old, new = fleet.signer, Signer.generate()
    host = device(fleet)
    host.deliver(fleet.bundle(policy(1)))
    # When the old key announces the new one (the old kept until issued_at 10)
    fleet.keyring = {old.key_id: entry(old, 10.0), new.key_id: entry(new)}
    host.deliver(fleet.bundle(policy(2), signer=old))
    # Then a bundle signed by the new key is applied
    host.deliver(fleet.bundle(policy(3), signer=new))
    assert host.core.state.revision == 3 and refused(host) == {}
    assert host.core.verifier.key_ids == sorted([old.key_id, new.key_id])
    # And the device said so in its audit trail
    events = [e.body for e in host.emitted if e.body["event"] == "keys_changed"]
    assert events == [{"event": "keys_changed", "keys": sorted([old.key_id, new.key_id])}]


def test_a_retiring_key_signs_only_bundles_issued_before_its_end() -> None:
    fleet = Fleet()
    old, new = fleet.signer, Signer.generate()
    host = device(fleet)
    fleet.keyring = {old.key_id: entry(old, 10.0), new.key_id: entry(new)}
    host.deliver(fleet.bundle(policy(1), signer=old, issued_at=5.0))
    # A bundle the old key signed, issued before its end, is still good
    host.deliver(fleet.bundle(policy(2), signer=old, issued_at=10.0))
    assert host.core.state.revision == 2
    # One issued after it is refused, and the set in force stays
    host.deliver(fleet.bundle(policy(3), signer=old, issued_at=10.5))
    assert refused(host) == {"key_expired": 1} and host.core.state.revision == 2


def test_a_key_left_out_of_the_keyring_is_revoked_at_once() -> None:
    fleet = Fleet()
    old, new = fleet.signer, Signer.generate()
    host = device(fleet)
    fleet.keyring = {old.key_id: entry(old, 1e12), new.key_id: entry(new)}
    host.deliver(fleet.bundle(policy(1), signer=old))
    # When the new key publishes a keyring without the old one
    fleet.keyring = {new.key_id: entry(new)}
    host.deliver(fleet.bundle(policy(2), signer=new))
    # Then a bundle the old key signs is refused, whatever its date
    host.deliver(fleet.bundle(policy(3), signer=old, issued_at=0.0))
    assert refused(host) == {"unknown_key": 1}
    assert host.core.state.revision == 2 and host.core.verifier.key_ids == [new.key_id]


def test_a_key_cannot_announce_itself() -> None:
    fleet = Fleet()
    stranger = Signer.generate()
    host = device(fleet)
    fleet.keyring = {stranger.key_id: entry(stranger)}
    host.deliver(fleet.bundle(policy(1), signer=stranger))
    assert refused(host) == {"unknown_key": 1} and host.core.state.revision == 0


def test_a_keyring_naming_a_key_that_does_not_match_its_id_is_refused_whole() -> None:
    fleet = Fleet()
    other = Signer.generate()
    host = device(fleet)
    bad = {fleet.signer.key_id: entry(fleet.signer), "0" * 16: entry(other)}
    fleet.keyring = bad
    host.deliver(fleet.bundle(policy(1)))
    assert refused(host) == {"bad_keyring": 1}
    assert host.core.state.revision == 0 and host.core.verifier.key_ids == [fleet.signer.key_id]


def test_a_keyring_where_every_key_ends_is_refused_before_its_signature_counts() -> None:
    fleet = Fleet()
    fleet.keyring = {fleet.signer.key_id: entry(fleet.signer, 100.0)}
    signed = fleet.bundle(policy(1))
    with pytest.raises(RemoteProtocolError) as no_key:
        fleet.verifier.verify(SignedBundle.from_message(decode(signed)))
    assert no_key.value.reason == "bad_keyring"


def test_a_verifier_from_a_keyring_is_the_keyring_it_reports() -> None:
    a, b = Signer.generate(), Signer.generate()
    ring = {a.key_id: entry(a), b.key_id: entry(b, 42.0)}
    verifier = Verifier.from_keyring(ring)
    assert verifier.keyring == dict(sorted(ring.items()))
    assert verifier.rekeyed(ring) is verifier and verifier.rekeyed({}) is verifier


# == no way back ======================================================================


def test_a_device_without_its_cache_accepts_only_a_snapshot_at_or_past_its_floor() -> None:
    fleet = Fleet()
    host = device(fleet)
    for n in range(1, 6):
        host.deliver(fleet.bundle(policy(n)))
    assert host.core.state.revision == 5
    # When its cache is lost, but its floor (5) is kept, and it restarts
    again = device(fleet, floor=5)
    assert again.core.state.awaiting_snapshot
    # Then the stream's old deltas and an old snapshot change nothing
    for rev in range(1, 6):
        again.deliver(fleet.history[rev])
    again.deliver(fleet.snapshot_at(3))
    assert again.core.state.revision == 0 and again.applied == []
    # And a snapshot at the floor brings it back
    again.deliver(fleet.snapshot_at(5))
    assert again.core.state.revision == 5 and not again.core.state.awaiting_snapshot
    assert {p["metadata"]["name"] for p in again.applied[-1].policies} == {
        f"p{n}" for n in range(1, 6)
    }


def test_a_cache_older_than_the_floor_stays_in_force_but_waits_for_a_newer_snapshot() -> None:
    fleet = Fleet()
    fleet.bundle(policy(1))
    old_cache = CacheRecord(
        revision=1,
        offset=10,
        applied_revision=1,
        fleet=(policy(1),),
        bundle=fleet.snapshot_at(1),
    )
    fleet.bundle(policy(2))
    # When a device restarts on a cache of revision 1, having accepted 2 before
    host = FakeHost(AgentCore(DEVICE, LABELS, fleet.verifier, records=True))
    host.feed(Started(0.0, old_cache, 2))
    # Then the old set is in force (better than none), the rollback counted
    assert [p["metadata"]["name"] for p in host.applied[0].policies] == ["p1"]
    assert refused(host) == {"rollback": 1} and host.core.state.awaiting_snapshot
    host.link_up()
    assert host.heartbeats[-1].awaiting_snapshot
    # And only a snapshot of revision 2 or later ends the wait
    host.deliver(fleet.snapshot_at(2))
    assert host.core.state.revision == 2 and not host.core.state.awaiting_snapshot
    assert state_digest([policy(1), policy(2)]) == host.core.state.in_force_digest
