"""Signing keys rotated and revoked through the real CLI, control plane and
agent: the new key takes over without a device being re-enrolled, the old
one is refused once retired or revoked, and a device whose cache is wiped
neither trusts a revoked key again nor goes back a revision."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pika
import pytest
from brokerkit import wait_until
from fleetkit import Fleet

from edgeward.enforcement.digest import state_digest
from edgeward.transport import topology
from edgeward.transport.signing import Signer
from edgeward.transport.wire import Bundle

DEVICE = "pos-0001"


def policy(name: str, path: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"store": "berlin"}},
            "process": {"matchPaths": [{"path": path}]},
            "action": "Block",
        },
    }


@pytest.fixture
def fleet(tmp_path: Path, broker_url: str):
    fleet = Fleet(tmp_path / "home", broker_url)
    fleet.start_control_plane()
    yield fleet
    fleet.close()


def apply(fleet: Fleet, tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / f"{doc['metadata']['name']}.json"
    path.write_text(json.dumps(doc))
    fleet.cli("policy", "apply", str(path))


def device_row(fleet: Fleet) -> dict[str, Any]:
    return fleet.devices()[DEVICE]


def in_sync_at(fleet: Fleet, revision: int) -> dict[str, Any]:
    """In sync, having accepted fleet revision ``revision`` (a key change
    changes no policy: the set in force may be an older revision's)."""
    return wait_until(
        lambda: (
            (r := device_row(fleet))["state"] == "in_sync" and r["fleet_revision"] == revision and r
        ),
        timeout=60,
        interval=0.3,
        message=f"{DEVICE} never in sync at revision {revision}",
    )


def keys(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {r["key_id"]: r for r in json.loads(fleet.cli("keys", "list", "--json"))}


def forge(fleet: Fleet, signer: Signer, revision: int, issued_at: float, docs: list) -> None:
    """A delta signed by ``signer``, published as the control plane would."""
    bundle = Bundle(
        revision=revision,
        issued_at=issued_at,
        mode="delta",
        policies=tuple(docs),
        sha256=state_digest(docs),
    )
    conn = pika.BlockingConnection(pika.URLParameters(fleet.broker_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            topology.POLICY_EXCHANGE, "", signer.sign(bundle).encode(), topology.policy_properties()
        )
    finally:
        conn.close()


def test_a_rotated_key_takes_over_and_the_old_one_is_refused_once_retired_and_revoked(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Given a device in sync with one policy, signed by the first key
    config = fleet.enroll(DEVICE, "store=berlin")
    agent = fleet.start_agent(DEVICE)
    apply(fleet, tmp_path, policy("block-curl", "/usr/bin/curl"))
    in_sync_at(fleet, 1)
    (old,) = keys(fleet)
    old_signer = Signer.load_or_create(fleet.home / "keys" / "signing.pem")
    assert old_signer.key_id == old
    # When the key is rotated with no overlap (as for a key feared stolen)
    out = fleet.cli("keys", "rotate", "--overlap", "0s")
    assert "revision 2 published" in out
    ring = keys(fleet)
    (new,) = [k for k, r in ring.items() if r["state"] == "active"]
    assert ring[old]["state"] == "retiring" and new != old
    # Then the device learns the new key from revision 2 and takes revision 3 signed by it
    in_sync_at(fleet, 2)
    apply(fleet, tmp_path, policy("block-wget", "/usr/bin/wget"))
    in_sync_at(fleet, 3)
    agent.wait_for_line("trusted signing keys now", timeout=10)
    # And a bundle the old key signs, issued after its end, is refused
    forge(fleet, old_signer, 4, time.time(), [policy("evil", "/usr/bin/ls")])
    row = wait_until(
        lambda: (r := device_row(fleet))["rejected"].get("key_expired") and r,
        timeout=30,
        message="the old key's late bundle was not refused",
    )
    assert row["fleet_revision"] == 3 and row["state"] == "in_sync"
    # When the old key is revoked
    fleet.cli("keys", "revoke", old)
    assert set(keys(fleet)) == {new}
    in_sync_at(fleet, 4)
    # Then even a bundle it signed "before its end" is refused: it is unknown now
    forge(fleet, old_signer, 5, 0.0, [policy("evil", "/usr/bin/ls")])
    wait_until(
        lambda: device_row(fleet)["rejected"].get("unknown_key"),
        timeout=30,
        message="the revoked key's bundle was not refused",
    )
    # And the device keeps what it trusts apart from its cache
    cache_dir = Path(json.loads(config.read_text())["cache_dir"])
    trust = json.loads(cache_dir.with_name(cache_dir.name + ".trust.json").read_text())
    assert trust["floor"] == 4 and set(trust["keyring"]) == {new}

    # When its cache is wiped and it restarts (config untouched: it names the old key)
    fleet.stop_agent(DEVICE, signal.SIGKILL)
    shutil.rmtree(cache_dir)
    agent = fleet.start_agent(DEVICE)
    # Then it waits for a snapshot at or past revision 4, which the control plane sends
    agent.wait_for_line("waiting for a snapshot", timeout=30)
    in_sync_at(fleet, 4)
    # (the stream's early bundles, signed by the revoked key its config still
    # names, were refused: it trusts what its trust file says)
    assert agent.matching(f"unknown_key {old}")
    assert not agent.matching("in force: revision 1")  # never went back
