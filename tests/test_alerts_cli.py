"""`edgeward alerts` and `edgeward audit replay`: the real CLI against a
running control plane and the local RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerkit import wait_until
from fleetkit import CLI, Proc
from test_collector import Device, alert, running_control_plane, wait_stored

from edgeward.actors.cli import CliError, parse_when
from edgeward.actors.runtime import ControlPlane
from edgeward.transport.wire import Record

REQUIRED = {"device", "seq", "time", "policy", "action", "severity", "operation", "resource"}
REQUIRED |= {"source"}
NOW = time.time()


@pytest.fixture
def device(broker_url: str) -> Iterator[Device]:
    dev = Device(broker_url)
    yield dev
    dev.close()


@pytest.fixture
def plane(tmp_path: Path, broker_url: str) -> Iterator[ControlPlane]:
    plane = running_control_plane(
        tmp_path / "home", broker_url, collector_batch=20, collector_batch_ms=50
    )
    yield plane
    plane.stop()


@pytest.fixture
def env(plane: ControlPlane, broker_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "EDGEWARD_BROKER_URL": broker_url,
        "EDGEWARD_HOME": plane.settings.home,
        "EDGEWARD_ADMIN_PORT": str(plane.port),
        "PYTHONUNBUFFERED": "1",
    }


def edgeward(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    import subprocess

    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def alerts_json(env: dict[str, str], *args: str) -> list[dict]:
    code, out, err = edgeward(env, "alerts", "--json", *args)
    assert code == 0, out + err
    return json.loads(out)


@pytest.fixture
def some_alerts(plane: ControlPlane, device: Device) -> None:
    """Alerts of two devices, two policies, severities 2..8, over three days,
    and a log line (not an alert)."""
    device.publish(
        [
            alert("pos-0001", 1, severity=2, time=NOW - 3 * 86400),
            alert("pos-0001", 2, severity=8, time=NOW - 3600, policy="pos-no-shell"),
            alert("pos-0002", 1, severity=5, time=NOW - 60),
            alert("pos-0002", 2, severity=7, time=NOW - 30, policy="pos-no-shell"),
            Record("pos-0002", 3, NOW, "log", {"line": "not an alert"}),
        ]
    )
    wait_stored(plane, 5)


def keys(rows: list[dict]) -> list[tuple[str, int]]:
    return [(r["device"], r["seq"]) for r in rows]


def test_alerts_json_is_an_array_of_objects_with_the_documented_fields(
    env: dict[str, str], some_alerts: None
) -> None:
    rows = alerts_json(env)
    assert keys(rows) == [("pos-0001", 1), ("pos-0001", 2), ("pos-0002", 1), ("pos-0002", 2)]
    assert all(REQUIRED <= set(r) for r in rows)
    last = rows[-1]
    assert last["policy"] == "pos-no-shell" and last["severity"] == 7
    assert last["action"] == "Block" and last["operation"] == "Process"
    assert last["resource"] == "/usr/bin/curl" and last["source"] == "/bin/bash"
    assert last["time"] == pytest.approx(NOW - 30)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--device", "pos-0002"], [("pos-0002", 1), ("pos-0002", 2)]),
        (["--policy", "pos-no-shell"], [("pos-0001", 2), ("pos-0002", 2)]),
        (["--severity", "7"], [("pos-0001", 2), ("pos-0002", 2)]),
        (["--since", "2h"], [("pos-0001", 2), ("pos-0002", 1), ("pos-0002", 2)]),
        (["--since", "10m", "--severity", "6"], [("pos-0002", 2)]),
        (["--device", "pos-0001", "--policy", "pos-no-shell"], [("pos-0001", 2)]),
        (["--limit", "1"], [("pos-0002", 2)]),
        (["--device", "pos-0404"], []),
    ],
)
def test_alerts_are_filtered_by_device_policy_severity_and_since(
    env: dict[str, str], some_alerts: None, args: list[str], expected: list
) -> None:
    assert keys(alerts_json(env, *args)) == expected


def test_alerts_since_takes_an_iso_8601_time(env: dict[str, str], some_alerts: None) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 2 * 86400))
    assert len(alerts_json(env, "--since", when)) == 3


def test_alerts_print_a_table_for_people(env: dict[str, str], some_alerts: None) -> None:
    code, out, _ = edgeward(env, "alerts", "--device", "pos-0002")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["TIME", "DEVICE", "SEQ", "SEVERITY"]
    assert len(lines) == 3 and "pos-no-shell" in lines[2]
    code, out, _ = edgeward(env, "alerts", "--device", "pos-0404")
    assert code == 0 and out.strip() == "(none)"


@pytest.mark.parametrize("since", ["yesterday", "10 minutes", "-5m", "2026-13-01"])
def test_a_since_that_is_no_time_is_refused_with_exit_2(env: dict[str, str], since: str) -> None:
    code, _, err = edgeward(env, "alerts", "--since", since)
    assert code == 2 and "--since" in err
    code, _, err = edgeward(env, "audit", "replay", "--from", since)
    assert code == 2 and "--from" in err


def test_relative_times_count_back_from_now() -> None:
    assert parse_when("90s", "--since", now=1000.0) == 910.0
    assert parse_when("1.5h", "--since", now=10_000.0) == 10_000.0 - 5400
    assert parse_when("2d", "--since", now=200_000.0) == 200_000.0 - 172_800
    assert parse_when("1970-01-01T00:01:00+00:00", "--since") == 60.0
    with pytest.raises(CliError):
        parse_when("2h ago", "--since")


def test_follow_prints_new_alerts_as_they_arrive_until_ctrl_c(
    env: dict[str, str], some_alerts: None, device: Device
) -> None:
    # Given `alerts --follow` for one device, showing what is stored
    follower = Proc([*CLI, "alerts", "--follow", "--device", "pos-0002"], env, "alerts -f")
    try:
        follower.wait_for_line("pos-0002:2", timeout=30)
        # When new alerts arrive for it and for another device
        device.publish([alert("pos-0001", 3), alert("pos-0002", 4, resource="/usr/bin/nc")])
        # Then the new one of its device is printed within the deadline, and only it
        follower.wait_for_line("pos-0002:4", timeout=15)
        device.publish([alert("pos-0002", 5)])
        follower.wait_for_line("pos-0002:5", timeout=15)
        assert not follower.matching("pos-0001")
        assert "/usr/bin/nc" in follower.matching("pos-0002:4")[0]
    finally:
        # And Ctrl-C ends it cleanly
        code = follower.stop(signal.SIGINT)
    assert code == 0, follower.output
    assert len(follower.matching("pos-0002:")) == 4


def test_follow_json_prints_one_object_per_line(
    env: dict[str, str], some_alerts: None, device: Device
) -> None:
    follower = Proc([*CLI, "alerts", "-f", "--json", "--severity", "7"], env, "alerts -f")
    try:
        device.publish([alert("pos-0003", 1, severity=9)])
        follower.wait_for_line('"device": "pos-0003"', timeout=30)
    finally:
        follower.stop(signal.SIGINT)
    rows = [json.loads(line) for _, line in follower.lines if line.startswith("{")]
    assert keys(rows) == [("pos-0001", 2), ("pos-0002", 2), ("pos-0003", 1)]


def test_audit_replay_from_a_time_reads_into_a_fresh_store_and_says_how_many(
    env: dict[str, str], device: Device, tmp_path: Path, plane: ControlPlane
) -> None:
    # Given three alerts on the stream, then (a second later: stream times
    # are kept to the second) four more, a re-send and a forged one
    device.publish(alert("pos-0001", seq) for seq in (1, 2, 3))
    before = time.time()
    wait_until(lambda: time.time() >= int(before) + 1, timeout=3, message="clock stood still")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(before) + 1))
    device.publish(alert("pos-0001", seq) for seq in (4, 5, 6, 7))
    device.publish([alert("pos-0001", 5)])
    device.publish_raw("telemetry.pos-0002.alert", alert("pos-0001", 8).encode())
    # When the stream is replayed from that time into a fresh store
    into = tmp_path / "replayed.sqlite"
    code, out, err = edgeward(env, "audit", "replay", "--from", since, "--into", str(into))
    # Then it says it read six, stored four, counted the repeat and the forgery
    assert code == 0, out + err
    assert "read 6 records" in out
    assert "4 stored, 1 duplicates, 1 refused (device_mismatch 1)" in out
    assert keys(alerts_json(env, "--store", str(into))) == [("pos-0001", s) for s in (4, 5, 6, 7)]
    # And from a day ago it reads all of them; a store that exists is refused
    code, out, _ = edgeward(env, "audit", "replay", "--from", "1d", "--into", str(tmp_path / "b"))
    assert code == 0 and "read 9 records" in out and "7 stored" in out
    code, _, err = edgeward(env, "audit", "replay", "--from", "1d", "--into", str(into))
    assert code == 2 and "exists" in err


def test_alerts_without_a_control_plane_exit_3_naming_the_address(broker_url: str) -> None:
    from brokerkit import free_port

    port = free_port()
    env = {**os.environ, "EDGEWARD_ADMIN_PORT": str(port), "EDGEWARD_BROKER_URL": broker_url}
    code, _, err = edgeward(env, "alerts")
    assert code == 3 and f"127.0.0.1:{port}" in err


def test_audit_status_says_what_is_stored_and_how_far_behind_the_stream_it_is(
    env: dict[str, str], some_alerts: None, device: Device, tmp_path: Path
) -> None:
    # Given five records stored, one repeat and one forgery on the stream
    device.publish([alert("pos-0001", 1, severity=2, time=NOW - 3 * 86400)])
    device.publish_raw("telemetry.pos-0003.alert", alert("pos-0001", 9).encode())

    # When the operator asks for the audit trail's status (once it read them)
    def status() -> dict:
        code, out, err = edgeward(env, "audit", "status", "--json")
        assert code == 0, out + err
        return json.loads(out)

    got = wait_until(
        lambda: (s := status())["duplicates"] == 1 and s["refused"] and s,
        timeout=30,
        message="the repeat and the forgery were never counted",
    )
    # Then it counts the records by type and device, the repeat and the refusal
    assert got["records"] == 5 and got["by_type"] == {"alert": 4, "log": 1}
    assert got["devices"] == 2 and got["refused"] == {"device_mismatch": 1}
    assert got["first_time"] == pytest.approx(NOW - 3 * 86400)
    # And the stream's tail is its stored offset: nothing waits to be stored
    assert got["offset"] == 6 and got["stream"] == {"tail": 6, "lag": 0}
    assert got["collector"]["connected"] and got["collector"]["restarts"] == 0
    # And people get the same as lines
    code, out, _ = edgeward(env, "audit", "status")
    assert code == 0
    assert "5 from 2 devices (4 alerts, 1 logs)" in out
    assert "tail offset 6, lag 0 offsets" in out and "device_mismatch 1" in out
