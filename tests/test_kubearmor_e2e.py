"""The kubearmor backend end to end: the real CLI, control plane and agents
over the local RabbitMQ (a vhost per test), each agent talking gRPC to a
KubeArmor daemon double of its own (kubearmor_double.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from brokerkit import wait_until
from fleetkit import Fleet
from kubearmor_double import KubeArmorDouble
from test_delivery_e2e import policy, write_policy

from edgeward.actors.bench import memory_kib
from edgeward.transport import topology
from edgeward.transport.connection import close_quietly
from edgeward.transport.wire import Record, decode

PSS_BUDGET_MIB = 96  # DESIGN.md: the agent's whole process tree


@pytest.fixture
def fleet(tmp_path: Path, broker_url: str) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path / "home", broker_url)
    yield fleet
    fleet.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, KubeArmorDouble]]:
    """One KubeArmor double per device, made on first use."""
    made: dict[str, KubeArmorDouble] = {}
    yield made
    for daemon in made.values():
        daemon.stop()


def enroll_with_kubearmor(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], device: str, *labels: str
) -> KubeArmorDouble:
    """Enroll ``device`` and point its agent at a KubeArmor double of its own."""
    daemon = daemons[device] = KubeArmorDouble(fleet.home / "kubearmor" / device, node=device)
    daemon.start()
    path = fleet.enroll(
        device, *labels, extra=["--backend", "kubearmor", "--kubearmor-address", daemon.address]
    )
    assert json.loads(path.read_text())["backend"] == {
        "kind": "kubearmor",
        "address": daemon.address,
    }
    return daemon


def test_enroll_refuses_a_kubearmor_address_for_the_builtin_backend(fleet: Fleet) -> None:
    done = fleet.run_cli(
        "enroll", "pos-0001", "--out", str(fleet.home / "x.json"), "--kubearmor-address", "h:1"
    )
    assert done.returncode == 2
    assert "--kubearmor-address needs --backend kubearmor" in done.stderr
    assert not (fleet.home / "x.json").exists()


def telemetry(fleet: Fleet, device: str) -> list[Record]:
    """The records ``device`` put on the telemetry stream so far (read from its start)."""
    conn = pika.BlockingConnection(pika.URLParameters(fleet.broker_url))
    records: list[Record] = []
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=1000)

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            records.append(Record.from_message(decode(body)))
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(
            topology.TELEMETRY_STREAM, on_message, arguments={"x-stream-offset": "first"}
        )
        conn.process_data_events(time_limit=0.5)
    finally:
        close_quietly(conn)  # a stream answers pika's reject of buffered deliveries with 540
    return [r for r in records if r.device == device and r.type in ("alert", "log")]


def applied(fleet: Fleet, tmp_path: Path, doc: dict[str, Any]) -> None:
    fleet.cli("policy", "apply", write_policy(tmp_path, doc))


def test_daemons_hold_exactly_the_policies_that_select_their_device_through_updates_and_deletes(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], tmp_path: Path
) -> None:
    # Given a control plane and two agents with the kubearmor backend, in two stores
    fleet.start_control_plane()
    berlin = enroll_with_kubearmor(fleet, daemons, "pos-0001", "store=berlin")
    paris = enroll_with_kubearmor(fleet, daemons, "pos-0002", "store=paris")
    fleet.start_agent("pos-0001")
    fleet.start_agent("pos-0002")
    # When policies for berlin, for paris and for every device are applied
    fleet.cli(
        "policy",
        "apply",
        write_policy(tmp_path, policy("berlin-only", {"store": "berlin"}, ["/usr/bin/nc"])),
        write_policy(tmp_path, policy("paris-only", {"store": "paris"}, ["/usr/bin/nc"])),
        write_policy(tmp_path, policy("everyone", {"kubearmor.io/hostname": "*"}, ["/bin/su"])),
    )
    fleet.wait_states({"pos-0001": "in_sync", "pos-0002": "in_sync"})
    # Then each daemon holds exactly what selects its device, tagged with revision 1
    assert berlin.names() == ["berlin-only", "everyone"]
    assert paris.names() == ["everyone", "paris-only"]
    assert berlin.tags("berlin-only") == ["edgeward-rev:1"]

    # When berlin's policy is updated
    applied(fleet, tmp_path, policy("berlin-only", {"store": "berlin"}, ["/usr/bin/ncat"]))
    wait_until(
        lambda: berlin.tags("berlin-only") == ["edgeward-rev:2"],
        timeout=30,
        message="the update never reached berlin's daemon",
    )
    # Then berlin's daemon holds the new content, and paris's saw no call at all
    assert berlin.policies["berlin-only"]["spec"]["process"] == {
        "matchPaths": [{"path": "/usr/bin/ncat"}]
    }
    assert ("ADDED", "berlin-only", "Modified") in berlin.calls
    paris_calls = len(paris.calls)

    # When it is deleted from the fleet
    fleet.cli("policy", "delete", "berlin-only")
    # Then berlin's daemon no longer holds it, and both devices are in sync
    wait_until(
        lambda: berlin.names() == ["everyone"], timeout=30, message="the delete never arrived"
    )
    rows = fleet.wait_states({"pos-0001": "in_sync", "pos-0002": "in_sync"})
    assert rows["pos-0001"]["reported_revision"] == 3
    assert paris.names() == ["everyone", "paris-only"] and len(paris.calls) == paris_calls


def test_a_stale_policy_a_restarted_daemon_replays_from_its_disk_is_reconciled_away(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], tmp_path: Path
) -> None:
    # Given an agent in sync whose daemon holds p
    fleet.start_control_plane()
    daemon = enroll_with_kubearmor(fleet, daemons, "pos-0001", "store=berlin")
    agent = fleet.start_agent("pos-0001")
    applied(fleet, tmp_path, policy("p", {"store": "berlin"}, ["/usr/bin/nc"]))
    fleet.wait_states({"pos-0001": "in_sync"})
    assert daemon.names() == ["p"]
    # When the daemon restarts with a policy on its disk that edgeward deleted long ago
    daemon.put_on_disk(policy("deleted-long-ago", {"store": "berlin"}, ["/bin/sh"]))
    daemon.restart()
    assert daemon.names() == ["deleted-long-ago", "p"]
    # Then the agent notices, and the daemon ends holding exactly p
    wait_until(lambda: daemon.names() == ["p"], timeout=30, message="stale policy still held")
    agent.wait_for_line("kubearmor reconciled: removed deleted-long-ago")
    assert fleet.devices()["pos-0001"]["state"] == "in_sync"


def test_a_policy_the_daemon_calls_invalid_fails_the_apply_and_the_last_good_set_stays(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], tmp_path: Path
) -> None:
    # Given an agent in sync at revision 1 with p in force
    fleet.start_control_plane()
    daemon = enroll_with_kubearmor(fleet, daemons, "pos-0001", "store=berlin")
    agent = fleet.start_agent("pos-0001")
    applied(fleet, tmp_path, policy("p", {"store": "berlin"}, ["/usr/bin/nc"]))
    fleet.wait_states({"pos-0001": "in_sync"})
    # When revision 2 adds q, which the daemon answers Invalid
    daemon.refuse("q", "Invalid")
    applied(fleet, tmp_path, policy("q", {"store": "berlin"}, ["/usr/bin/curl"]))
    # Then the device is failed, with the daemon's answer, and `edgeward devices` says so
    row = fleet.wait_states({"pos-0001": "failed"})["pos-0001"]
    assert "Invalid" in row["error"] and "'q'" in row["error"]
    assert row["reported_revision"] == 1
    table = fleet.cli("devices")
    assert "pos-0001" in table and "failed" in table
    agent.wait_for_line("apply failed: kubearmor answered Invalid")
    # And the last good set is still in force on the daemon
    assert daemon.names() == ["p"] and daemon.tags("p") == ["edgeward-rev:1"]

    # When the daemon accepts q again and comes back from a restart
    daemon.accept("q")
    daemon.restart()
    # Then the agent tries again at once and the device is in sync at revision 2
    row = fleet.wait_states({"pos-0001": "in_sync"}, timeout=20)["pos-0001"]
    assert row["reported_revision"] == 2
    assert daemon.names() == ["p", "q"] and daemon.tags("q") == ["edgeward-rev:2"]


def test_an_agent_started_before_its_daemon_puts_its_cached_set_in_force_once_it_answers(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], tmp_path: Path
) -> None:
    # Given an agent that was in sync with p, stopped
    fleet.start_control_plane()
    daemon = enroll_with_kubearmor(fleet, daemons, "pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    applied(fleet, tmp_path, policy("p", {"store": "berlin"}, ["/usr/bin/nc"]))
    fleet.wait_states({"pos-0001": "in_sync"})
    fleet.stop_agent("pos-0001")
    # When it starts while its daemon is down
    daemon.stop()
    agent = fleet.start_agent("pos-0001")
    # Then it says the apply failed, naming the daemon's address
    agent.wait_for_line(f"apply failed: kubearmor at {daemon.address}")
    fleet.wait_states({"pos-0001": "failed"})
    # When the daemon starts, replaying p and a stale copy from its disk
    daemon.put_on_disk(policy("stale", {"store": "berlin"}, ["/bin/sh"]))
    daemon.start()
    # Then the agent puts its cached set in force at once: exactly p, and in sync
    wait_until(lambda: daemon.names() == ["p"], timeout=20, message="daemon never reconciled")
    fleet.wait_states({"pos-0001": "in_sync"}, timeout=20)
    agent.wait_for_line("in force: revision 1")


def test_alerts_the_daemon_raises_reach_the_agents_outbox_with_the_revision_tag(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], tmp_path: Path
) -> None:
    # Given an agent in sync at revision 1, subscribed to its daemon's alerts and logs
    fleet.start_control_plane()
    daemon = enroll_with_kubearmor(fleet, daemons, "pos-0001", "store=berlin")
    agent = fleet.start_agent("pos-0001")
    applied(fleet, tmp_path, policy("no-netcat", {"store": "berlin"}, ["/usr/bin/nc"]))
    fleet.wait_states({"pos-0001": "in_sync"})
    wait_until(lambda: daemon.subscribers("alerts") and daemon.subscribers("logs"), timeout=20)
    # When the daemon blocks netcat under that policy, and logs a system event
    daemon.emit_alert_for("no-netcat", Resource="/usr/bin/nc", ProcessName="/usr/bin/nc")
    daemon.emit_log(Operation="Process", Resource="/usr/bin/apt")

    # Then both go through the agent's outbox to the telemetry stream, the alert naming revision 1
    def both() -> list[Record] | None:
        records = telemetry(fleet, "pos-0001")
        return records if len(records) == 2 else None

    records = wait_until(both, timeout=20, message="alert and log never reached the stream")
    # (two streams: which of the two comes first is up to the threads reading them)
    by_type = {record.type: record for record in records}
    alert, log = by_type["alert"], by_type["log"]
    assert alert.body["policy"] == "no-netcat" and alert.body["revision"] == 1
    assert alert.body["kubearmor"]["Tags"] == "edgeward-rev:1"
    assert log.body["Resource"] == "/usr/bin/apt"
    assert len({record.seq for record in records}) == 2
    agent.wait_for_line("outbox: 1 alerts, 1 logs kept since start")
    assert daemon.dropped["alerts"] == 0


def test_the_agent_with_the_kubearmor_backend_stays_within_the_memory_budget(
    fleet: Fleet, daemons: dict[str, KubeArmorDouble], tmp_path: Path
) -> None:
    # Given an agent connected to the broker and its daemon, in sync and subscribed
    fleet.start_control_plane()
    daemon = enroll_with_kubearmor(fleet, daemons, "pos-0001", "store=berlin")
    agent = fleet.start_agent("pos-0001")
    applied(fleet, tmp_path, policy("p", {"store": "berlin"}, ["/usr/bin/nc"]))
    fleet.wait_states({"pos-0001": "in_sync"})
    wait_until(lambda: daemon.subscribers("alerts") and daemon.subscribers("logs"), timeout=20)
    daemon.emit_alert_for("p")
    wait_until(lambda: telemetry(fleet, "pos-0001"), timeout=20, message="no alert sent")
    # When its whole process tree's memory is measured (agent and any children)
    memory = memory_kib(agent.popen.pid)
    pss, rss = memory["Pss"] / 1024, memory["Rss"] / 1024
    print(f"\nagent with kubearmor backend: PSS {pss:.1f} MiB, RSS {rss:.1f} MiB")
    # Then its PSS is within the design's budget
    assert 0 < pss <= PSS_BUDGET_MIB
