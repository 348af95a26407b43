"""The fleet simulator's smoke scenario, run for real against the local
broker (the simulator makes and removes vhosts of its own, and a broker user
per device), with the report's arithmetic checked."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeward.simulator.run import largest_bundle
from edgeward.simulator.scenario import ScenarioError, device_name, labels_for, load, parse

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "simulator" / "scenarios" / "smoke.toml"


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory, broker_admin) -> dict:
    out = tmp_path_factory.mktemp("smoke")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeward.actors.cli",
            "simulate",
            str(SMOKE),
            "--report",
            str(out),
            "--broker-url",
            "amqp://guest:guest@127.0.0.1:5672/%2F",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    report["_dir"] = str(out)
    report["_stdout"] = done.stdout
    # The broker's users right after the run (the simulator should have removed its own)
    report["_users_after"] = [u["name"] for u in broker_admin.request("GET", "/users")]
    return report


def test_every_online_device_converged_and_nothing_was_lost(smoke_report: dict) -> None:
    r = smoke_report
    assert r["completed"] is True
    assert r["devices"] == 200 and r["connected_max"] == 200
    assert r["converged"] is True
    assert r["messages"]["expected"] == r["messages"]["received"] + r["messages_lost"]
    assert r["messages_lost"] == 0
    assert r["unexpected_closes"] == 0


def test_every_device_logged_in_as_a_broker_user_of_its_own_removed_after_the_run(
    smoke_report: dict,
) -> None:
    logins = smoke_report["logins"]
    assert logins["mode"] == "device"
    assert logins["users"] == 200 and logins["removed"] == 200 and logins["left"] == 0
    # making them is set-up, timed apart from the ramp: users, then each phase's grants
    assert set(logins["grants_s"]) == {"raw", "edgeward"}
    assert logins["setup_s"] > 0 and logins["users_s"] > 0
    assert not [n for n in smoke_report["notes"] if n.startswith("Logins")]
    # every record on the stream carried its device's login as user_id (the broker
    # refuses a user_id other than the connection's login: the devices logged in as themselves)
    tel = smoke_report["telemetry"]
    assert tel["stamped"] == tel["received"] > 0
    # and none of the run's users is left on the broker
    names = {device_name(i) for i in range(200)}
    assert not names.intersection(smoke_report["_users_after"])
    md = (Path(smoke_report["_dir"]) / "report.md").read_text()
    assert "| Device logins | a broker user each (200 made" in md


def test_every_rollout_reached_all_its_online_targets(smoke_report: dict) -> None:
    per_revision = smoke_report["propagation_ms"]["per_revision"]
    assert [p["revision"] for p in per_revision] == [1, 2]
    for rollout in per_revision:
        # the CDF ends at 100%: every targeted device online at publish has it in force
        assert rollout["in_force"] == rollout["online_at_publish"] > 0
        assert rollout["time_to_100_ms"] == rollout["max"]
    # revision 2 changes only what store=berlin selects
    berlin = sum(labels_for(load(SMOKE), i)["store"] == "berlin" for i in range(200))
    assert per_revision[1]["targeted"] == berlin < 200


def test_propagation_percentiles_are_ordered_and_the_baseline_was_measured(
    smoke_report: dict,
) -> None:
    p = smoke_report["propagation_ms"]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"]
    assert smoke_report["baseline"] is not None
    assert smoke_report["raw_baseline_ratio"] > 0


def test_telemetry_was_exercised_and_every_record_sent_was_read_or_reported_dropped(
    smoke_report: dict,
) -> None:
    tel = smoke_report["telemetry"]
    assert tel["exercised"] is True and tel["sent"] > 0
    assert tel["alerts"] > 0  # judged Block by the devices' own policies
    assert tel["sent"] == tel["received"] + tel["dropped_reported"]
    assert tel["received"] > 0
    assert tel["balanced"] is True and tel["drained"] is True


def test_telemetry_latency_percentiles_are_ordered_and_positive(smoke_report: dict) -> None:
    latency = smoke_report["telemetry"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert smoke_report["telemetry"]["latency_count"] == smoke_report["telemetry"]["received"]


def test_the_baseline_probes_carry_as_many_bytes_as_the_largest_bundle(
    smoke_report: dict,
) -> None:
    probe = smoke_report["baseline"]["probe_bytes"]
    # Bundle sizes vary by a few bytes (issued_at's encoding); not by a policy.
    assert abs(probe - largest_bundle(load(SMOKE))) < 64
    assert probe > 1000


def test_sizing_follows_from_the_measured_per_device_costs(smoke_report: dict) -> None:
    sizing = smoke_report["sizing"]
    inputs = sizing["inputs"]
    assert inputs["memory_bytes_per_device"] > 0
    for fleet in sizing["fleets"]:
        memory = fleet["constraints"]["memory"]
        expected = max(
            1,
            math.ceil(
                fleet["devices"] * inputs["memory_bytes_per_device"] / memory["capacity_per_node"]
            ),
        )
        assert memory["nodes"] == expected
        assert fleet["nodes"] >= memory["nodes"]
    assert [f["devices"] for f in sizing["fleets"]] == [10_000, 35_000, 100_000]


def test_report_has_its_summary_and_charts(smoke_report: dict) -> None:
    out = Path(smoke_report["_dir"])
    md = (out / "report.md").read_text()
    assert "Propagation" in md and "sizing" in md.lower()
    assert "Telemetry end-to-end latency" in md
    for chart in ("connected", "propagation_cdf", "in_sync", "broker", "rates", "client"):
        assert (out / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in smoke_report["_stdout"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("devices = 10\n", "`duration` is required"),
        ("devices = 10\nduration = 5\ncolour = 1\n", "unknown keys ['colour']"),
        (
            "devices = 10\nduration = 5\n[[timeline]]\nat = 1\naction = 'explode'\n",
            "action must be one of",
        ),
        ("devices = 10\nduration = 5\nverify = 'sometimes'\n", "`verify`"),
        ("devices = 0\nduration = 5\n", "`devices` must be > 0"),
        ("devices = [\n", "not TOML"),
        ("devices = 10\nduration = 5\noutbox_max_records = 0\n", "`outbox_max_records`"),
        (
            "devices = 10\nduration = 5\ntelemetry = false\nalert_rate = 0.5\n",
            "`alert_rate` needs `telemetry = true`",
        ),
    ],
)
def test_bad_scenario_is_refused_naming_the_key(text: str, fragment: str) -> None:
    with pytest.raises(ScenarioError, match="x.toml") as info:
        parse(text, "x.toml")
    assert fragment in str(info.value)


def test_every_shipped_scenario_parses() -> None:
    for path in sorted((ROOT / "simulator" / "scenarios").glob("*.toml")):
        assert load(path).devices > 0


def test_ctrl_c_stops_a_run_cleanly_and_still_writes_the_partial_report(
    tmp_path: Path, broker_admin
) -> None:
    # Given the smoke scenario running, its devices connected
    out = tmp_path / "report"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeward.actors.cli",
            "simulate",
            str(SMOKE),
            "--no-baseline",
            "--report",
            str(out),
            "--broker-url",
            "amqp://guest:guest@127.0.0.1:5672/%2F",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("[") and "connected    200/200" in line:
                break
        assert any("connected    200/200" in line for line in seen), "".join(seen[-20:])
        # When Ctrl-C reaches every process of the group (the terminal's way)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(seen) + rest
    # Then the run stops with 130, without a traceback from any of its processes
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "Error" not in output, output[-3000:]
    assert "interrupted: writing a partial report" in output
    # And the report is written, marked partial, and the device users are gone
    report = json.loads((out / "report.json").read_text())
    assert report["completed"] is False and report["connected_max"] == 200
    assert "(PARTIAL RUN)" in (out / "report.md").read_text()
    users = {u["name"] for u in broker_admin.request("GET", "/users")}
    assert not users.intersection(device_name(i) for i in range(200))
