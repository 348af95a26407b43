"""The DeviceMirror's arithmetic: desired revision per device and its state."""

from __future__ import annotations

import pytest

from edgeward.actors.fleet import Desired, FleetRevision, desired_for, device_state
from edgeward.enforcement.digest import EMPTY_DIGEST, state_digest


def pol(name: str, **selector: str) -> dict:
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"matchLabels": selector}, "action": "Block"},
    }


def test_desired_revision_is_the_latest_that_changed_the_devices_selected_set() -> None:
    berlin, paris = pol("b", store="berlin"), pol("p", store="paris")
    history = [
        FleetRevision.of(1, {"b": berlin}),
        FleetRevision.of(2, {"b": berlin, "p": paris}),  # paris only
        FleetRevision.of(
            3, {"b": berlin, "p": {**paris, "spec": {**paris["spec"], "action": "Audit"}}}
        ),
    ]
    assert desired_for("pos-1", {"store": "berlin"}, history) == Desired(1, state_digest([berlin]))
    assert desired_for("pos-2", {"store": "paris"}, history).revision == 3
    assert desired_for("pos-3", {"store": "rome"}, history) == Desired(0, EMPTY_DIGEST)


DESIRED = Desired(4, "d4")
NOW = 1000.0


@pytest.mark.parametrize(
    ("reported", "last_seen", "state"),
    [
        (None, None, "unknown"),
        ({"hash": "d4", "revision": 4, "status": "ok"}, NOW - 100, "offline"),
        ({"hash": "d4", "revision": 4, "status": "failed"}, NOW, "failed"),
        ({"hash": "d4", "revision": 4, "status": "ok"}, NOW, "in_sync"),
        ({"hash": "d4", "revision": 7, "status": "ok"}, NOW, "in_sync"),
        ({"hash": "d3", "revision": 3, "status": "ok"}, NOW, "pending"),
        ({"hash": "d4", "revision": 3, "status": "ok"}, NOW, "pending"),
        ({"hash": "d4", "revision": 4, "status": "ok", "awaiting_snapshot": True}, NOW, "pending"),
    ],
)
def test_device_state_follows_from_what_it_reported_and_when(reported, last_seen, state) -> None:
    assert device_state(DESIRED, reported, last_seen, NOW, offline_after=45) == state
