"""The DeviceMirror's states from heartbeats: in_sync, pending, drifted,
failed, offline, unknown; `edgeward devices --state S` lists them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerkit import wait_until
from fleetkit import CLI
from test_collector import Device, running_control_plane

from edgeward.actors import messages as m
from edgeward.actors.fleet import Desired, device_state
from edgeward.actors.runtime import ControlPlane
from edgeward.enforcement.digest import EMPTY_DIGEST
from edgeward.transport import topology
from edgeward.transport.wire import Heartbeat

DESIRED = Desired(4, "d4")
NOW = 1000.0


@pytest.mark.parametrize(
    ("reported", "latest", "state"),
    [
        ({"hash": "d4", "revision": 4, "status": "ok"}, 4, "in_sync"),
        ({"hash": "d4", "revision": 6, "status": "ok"}, 6, "in_sync"),
        ({"hash": "dX", "revision": 4, "status": "ok"}, 4, "drifted"),
        ({"hash": "dX", "revision": 6, "status": "ok"}, 6, "drifted"),
        ({"hash": "dX", "revision": 6, "status": "ok"}, None, "drifted"),
        # a revision the mirror has not heard of yet: catching up, not drifted
        ({"hash": "dX", "revision": 7, "status": "ok"}, 6, "pending"),
        ({"hash": "dX", "revision": 3, "status": "ok"}, 4, "pending"),
        ({"hash": "dX", "revision": 4, "status": "starting"}, 4, "pending"),
        ({"hash": "dX", "revision": 4, "status": "ok", "awaiting_snapshot": True}, 4, "pending"),
        ({"hash": "dX", "revision": 4, "status": "failed"}, 4, "failed"),
    ],
)
def test_a_device_is_drifted_when_it_enforces_another_digest_at_the_desired_revision(
    reported: dict, latest: int | None, state: str
) -> None:
    assert device_state(DESIRED, reported, NOW - 1, NOW, offline_after=45, latest=latest) == state


def test_silence_longer_than_the_threshold_is_offline_whatever_was_reported() -> None:
    drifted = {"hash": "dX", "revision": 4, "status": "ok"}
    assert device_state(DESIRED, drifted, NOW - 2.5, NOW, offline_after=2) == "offline"
    assert device_state(DESIRED, drifted, NOW - 1.5, NOW, offline_after=2) == "drifted"


# -- through the control plane ------------------------------------------------------


POLICY = {
    "apiVersion": "security.kubearmor.com/v1",
    "kind": "KubeArmorHostPolicy",
    "metadata": {"name": "p"},
    "spec": {
        "nodeSelector": {"matchLabels": {"store": "berlin"}},
        "process": {"matchPaths": [{"path": "/usr/bin/curl"}]},
        "action": "Block",
    },
}


def ask(plane: ControlPlane, role: str, msg: Any) -> Any:
    reply = plane.asys.ask(plane.addresses[role], msg, 20)
    assert isinstance(reply, m.Reply) and reply.ok, reply
    return reply.value


def heartbeat(device: str, revision: int, hash: str, **fields: Any) -> Heartbeat:
    return Heartbeat(
        device=device,
        time=time.time(),
        revision=revision,
        applied_revision=revision,
        hash=hash,
        status=fields.pop("status", "ok"),
        **fields,
    )


def devices(env: dict[str, str], *args: str) -> list[dict]:
    done = subprocess.run(
        [*CLI, "devices", "--json", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def device(broker_url: str) -> Iterator[Device]:
    dev = Device(broker_url)
    yield dev
    dev.close()


def start(tmp_path: Path, broker_url: str, offline_after: float) -> tuple[ControlPlane, dict]:
    plane = running_control_plane(tmp_path / "home", broker_url, offline_after=offline_after)
    for name in ("pos-0001", "pos-0002", "pos-0003", "pos-0004", "pos-0005"):
        ask(plane, "mirror", m.Enroll(name, (("store", "berlin"),)))
    ask(plane, "distributor", m.ApplyPolicies((POLICY,), ("p.yaml",)))
    env = {
        **os.environ,
        "EDGEWARD_BROKER_URL": broker_url,
        "EDGEWARD_HOME": plane.settings.home,
        "EDGEWARD_ADMIN_PORT": str(plane.port),
    }
    return plane, env


def test_devices_state_lists_in_sync_pending_drifted_failed_and_unknown_devices(
    tmp_path: Path, broker_url: str, device: Device
) -> None:
    # Given five enrolled devices and a policy at revision 1 for all of them
    plane, env = start(tmp_path, broker_url, offline_after=600)
    try:
        desired = devices(env)[0]["desired_hash"]
        assert desired != EMPTY_DIGEST
        # When four report: in force, behind, something else at revision 1, failed
        for hb in (
            heartbeat("pos-0001", 1, desired, outbox=12, dropped={"log": 3}),
            heartbeat("pos-0002", 0, EMPTY_DIGEST),
            heartbeat("pos-0003", 1, "0" * 64),
            heartbeat("pos-0004", 1, desired, status="failed", error="backend refused"),
        ):
            device.publish_raw(topology.heartbeat_routing_key(hb.device), hb.encode())
        # Then each shows its state, and --state lists exactly the devices in it
        expected = {
            "pos-0001": "in_sync",
            "pos-0002": "pending",
            "pos-0003": "drifted",
            "pos-0004": "failed",
            "pos-0005": "unknown",
        }

        def reached() -> list[dict] | None:
            rows = devices(env)
            return rows if {r["device"]: r["state"] for r in rows} == expected else None

        rows = wait_until(
            reached,
            timeout=30,
            interval=0.3,
            message=f"devices never reached {expected}",
        )
        for state in set(expected.values()):
            listed = [r["device"] for r in devices(env, "--state", state)]
            assert listed == [d for d, s in expected.items() if s == state]
        # And the report carries what the device enforces and its outbox
        one = {r["device"]: r for r in rows}["pos-0001"]
        assert one["hash"] == one["desired_hash"] == desired
        assert one["outbox"] == 12 and one["dropped"] == {"log": 3}
        assert one["last_seen"] == pytest.approx(time.time(), abs=30)
        drifted = {r["device"]: r for r in rows}["pos-0003"]
        assert drifted["hash"] == "0" * 64 and drifted["reported_revision"] == 1
    finally:
        plane.stop()


def test_a_silent_device_turns_offline_after_the_configured_silence(
    tmp_path: Path, broker_url: str, device: Device
) -> None:
    # Given a mirror that calls 2 s of silence offline, and a device in sync
    plane, env = start(tmp_path, broker_url, offline_after=2)
    try:
        desired = devices(env)[0]["desired_hash"]
        hb = heartbeat("pos-0001", 1, desired)
        device.publish_raw(topology.heartbeat_routing_key("pos-0001"), hb.encode())
        wait_until(
            lambda: devices(env, "--state", "in_sync"),
            timeout=30,
            interval=0.2,
            message="the device never showed in sync",
        )
        # When it says nothing more, it is offline within the threshold plus a poll
        rows = wait_until(
            lambda: devices(env, "--state", "offline"),
            timeout=20,
            interval=0.2,
            message="the silent device never went offline",
        )
        assert [r["device"] for r in rows] == ["pos-0001"]
        assert time.time() - rows[0]["last_seen"] > 2
        # And it is back in sync as soon as it reports again
        device.publish_raw(
            topology.heartbeat_routing_key("pos-0001"), heartbeat("pos-0001", 1, desired).encode()
        )
        wait_until(
            lambda: [r["device"] for r in devices(env, "--state", "in_sync")] == ["pos-0001"],
            timeout=30,
            interval=0.2,
            message="the device never came back",
        )
    finally:
        plane.stop()
