"""The TelemetryCollector against the local RabbitMQ: records published as a
device publishes them reach the audit store once, whatever else is on the
stream, and through a kill -9 of the collector in the middle of a batch."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pika
import pytest
from brokerkit import free_port, wait_until

from edgeward.actors import messages as m
from edgeward.actors.audit_store import AuditStore
from edgeward.actors.collector import audit_path
from edgeward.actors.runtime import ControlPlane
from edgeward.transport import topology
from edgeward.transport.wire import CONTENT_TYPE, Record

# -- helpers (also used by test_alerts_cli.py) --------------------------------


def alert(device: str, seq: int, **body: Any) -> Record:
    """An alert as a device's outbox would send it."""
    fields = {
        "policy": "pos-block-network-tools",
        "action": "Block",
        "severity": 5,
        "operation": "Process",
        "resource": "/usr/bin/curl",
        "source": "/bin/bash",
        "tags": ["MITRE"],
        "message": "network tool executed",
        "revision": 1,
    }
    when = body.pop("time", time.time())
    fields.update(body)
    return Record(device, seq, when, "alert", fields)


class Device:
    """Publishes on the telemetry exchange the way an agent does."""

    def __init__(self, broker_url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.conn.channel()
        topology.declare(self.channel)
        self.channel.confirm_delivery()

    def publish_raw(self, routing_key: str, body: bytes, message_id: str = "") -> None:
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2, message_id=message_id or None
        )
        self.channel.basic_publish(topology.TELEMETRY_EXCHANGE, routing_key, body, props)

    def publish(self, records: Iterable[Record]) -> None:
        for rec in records:
            self.publish_raw(rec.routing_key, rec.encode(), rec.message_id)

    def close(self) -> None:
        self.conn.close()


def running_control_plane(home: Path, broker_url: str, **settings: Any) -> ControlPlane:
    """The control plane's actors, started from this process. Its devices
    share the test's login (:class:`Device` publishes as guest) unless a
    test says ``allow_shared_login=False``."""
    settings.setdefault("allow_shared_login", True)
    plane = ControlPlane(m.Settings(home=str(home), broker_url=broker_url, **settings), free_port())
    try:
        plane.start()
        wait_until(
            lambda: plane.collector_status().get("connected"),
            timeout=30,
            message="the collector never connected",
        )
    except BaseException:
        plane.stop()  # its actor processes would outlive the test run
        raise
    return plane


def stored(home: Path) -> AuditStore:
    return AuditStore(audit_path(str(home)))


def wait_stored(plane: ControlPlane, count: int, timeout: float = 30.0) -> dict[str, Any]:
    return wait_until(
        lambda: (s := plane.collector_status()).get("stored", 0) >= count and s,
        timeout=timeout,
        message=f"fewer than {count} records stored",
    )


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def device(broker_url: str) -> Iterator[Device]:
    dev = Device(broker_url)
    yield dev
    dev.close()


@pytest.fixture
def plane(home: Path, broker_url: str) -> Iterator[ControlPlane]:
    plane = running_control_plane(home, broker_url, collector_batch=50, collector_batch_ms=100)
    yield plane
    plane.stop()


# -- tests ---------------------------------------------------------------------------


def test_records_a_device_publishes_are_stored_once_each_with_their_stream_offset(
    plane: ControlPlane, device: Device, home: Path
) -> None:
    # When a device publishes 120 alerts and a log and an event
    device.publish(alert("pos-0001", seq) for seq in range(1, 121))
    device.publish(
        [
            Record("pos-0001", 121, time.time(), "log", {"line": "kubearmor started"}),
            Record("pos-0001", 122, time.time(), "event", {"event": "revision_applied"}),
        ]
    )
    # Then all 122 are stored, once, and the stored offset is the last one read
    status = wait_stored(plane, 122)
    assert status["duplicates"] == 0 and status["refused"] == {}
    store = stored(home)
    assert store.keys() == [("pos-0001", seq) for seq in range(1, 123)]
    assert store.count("alert") == 120
    assert store.offset() == 121  # offsets count from 0


def test_a_record_published_twice_is_stored_once_and_counted_as_a_duplicate(
    plane: ControlPlane, device: Device, home: Path
) -> None:
    # Given a stored alert
    first = alert("pos-0001", 7)
    device.publish([first])
    wait_stored(plane, 1)
    # When the agent sends it again (a lost confirm), twice, and a new one
    device.publish([first, first, alert("pos-0001", 8)])
    # Then the new one is stored and the repeats are counted, not stored
    status = wait_until(
        lambda: (s := plane.collector_status())["stored"] == 2 and s["duplicates"] == 2 and s,
        timeout=30,
        message="duplicates not counted",
    )
    assert status["refused"] == {}
    assert stored(home).keys() == [("pos-0001", 7), ("pos-0001", 8)]


def test_malformed_messages_are_counted_by_reason_and_the_consumer_goes_on(
    plane: ControlPlane, device: Device, home: Path
) -> None:
    # When the stream gets garbage of several kinds between two good records
    device.publish([alert("pos-0001", 1)])
    device.publish_raw("telemetry.pos-0001.alert", b"\xff not cbor")
    device.publish_raw("telemetry.pos-0001.alert", cbor2.dumps({"v": 99, "kind": "record"}))
    device.publish_raw("telemetry.pos-0001.log", cbor2.dumps({"v": 1, "kind": "bundle"}))
    bad_seq = {"v": 1, "kind": "record", "device": "pos-0001", "seq": 0, "time": 1.0}
    device.publish_raw("telemetry.pos-0001.event", cbor2.dumps({**bad_seq, "type": "event"}))
    device.publish_raw("telemetry.pos-0001.alert", alert("pos-0001", 3).encode()[:10])
    device.publish([alert("pos-0001", 2)])
    # Then both good records are stored and each bad one is counted by its reason
    status = wait_stored(plane, 2)
    wait_until(
        lambda: sum((s := plane.collector_status())["refused"].values()) == 5 and s,
        timeout=30,
        message="refusals not counted",
    )
    assert plane.collector_status()["refused"] == {
        "malformed": 3,
        "unknown_version": 1,
        "unknown_kind": 1,
    }
    assert status["reader"]["connected"] and plane.collector_status()["restarts"] == 0
    assert stored(home).keys() == [("pos-0001", 1), ("pos-0001", 2)]


def test_a_record_naming_another_device_than_its_routing_key_is_refused_and_counted(
    plane: ControlPlane, device: Device, home: Path
) -> None:
    # When pos-0002 publishes a record claiming to come from pos-0001, and
    # an alert under a log routing key
    forged = alert("pos-0001", 1, resource="/etc/shadow")
    device.publish_raw("telemetry.pos-0002.alert", forged.encode())
    device.publish_raw("telemetry.pos-0002.log", alert("pos-0002", 1).encode())
    device.publish([alert("pos-0002", 2)])
    # Then neither is stored, each is counted, and the next genuine record is stored
    wait_stored(plane, 1)
    status = wait_until(
        lambda: sum((s := plane.collector_status())["refused"].values()) == 2 and s,
        timeout=30,
        message="refusals not counted",
    )
    assert status["refused"] == {"device_mismatch": 1, "type_mismatch": 1}
    assert stored(home).keys() == [("pos-0002", 2)]


def test_collector_killed_in_the_middle_of_a_batch_stores_every_record_exactly_once(
    home: Path, broker_url: str, device: Device
) -> None:
    # Given a collector that commits every 1,000 records (and not by time)
    plane = running_control_plane(
        home, broker_url, collector_batch=1000, collector_batch_ms=600_000
    )
    try:
        # When 1,000 records arrive they are committed as one batch; and of
        # 500 more, none is (a batch that received everything in one pump
        # commits it all, so the two are sent apart)
        device.publish(alert(f"pos-{i % 7:04d}", i // 7 + 1) for i in range(1000))
        wait_stored(plane, 1000, timeout=60)
        device.publish(alert(f"pos-{i % 7:04d}", i // 7 + 1) for i in range(1000, 1500))
        state = wait_until(
            lambda: (r := plane.collector_status()["reader"]) and r["pending"] == 500 and r,
            timeout=60,
            message="the collector never held a half batch",
        )
        assert stored(home).count() == 1000 and stored(home).offset() == 999
        # and the collector's reader is killed with SIGKILL in the middle of that batch
        os.kill(state["pid"], signal.SIGKILL)
        # Then a new reader starts from the stored offset, not from what was received
        restarted = wait_until(
            lambda: (
                (s := plane.collector_status())["restarts"] == 1
                and s["reader"]
                and s["reader"]["connected"]
                and s
            ),
            timeout=60,
            message="the reader was not restarted",
        )
        assert restarted["reader"]["pid"] != state["pid"]
        assert restarted["reader"]["resumed_from"] == 999
        # When 500 more arrive, with 100 already-stored records sent again
        device.publish(alert(f"pos-{i % 7:04d}", i // 7 + 1) for i in range(1500, 2000))
        device.publish(alert(f"pos-{i % 7:04d}", i // 7 + 1) for i in range(100))
        # and 2,000 more behind them, so that whatever the batches' boundaries
        # (stream offsets are not dense), every record above is in a commit
        device.publish(alert("pos-9999", seq) for seq in range(1, 2001))
        # Then every record is stored exactly once and the repeats are counted
        wait_stored(plane, 3000, timeout=60)
        keys = stored(home).keys()
        assert len(keys) == len(set(keys))
        ours = sorted(k for k in keys if k[0] != "pos-9999")
        assert ours == sorted((f"pos-{i % 7:04d}", i // 7 + 1) for i in range(2000))
        wait_until(
            lambda: plane.collector_status()["duplicates"] == 100,
            timeout=30,
            message="the re-sent records were not counted as duplicates",
        )
    finally:
        plane.stop()


def test_a_restarted_control_plane_resumes_after_its_stored_offset(
    home: Path, broker_url: str, device: Device
) -> None:
    # Given 30 records stored by a control plane that then stops
    plane = running_control_plane(home, broker_url, collector_batch=10, collector_batch_ms=100)
    device.publish(alert("pos-0001", seq) for seq in range(1, 31))
    wait_stored(plane, 30)
    plane.stop()
    # When 20 more arrive while it is down, and it starts again
    device.publish(alert("pos-0001", seq) for seq in range(31, 51))
    plane = running_control_plane(home, broker_url, collector_batch=10, collector_batch_ms=100)
    try:
        # Then it reads only the new ones: nothing is read twice
        status = wait_stored(plane, 50)
        assert status["reader"]["resumed_from"] == 29
        assert status["duplicates"] == 0
        assert stored(home).keys() == [("pos-0001", seq) for seq in range(1, 51)]
    finally:
        plane.stop()


# -- end to end, through a real agent ------------------------------------------------


def test_an_alert_a_real_agent_raises_reaches_edgeward_alerts_once(
    tmp_path: Path, broker_url: str
) -> None:
    import json

    from fleetkit import CLI, Fleet, Proc

    fleet = Fleet(tmp_path / "fleet", broker_url)
    try:
        # Given a control plane, an agent judging events from a file, and a
        # policy that blocks curl on its store
        metrics_port = free_port()
        fleet.start_control_plane("--metrics-port", str(metrics_port))
        config = fleet.enroll("pos-0001", "store=berlin")
        doc = {
            "apiVersion": "security.kubearmor.com/v1",
            "kind": "KubeArmorHostPolicy",
            "metadata": {"name": "pos-block-curl"},
            "spec": {
                "nodeSelector": {"matchLabels": {"store": "berlin"}},
                "severity": 7,
                "process": {"matchPaths": [{"path": "/usr/bin/curl"}]},
                "action": "Block",
            },
        }
        (tmp_path / "p.yaml").write_text(json.dumps(doc))
        fleet.cli("policy", "apply", str(tmp_path / "p.yaml"))
        events = tmp_path / "events.jsonl"
        events.write_text("")
        agent = Proc(
            [*CLI, "agent", "run", "--config", str(config), "--events-from", str(events)],
            fleet.env,
            "pos-0001",
        )
        fleet.agents["pos-0001"] = agent
        agent.wait_for_line("in force: revision 1", timeout=60)
        fleet.wait_states({"pos-0001": "in_sync"}, timeout=60)
        # When the device runs curl (and something harmless)
        with events.open("a") as fh:
            fh.write(json.dumps({"op": "exec", "path": "/usr/bin/ls", "source": "/bin/sh"}) + "\n")
            fh.write(json.dumps({"op": "exec", "path": "/usr/bin/curl", "source": "/bin/sh"}))
            fh.write("\n")

        # Then `edgeward alerts` shows exactly one alert for it, from that policy
        def alerted() -> list[dict]:
            return json.loads(fleet.cli("alerts", "--json", "--device", "pos-0001"))

        rows = wait_until(alerted, timeout=60, interval=0.3, message="no alert reached the store")
        assert len(rows) == 1
        assert rows[0]["policy"] == "pos-block-curl" and rows[0]["action"] == "Block"
        assert rows[0]["resource"] == "/usr/bin/curl" and rows[0]["seq"] >= 1
        # and the agent's own events are in the audit trail too
        assert stored(fleet.home).count("event") >= 1
        # When the agent is killed, restarted, and runs curl once more
        fleet.stop_agent("pos-0001", signal.SIGKILL)
        fleet.agents["pos-0001"] = Proc(
            [*CLI, "agent", "run", "--config", str(config), "--events-from", str(events)],
            fleet.env,
            "pos-0001",
        )
        with events.open("a") as fh:
            fh.write(json.dumps({"op": "exec", "path": "/usr/bin/curl", "source": "/bin/bash"}))
            fh.write("\n")
        # Then the new alert arrives after anything re-sent, and each is stored once
        rows = wait_until(
            lambda: len(r := alerted()) >= 2 and r,
            timeout=60,
            interval=0.3,
            message="the alert after the restart never arrived",
        )
        assert [r["source"] for r in rows] == ["/bin/sh", "/bin/bash"]
        assert len({(r["device"], r["seq"]) for r in rows}) == 2
        # And the agent timed its publishes' confirms into the fleet's histogram
        # (at least the last alert's: the killed agent's counts since its
        # last heartbeat died with it)
        from test_metrics_endpoint import scrape

        count = ("edgeward_telemetry_confirm_seconds_count", ())
        wait_until(
            lambda: scrape(metrics_port).get(count, 0) >= 1,
            timeout=30,
            message="no confirm latency reached /metrics",
        )
    finally:
        fleet.close()


def test_records_retention_removed_before_they_were_read_are_counted_not_silent(
    home: Path, broker_url: str, device: Device
) -> None:
    # Given an audit stream that keeps only a few kilobytes, and 5 records stored
    small = {
        "telemetry_max_bytes": 4000,
        "telemetry_segment_bytes": 1000,
        "collector_batch": 10,
        "collector_batch_ms": 100,
    }
    # (the device's fixture declared the topology with the default retention)
    device.channel.queue_delete(topology.TELEMETRY_STREAM)
    plane = running_control_plane(home, broker_url, **small)
    device.publish(alert("pos-0001", seq) for seq in range(1, 6))
    wait_stored(plane, 5)
    plane.stop()
    # When 200 more arrive while the collector is down, pushing most out of the stream
    device.publish(alert("pos-0001", seq) for seq in range(6, 206))
    plane = running_control_plane(home, broker_url, **small)
    try:
        # Then what was left is stored, and what retention took is counted
        status = wait_until(
            lambda: (s := plane.collector_status()).get("lost_to_retention") and s,
            timeout=30,
            message="the gap was not counted",
        )
        wait_until(
            lambda: ("pos-0001", 205) in stored(home).keys(),
            timeout=30,
            message="the last record was not stored",
        )
        status = plane.collector_status()
        # (offsets skipped bound the records lost: the stream spends an offset
        # of its own at each segment start)
        assert status["stored"] + status["lost_to_retention"] >= 205
        seqs = [seq for _, seq in stored(home).keys()]
        tail = seqs[5:]
        assert seqs[:5] == [1, 2, 3, 4, 5] and tail == list(range(tail[0], 206))
        assert status["stored"] == len(seqs) < 205
    finally:
        plane.stop()
