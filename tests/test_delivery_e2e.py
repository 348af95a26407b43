"""Policy delivery end to end: the real CLI, control plane and agents, against
the local RabbitMQ, each test in a vhost of its own."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pika
import pytest
from brokerkit import free_port, wait_until
from fleetkit import CLI, Fleet, Proc
from tcpproxy import TcpProxy

from edgeward.transport import topology
from edgeward.transport.connection import close_quietly
from edgeward.transport.signing import Signer
from edgeward.transport.wire import Bundle, SignedBundle, decode

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples"


def policy(name: str, selector: dict[str, str], paths: list[str], action: str = "Block") -> dict:
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": selector},
            "process": {"matchPaths": [{"path": p} for p in paths]},
            "action": action,
        },
    }


def write_policy(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / f"{doc['metadata']['name']}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return str(path)


@pytest.fixture
def fleet(tmp_path: Path, broker_url: str):
    fleet = Fleet(tmp_path / "home", broker_url)
    yield fleet
    fleet.close()


def test_policies_reach_exactly_the_devices_they_select(fleet: Fleet, tmp_path: Path) -> None:
    # Given a control plane and three agents in two stores
    fleet.start_control_plane()
    for device, label in [
        ("pos-0001", "store=berlin"),
        ("pos-0002", "store=berlin"),
        ("pos-0003", "store=paris"),
    ]:
        fleet.enroll(device, label)
        fleet.start_agent(device)
    # When the example policies are applied
    fleet.cli("policy", "apply", *sorted(str(p) for p in (EXAMPLES / "policies").glob("*.yaml")))
    # Then every device is in sync with revision 1
    rows = fleet.wait_states({"pos-0001": "in_sync", "pos-0002": "in_sync", "pos-0003": "in_sync"})
    assert {r["desired_revision"] for r in rows.values()} == {1}
    # When a policy only paris selects is applied
    fleet.cli(
        "policy",
        "apply",
        write_policy(tmp_path, policy("paris-only", {"store": "paris"}, ["/usr/bin/paris-tool"])),
    )

    # Then only paris moves to revision 2, and every device is in sync
    def paris_moved():
        rows = fleet.devices()
        ok = rows["pos-0003"]["reported_revision"] == 2 and all(
            r["state"] == "in_sync" for r in rows.values()
        )
        return rows if ok else None

    rows = wait_until(paris_moved, timeout=30, message="paris never reached revision 2")
    assert rows["pos-0001"]["desired_revision"] == 1
    assert rows["pos-0002"]["desired_revision"] == 1
    assert fleet.agents["pos-0003"].matching("in force: revision 2")
    assert not fleet.agents["pos-0001"].matching("in force: revision 2")


def test_agent_offline_during_five_revisions_applies_each_once_in_order(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Given an agent in sync with revision 1
    fleet.start_control_plane()
    fleet.enroll("pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.wait_states({"pos-0001": "in_sync"})
    # When it is stopped and five revisions are applied meanwhile
    fleet.stop_agent("pos-0001")
    for i in range(5):
        fleet.cli(
            "policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, [f"/a{i}"]))
        )
    # Then, restarted, it ends at revision 6, having applied 2..6 once each, in order
    agent = fleet.start_agent("pos-0001")
    rows = fleet.wait_states({"pos-0001": "in_sync"})
    assert rows["pos-0001"]["reported_revision"] == 6
    applied = [line.split("revision ")[1].split(" ")[0] for line in agent.matching("in force:")]
    assert applied == ["1", "2", "3", "4", "5", "6"]  # 1 from the cache, then each change


def test_agent_without_network_enforces_cached_policy_then_catches_up(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Given an agent that reaches the broker only through a proxy we control
    proxy_port = free_port()
    proxy = TcpProxy(proxy_port, ("127.0.0.1", 5672)).start()
    via_proxy = fleet.broker_url.replace(":5672/", f":{proxy_port}/")
    fleet.start_control_plane()
    fleet.enroll("pos-0001", "store=berlin", broker_url=via_proxy)
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.wait_states({"pos-0001": "in_sync"})
    fleet.stop_agent("pos-0001")
    try:
        # When the network is gone, a revision is applied, and the agent starts
        proxy.stop()
        fleet.cli(
            "policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/b"]))
        )
        agent = fleet.start_agent("pos-0001")
        # Then its cached revision is in force at once, without the broker
        took = agent.wait_for_line("in force: revision 1", timeout=5)
        assert took < 5
        assert not agent.matching("connected to")
        # When the network comes back, it connects and catches up
        proxy.start()
        agent.wait_for_line("in force: revision 2", timeout=60)
        fleet.wait_states({"pos-0001": "in_sync"})
    finally:
        proxy.stop()


def _stream_messages(broker_url: str) -> list[bytes]:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=100)
        bodies: list[bytes] = []

        def on_message(ch, method, props, body):
            bodies.append(body)
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(
            topology.POLICY_STREAM, on_message, arguments={"x-stream-offset": "first"}
        )
        conn.process_data_events(time_limit=1.0)
        return bodies
    finally:
        # Deliveries pika buffered after the last read are rejected on close,
        # which a stream answers with a 540: expected, not a failure.
        close_quietly(conn)


def _publish_raw(broker_url: str, body: bytes) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(topology.POLICY_EXCHANGE, "", body, topology.policy_properties())
    finally:
        conn.close()


def test_forged_and_replayed_bundles_are_refused_and_counted_and_policy_stays(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Given an agent in sync at revision 2
    fleet.start_control_plane()
    fleet.enroll("pos-0001", "store=berlin")
    agent = fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/b"])))
    before = fleet.wait_states({"pos-0001": "in_sync"})["pos-0001"]
    assert before["reported_revision"] == 2
    genuine = [SignedBundle.from_message(decode(b)) for b in _stream_messages(fleet.broker_url)]
    real_key_id = genuine[0].key_id
    evil = Signer.generate()
    forged_state = Bundle(
        revision=3,
        issued_at=0.0,
        mode="snapshot",
        policies=(policy("p", {"store": "berlin"}, ["/evil"]),),
        sha256="0",
    )
    # When someone publishes straight onto the stream: a bundle signed by
    # another key claiming ours, one signed by an unknown key, and a replay
    # of revision 1
    claimed = evil.sign(forged_state)
    _publish_raw(fleet.broker_url, SignedBundle(real_key_id, claimed.sig, claimed.body).encode())
    _publish_raw(fleet.broker_url, evil.sign(forged_state).encode())
    _publish_raw(fleet.broker_url, genuine[0].encode())

    # Then each is refused and counted by reason, and the device stays in sync at revision 2
    def counted():
        row = fleet.devices()["pos-0001"]
        return row if sum(row["rejected"].values()) >= 3 else None

    row = wait_until(counted, timeout=30, message="rejections never reported")
    assert row["rejected"] == {"bad_signature": 1, "unknown_key": 1, "stale": 1}
    assert row["state"] == "in_sync" and row["reported_revision"] == 2
    assert len(agent.matching("refused")) == 3
    assert agent.popen.poll() is None


def test_agent_that_missed_what_retention_dropped_recovers_through_a_snapshot(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Given a policy stream that keeps only a few kilobytes, and no periodic snapshots
    fleet.start_control_plane(
        "--retention-max-bytes",
        "4000",
        "--retention-segment-bytes",
        "1000",
        "--snapshot-every",
        "1000",
    )
    fleet.enroll("pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.wait_states({"pos-0001": "in_sync"})
    fleet.stop_agent("pos-0001")
    # When many large revisions push what the agent has not read out of retention
    for i in range(12):
        paths = [f"/opt/pos/bin/tool-{i}-{j}" for j in range(40)]
        fleet.cli(
            "policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, paths))
        )
    bodies = _stream_messages(fleet.broker_url)
    first = Bundle.decode_body(SignedBundle.from_message(decode(bodies[0])).body)
    assert first.revision > 2, "retention did not drop the old revisions; the test proves nothing"
    agent = fleet.start_agent("pos-0001")
    # Then it notices the gap, gets a snapshot, and ends in sync at the latest revision
    agent.wait_for_line("gap in the policy stream", timeout=30)
    agent.wait_for_line("recovered from snapshot 13", timeout=60)
    row = fleet.wait_states({"pos-0001": "in_sync"})["pos-0001"]
    assert row["gaps"] >= 1 and row["fleet_revision"] == 13


def test_control_plane_restart_keeps_revisions_and_devices(fleet: Fleet, tmp_path: Path) -> None:
    # Given a control plane with a device and two revisions
    fleet.start_control_plane()
    fleet.enroll("pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("q", {"store": "x"}, ["/b"])))
    fleet.wait_states({"pos-0001": "in_sync"})
    history = fleet.history()
    # When it is stopped (cleanly, exit 0) and started again
    fleet.stop_control_plane()
    fleet.start_control_plane()
    # Then history, policies and devices are as they were, and rollouts go on
    assert fleet.history() == history
    assert {p["name"] for p in json.loads(fleet.cli("policy", "list", "--json"))} == {"p", "q"}
    assert fleet.devices()["pos-0001"]["labels"] == {"store": "berlin"}
    fleet.cli("policy", "rollback", "1")
    assert [h["revision"] for h in fleet.history()] == [1, 2, 3]
    assert {p["name"] for p in json.loads(fleet.cli("policy", "list", "--json"))} == {"p"}
    # (revision 3 drops q, which the device never selected: it stays in sync
    # all along, and its fleet revision moves to 3)
    wait_until(
        lambda: fleet.devices()["pos-0001"]["fleet_revision"] == 3,
        timeout=30,
        message="the device never processed revision 3",
    )
    assert fleet.devices()["pos-0001"]["state"] == "in_sync"


@pytest.mark.parametrize(
    "path", sorted((DATA / "policies" / "invalid").glob("*.yaml")), ids=lambda p: p.name
)
def test_invalid_policy_file_is_refused_with_exit_2_and_nothing_is_published(
    fleet: Fleet, path: Path, broker_admin, vhost: str
) -> None:
    # Given a running control plane
    if fleet.control is None:
        fleet.start_control_plane()
    # When an invalid file is applied
    done = fleet.run_cli("policy", "apply", str(path))
    # Then the CLI exits 2 naming the file, and nothing reached the stream
    assert done.returncode == 2, done.stdout + done.stderr
    assert path.name in done.stderr
    assert fleet.history() == []
    assert _stream_messages(fleet.broker_url) == []


def test_every_client_fails_over_to_a_node_that_answers(fleet: Fleet, tmp_path: Path) -> None:
    # Given a URL list whose first node is down
    dead = fleet.broker_url.replace(":5672/", f":{free_port()}/")
    fleet.env["EDGEWARD_BROKER_URL"] = f"{dead},{fleet.broker_url}"
    # Then the CLI, the control plane and an agent all work through the live one
    assert "topology declared" in fleet.cli("broker", "up")
    fleet.start_control_plane()
    fleet.enroll("pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.wait_states({"pos-0001": "in_sync"}, timeout=60)


def test_unreachable_control_plane_and_broker_exit_3_naming_the_address(fleet: Fleet) -> None:
    done = fleet.run_cli("devices")
    assert done.returncode == 3 and f"127.0.0.1:{fleet.port}" in done.stderr
    fleet.env["EDGEWARD_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    done = fleet.run_cli("broker", "up")
    assert done.returncode == 3 and "127.0.0.1" in done.stderr


def test_the_audit_trail_keeps_the_retention_asked_for_and_a_conflict_is_named(
    fleet: Fleet, vhost: str, broker_admin
) -> None:
    from edgeward.transport import topology

    # Given a broker prepared with a 7-day, 1 GiB audit trail
    fleet.cli("broker", "up", "--telemetry-max-age", "7D", "--telemetry-max-bytes", "1073741824")
    stream = broker_admin.queue_info(vhost, topology.TELEMETRY_STREAM)
    assert stream["arguments"]["x-max-age"] == "7D"
    assert stream["arguments"]["x-max-length-bytes"] == 1024**3
    # When the control plane is started asking for another retention
    fleet.control = Proc(
        [*CLI, "control-plane", "run", "--telemetry-max-age", "30D", "--telemetry-max-bytes", "1G"],
        fleet.env,
        "control plane",
    )
    # Then it says why it cannot use the broker, naming both values
    fleet.control.wait_for_line("received '30D' but current is '7D'", timeout=30)
    # And the CLI refuses the same with exit 2
    done = fleet.run_cli("broker", "up", "--telemetry-max-age", "30D")
    assert done.returncode == 2 and "fixed when it is made" in done.stderr
    # And a retention that is not one gets exit 2 before the broker is asked
    done = fleet.run_cli("broker", "up", "--telemetry-max-age", "a week")
    assert done.returncode == 2 and "like 90D" in done.stderr


def test_agent_killed_mid_run_restarts_from_its_cache(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_control_plane()
    fleet.enroll("pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.wait_states({"pos-0001": "in_sync"})
    fleet.stop_agent("pos-0001", signal.SIGKILL)
    agent = fleet.start_agent("pos-0001")
    agent.wait_for_line("in force: revision 1", timeout=10)
    fleet.wait_states({"pos-0001": "in_sync"})
    assert len(agent.matching("in force:")) == 1  # nothing re-applied from the stream


def test_silent_device_is_shown_offline_after_the_configured_silence(fleet: Fleet, tmp_path):
    # Given a control plane that calls a device offline after 3 s of silence
    fleet.start_control_plane("--offline-after", "3")
    fleet.enroll("pos-0001", "store=berlin")
    fleet.start_agent("pos-0001")
    fleet.cli("policy", "apply", write_policy(tmp_path, policy("p", {"store": "berlin"}, ["/a"])))
    fleet.wait_states({"pos-0001": "in_sync"})
    # When the agent goes away
    fleet.stop_agent("pos-0001")
    # Then it is offline, and `devices --state offline` lists it
    fleet.wait_states({"pos-0001": "offline"}, timeout=20)
    listed = json.loads(fleet.cli("devices", "--state", "offline", "--json"))
    assert [r["device"] for r in listed] == ["pos-0001"]


def test_a_full_snapshot_follows_every_nth_revision(fleet: Fleet, tmp_path: Path) -> None:
    # Given snapshots every 2 revisions
    fleet.start_control_plane("--snapshot-every", "2")
    # When two revisions are applied
    for i in range(2):
        fleet.cli(
            "policy", "apply", write_policy(tmp_path, policy(f"p{i}", {"store": "berlin"}, ["/a"]))
        )

    # Then the stream holds delta 1, delta 2 and a snapshot of revision 2 with both policies
    def three():
        bodies = _stream_messages(fleet.broker_url)
        return bodies if len(bodies) == 3 else None

    bodies = wait_until(three, timeout=10, message="no snapshot on the stream")
    bundles = [Bundle.decode_body(SignedBundle.from_message(decode(b)).body) for b in bodies]
    assert [(b.mode, b.revision) for b in bundles] == [("delta", 1), ("delta", 2), ("snapshot", 2)]
    assert sorted(p["metadata"]["name"] for p in bundles[2].policies) == ["p0", "p1"]
