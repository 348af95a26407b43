"""The simulation report's arithmetic, on a synthetic run whose figures are known.

The run: 200 devices ramp up over 10 s (20 a second) onto two broker nodes,
100 connections each; each connection costs its node 100 KiB and 2 fds on
top of an idle 150 MiB and 100 fds.  A raw baseline fans out in 40 / 50 /
60 ms (median full-fleet time 50 ms).  Revision 1 reaches its 200 devices in
1..200 ms, revision 2 in 201..400 ms, so together the latencies are exactly
1..400 ms.  No broker, no clock, no sleeps.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from edgeward.simulator import report
from edgeward.simulator.model import (
    Action,
    Baseline,
    BrokerSample,
    FleetSample,
    Rollout,
    RunData,
)

DEVICES = 200
KIB = 1024
MIB = 1024**2
GIB = 1024**3
IDLE_MEMORY = 150 * MIB
IDLE_FDS = 100
COST_PER_CONNECTION = 100 * KIB
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(**overrides: object) -> RunData:
    run = RunData(
        scenario={"name": "synthetic"},
        devices=DEVICES,
        workers=2,
        verify="every",
        share_connections=0,
        brokers=["amqp://device:***@127.0.0.1:5672/", "amqp://device:***@127.0.0.1:5673/"],
        nodes=["rabbit1@localhost", "rabbit2@localhost"],
        broker_config="default",
        started_at=1_700_000_000.0,
        machine={"cores": 2, "memory_bytes": 24 * GIB},
        versions={"rabbitmq": "3.10.8", "pika": "1.4.4"},
        duration=30.0,
        completed=True,
        ramp_seconds=10.0,
        reconnect={"to_all_connected_s": 4.2, "to_all_in_sync_s": 6.1},
        messages_expected=400,
        messages_received=398,
        heartbeats_sent=6000,
        telemetry_sent=50,
        telemetry_received=48,
        telemetry_dropped_reported=2,
        telemetry_alerts=40,
        telemetry_drained=True,
        telemetry_latency_ms={
            "p50": 3.5,
            "p90": 12.0,
            "p99": 80.2,
            "max": 95.0,
            "count": 48,
            "by_type": {
                "alert": {"p50": 3.0, "p90": 9.0, "p99": 20.0, "max": 21.0, "count": 40},
                "event": {"p50": 60.0, "p90": 90.0, "p99": 94.5, "max": 95.0, "count": 8},
            },
        },
        errors={"connect-timeout": 3, "verify-failed": 1},
        unexpected_closes=1,
    )
    deliveries = 0
    for second in range(31):
        t = float(second)
        connected = min(DEVICES, 20 * second)
        if second in (13, 21):
            deliveries += DEVICES
        in_sync = connected if second < 12 or second >= 13 else 0
        if 20 <= second < 21:
            in_sync = connected
        run.samples.append(
            FleetSample(
                t=t,
                connected=connected,
                in_sync=in_sync,
                online=DEVICES,
                errors=4 if second >= 5 else 0,
                deliveries=deliveries,
                heartbeats=second * DEVICES // 5,
                client_rss_bytes=50 * MIB + connected * 30 * KIB,
                client_cpu_seconds=0.2 * second,
            )
        )
        per_node = connected // 2
        for node in run.nodes:
            run.broker.append(
                BrokerSample(
                    t=t,
                    node=node,
                    memory_bytes=IDLE_MEMORY + per_node * COST_PER_CONNECTION,
                    fds=IDLE_FDS + 2 * per_node,
                    erlang_processes=400 + 5 * per_node,
                    connections=per_node,
                    messages_in_total=float(second // 12 + second // 20),
                    messages_out_total=float(deliveries // 2),
                )
            )
    run.baseline = Baseline(
        devices=DEVICES,
        connected=DEVICES,
        fanouts=[
            [0.040 * (i + 1) / DEVICES for i in range(DEVICES)],
            [0.050 * (i + 1) / DEVICES for i in range(DEVICES)],
            [0.060 * (i + 1) / DEVICES for i in range(DEVICES)],
        ],
    )
    run.rollouts = [
        Rollout(
            revision=1,
            t=12.0,
            targeted=DEVICES,
            online_at_publish=DEVICES,
            latencies=[i / 1000 for i in range(1, 201)],
        ),
        Rollout(
            revision=2,
            t=20.0,
            targeted=DEVICES,
            online_at_publish=DEVICES,
            latencies=[i / 1000 for i in range(201, 401)],
        ),
    ]
    run.actions = [
        Action(t=12.0, kind="apply", detail={"revision": 1}),
        Action(t=16.0, kind="restart-node", detail={"node": "rabbit2@localhost"}),
        Action(t=20.0, kind="apply", detail={"revision": 2}),
    ]
    for name, value in overrides.items():
        setattr(run, name, value)
    return run


def figures_for(run: RunData, **limits: object) -> dict:
    return report.compute(
        run,
        node_memory_bytes=limits.get("node_memory_bytes", 4 * GIB),
        node_fds=limits.get("node_fds", 65_536),
        node_cores=limits.get("node_cores", 4),
        headroom=limits.get("headroom", 0.3),
    )


# --- propagation -------------------------------------------------------------


def test_propagation_percentiles_interpolate_over_all_rollouts() -> None:
    # Given latencies of exactly 1..400 ms over two rollouts
    figures = figures_for(synthetic_run())

    # Then the percentiles interpolate between neighbours (position (n-1)·q)
    p = figures["propagation_ms"]
    assert p["p50"] == pytest.approx(200.5)  # between 200 and 201
    assert p["p90"] == pytest.approx(360.1)  # 399 × 0.9 = 359.1 → 360 + 0.1
    assert p["p99"] == pytest.approx(396.0, abs=0.05)  # 399 × 0.99 = 395.01 → 396.01
    assert p["max"] == pytest.approx(400.0)
    assert p["count"] == 400


def test_time_to_99_and_100_percent_is_the_kth_device_of_each_rollout() -> None:
    figures = figures_for(synthetic_run())

    first, second = figures["propagation_ms"]["per_revision"]
    # ceil(0.99 × 200) = 198th device
    assert (first["time_to_99_ms"], first["time_to_100_ms"]) == (198.0, 200.0)
    assert (second["time_to_99_ms"], second["time_to_100_ms"]) == (398.0, 400.0)
    # The headline takes the slowest rollout
    assert figures["propagation_ms"]["time_to_99_ms"] == 398.0
    assert figures["propagation_ms"]["time_to_100_ms"] == 400.0


def test_time_to_100_percent_is_null_when_a_device_never_got_there() -> None:
    # Given a rollout that reached 199 of its 200 online devices
    run = synthetic_run()
    run.rollouts[1].latencies.pop()

    figures = figures_for(run)

    second = figures["propagation_ms"]["per_revision"][1]
    assert second["time_to_100_ms"] is None
    assert second["time_to_99_ms"] == 398.0
    assert figures["propagation_ms"]["time_to_100_ms"] is None
    # And with no cut or churn to explain it, the fleet did not converge
    assert figures["converged"] is False
    assert "199 of 200" in figures["convergence"]["reason"]


def test_cdf_ends_at_100_percent_only_when_every_device_got_there() -> None:
    run = synthetic_run()

    complete = report.cdf(run.rollouts[0].latencies, run.rollouts[0].online_at_publish)
    short = report.cdf(run.rollouts[0].latencies[:150], run.rollouts[0].online_at_publish)

    assert complete[-1] == (pytest.approx(0.200), pytest.approx(100.0))
    assert complete[0][1] == pytest.approx(0.5)
    assert short[-1][1] == pytest.approx(75.0)
    assert [y for _, y in complete] == sorted(y for _, y in complete)


def test_ratio_to_baseline_is_full_fleet_time_over_median_probe_fanout() -> None:
    # Given probes whose slowest receipts are 40, 50 and 60 ms (median 50 ms)
    figures = figures_for(synthetic_run())

    # Then edgeward's 400 ms full-fleet time is 8× the raw 50 ms
    assert figures["baseline"]["full_fanout_ms"] == pytest.approx(50.0)
    assert figures["raw_baseline_ratio"] == pytest.approx(8.0)
    assert figures["propagation_ms"]["per_revision"][0]["raw_baseline_ratio"] == pytest.approx(4.0)


def test_the_simulators_own_work_per_revision_is_reported_per_device_and_in_wall_time() -> None:
    # Given 200 deliveries of revision 1 that took 0.5 s inside the workers
    run = synthetic_run()
    run.rollouts[0].processed = 200
    run.rollouts[0].processing_seconds = 0.5
    for workers, least_ms in ((1, 500.0), (2, 250.0), (8, 250.0)):
        run.workers = workers
        first = figures_for(run)["propagation_ms"]["per_revision"][0]
        # Then each delivery cost 2,500 µs, and the workers side by side on the
        # machine's 2 cores needed at least 0.5 s / min(workers, cores)
        assert first["deliveries_processed"] == 200
        assert first["device_processing_us"] == pytest.approx(2500.0)
        assert first["client_processing_s"] == pytest.approx(0.5)
        assert first["client_serial_ms"] == pytest.approx(least_ms)
    # And a revision nobody handled has no per-device figure
    assert figures_for(run)["propagation_ms"]["per_revision"][1]["device_processing_us"] is None


def test_ratio_is_null_without_a_baseline() -> None:
    figures = figures_for(synthetic_run(baseline=None))

    assert figures["raw_baseline_ratio"] is None
    assert any("baseline" in note for note in figures["notes"])


# --- counts ----------------------------------------------------------------


def test_messages_lost_is_expected_minus_received() -> None:
    assert figures_for(synthetic_run())["messages_lost"] == 2


def test_more_messages_received_than_expected_is_reported_as_a_bug() -> None:
    figures = figures_for(synthetic_run(messages_expected=10, messages_received=12))

    assert figures["messages_lost"] is None
    assert any(note.startswith("Bug:") for note in figures["notes"])


def test_telemetry_balances_when_sent_equals_received_plus_dropped() -> None:
    assert figures_for(synthetic_run())["telemetry"]["balanced"] is True

    unbalanced = figures_for(synthetic_run(telemetry_received=40))
    assert unbalanced["telemetry"]["balanced"] is False
    assert any("8 records unaccounted" in note for note in unbalanced["notes"])


def test_telemetry_figures_carry_the_counts_and_the_end_to_end_latency() -> None:
    tel = figures_for(synthetic_run())["telemetry"]

    assert tel["exercised"] is True and tel["alerts"] == 40
    assert tel["latency_ms"] == {"p50": 3.5, "p90": 12.0, "p99": 80.2, "max": 95.0}
    assert tel["latency_count"] == 48
    assert tel["latency_ms_by_type"]["alert"]["p99"] == 20.0
    assert tel["drained"] is True and tel["waiting_at_end"] == 0


def test_records_still_in_outboxes_at_the_end_are_said_to_be_waiting_not_lost() -> None:
    figures = figures_for(
        synthetic_run(telemetry_received=45, telemetry_waiting=3, telemetry_waiting_offline=3)
    )

    assert figures["telemetry"]["balanced"] is False
    assert any(
        "3 records were still in outboxes at the end (3 on devices offline" in note
        for note in figures["notes"]
    )
    assert not any("unaccounted for (lost)" in note for note in figures["notes"])


def test_a_run_without_telemetry_says_it_was_not_exercised(tmp_path: Path) -> None:
    report.write(
        synthetic_run(
            telemetry_sent=0,
            telemetry_received=0,
            telemetry_dropped_reported=0,
            telemetry_latency_ms={},
        ),
        tmp_path,
    )

    figures = json.loads((tmp_path / "report.json").read_text())
    assert figures["telemetry"]["exercised"] is False
    assert figures["telemetry"]["latency_ms"]["p50"] is None
    assert "| Telemetry | not exercised in this run |" in (tmp_path / "report.md").read_text()


def test_run_data_written_before_the_telemetry_path_still_loads(tmp_path: Path) -> None:
    # Given a run-data.json from before the telemetry fields were added
    report.write(synthetic_run(), tmp_path)
    data = json.loads((tmp_path / report.RUN_DATA).read_text())
    for key in [k for k in data if k.startswith("telemetry_")]:
        if key not in ("telemetry_sent", "telemetry_received", "telemetry_dropped_reported"):
            del data[key]
    (tmp_path / report.RUN_DATA).write_text(json.dumps(data))
    # When it is loaded, the new fields take their defaults and the report is computed
    loaded = RunData.load(tmp_path / report.RUN_DATA)
    assert loaded.telemetry_latency_ms == {} and loaded.telemetry_drained is None
    tel = figures_for(loaded)["telemetry"]
    assert tel["balanced"] is True and tel["latency_ms"]["p99"] is None


def test_fleet_converged_when_every_online_device_is_in_sync_at_the_end() -> None:
    figures = figures_for(synthetic_run())

    assert figures["converged"] is True
    assert figures["connected_max"] == DEVICES


def test_fleet_did_not_converge_when_the_last_sample_has_devices_out_of_sync() -> None:
    run = synthetic_run()
    run.samples[-1].in_sync = DEVICES - 3

    figures = figures_for(run)

    assert figures["converged"] is False
    assert "3 online devices not in sync" in figures["convergence"]["reason"]


def test_client_rss_per_device_is_peak_rss_over_most_devices_connected() -> None:
    figures = figures_for(synthetic_run())

    # (50 MiB + 200 × 30 KiB) / 200 = 256 + 30 KiB
    assert figures["client"]["rss_per_device_kib"] == pytest.approx(286.0)
    assert figures["client"]["cpu_seconds_per_device"] == pytest.approx(6.0 / DEVICES)


# --- broker costs and sizing ---------------------------------------------------


def test_broker_cost_per_connection_is_the_rise_over_idle_summed_over_nodes() -> None:
    figures = figures_for(synthetic_run())

    cost = figures["broker"]["per_connection"]
    assert cost["reason"] is None
    assert cost["memory_bytes_per_connection"] == pytest.approx(100 * KIB)
    assert cost["memory_bytes_per_device"] == pytest.approx(100 * KIB)
    assert cost["fds_per_device"] == pytest.approx(2.0)
    assert cost["measured_at"]["connections"] == DEVICES
    node = figures["broker"]["nodes"]["rabbit1@localhost"]
    assert node["peak_connections"] == 100
    assert node["peak_memory_bytes"] == IDLE_MEMORY + 100 * COST_PER_CONNECTION


def test_broker_cost_is_measured_before_a_node_restart_moves_connections() -> None:
    # Given rabbit2 restarts at t=16: it is not scraped at 16-17, its 100
    # connections move to rabbit1, and it comes back empty
    run = synthetic_run()
    moved = []
    for sample in run.broker:
        if sample.t < 16:
            moved.append(sample)
        elif sample.node == "rabbit1@localhost":
            sample.connections = DEVICES
            sample.memory_bytes = IDLE_MEMORY + DEVICES * COST_PER_CONNECTION
            sample.fds = IDLE_FDS + 2 * DEVICES
            moved.append(sample)
        elif sample.t >= 18:
            sample.connections = 0
            sample.memory_bytes = IDLE_MEMORY
            sample.fds = IDLE_FDS
            moved.append(sample)
    run.broker = moved

    # When rabbit2's last sample (t=15) would otherwise still count at t=16
    cost = figures_for(run)["broker"]["per_connection"]

    # Then the connections are not counted twice
    assert cost["measured_at"]["connections"] == DEVICES
    assert cost["measured_at"]["t"] < 16
    assert cost["memory_bytes_per_device"] == pytest.approx(100 * KIB)


def test_sizing_matches_a_hand_computation_where_memory_binds() -> None:
    # Given 4 GiB nodes with 65,536 fds and 30% headroom
    figures = figures_for(synthetic_run(), node_memory_bytes=4 * GIB, node_fds=65_536)

    # Memory per node: 4 GiB × 0.4 × 0.7 − 150 MiB idle = 1,045,304,442.9 bytes
    # fds per node:    65,536 × 0.7 − 100 idle        = 45,775.2
    memory_capacity = 4 * GIB * 0.4 * 0.7 - IDLE_MEMORY
    fds_capacity = 65_536 * 0.7 - IDLE_FDS
    expected = {
        # devices: (memory nodes, fd nodes)
        10_000: (1, 1),  # 1.024e9 / 1.045e9 = 0.98;   20,000 / 45,775 = 0.44
        35_000: (4, 2),  # 3.584e9 / 1.045e9 = 3.43;   70,000 / 45,775 = 1.53
        100_000: (10, 5),  # 1.024e10 / 1.045e9 = 9.80; 200,000 / 45,775 = 4.37
    }
    sizing = figures["sizing"]
    assert sizing["broker_config"] == "default"
    for fleet in sizing["fleets"]:
        devices = fleet["devices"]
        memory_nodes, fd_nodes = expected[devices]
        assert math.ceil(devices * COST_PER_CONNECTION / memory_capacity) == memory_nodes
        assert math.ceil(devices * 2 / fds_capacity) == fd_nodes
        assert fleet["constraints"]["memory"]["nodes"] == memory_nodes
        assert fleet["constraints"]["fds"]["nodes"] == fd_nodes
        assert fleet["nodes"] == max(memory_nodes, fd_nodes)
        assert fleet["binding"] == "memory"
        assert fleet["nodes_with_stream_replication"] == max(3, memory_nodes)
        assert fleet["constraints"]["cpu"]["nodes"] is None


def test_sizing_says_fds_bind_when_the_fd_limit_is_tight() -> None:
    # Given nodes with plenty of memory but only 10,000 fds
    figures = figures_for(synthetic_run(), node_memory_bytes=64 * GIB, node_fds=10_000)

    # 35,000 × 2 = 70,000 fds over (10,000 × 0.7 − 100) = 6,900 per node → 10.14 → 11
    fleet = next(f for f in figures["sizing"]["fleets"] if f["devices"] == 35_000)
    assert fleet["constraints"]["fds"]["nodes"] == 11
    assert fleet["nodes"] == 11
    assert fleet["binding"] == "fds"
    assert "6,900" in fleet["constraints"]["fds"]["reasoning"]


def test_sizing_names_the_measured_config_and_does_not_guess_the_other() -> None:
    sizing = figures_for(synthetic_run())["sizing"]

    assert sizing["other_config"] == "charts/rabbitmq/rabbitmq.conf"
    assert "needs its own run" in sizing["other_config_note"]
    assert "not modelled" in sizing["cpu"]


def test_a_run_without_broker_samples_yields_null_node_counts_with_a_reason() -> None:
    figures = figures_for(synthetic_run(broker=[]))

    sizing = figures["sizing"]
    assert "no broker samples" in sizing["reason"]
    for fleet in sizing["fleets"]:
        assert fleet["nodes"] is None
        assert fleet["constraints"]["memory"]["nodes"] is None
        assert "no broker samples" in fleet["constraints"]["memory"]["reasoning"]


def test_too_few_connections_yield_null_node_counts_rather_than_a_guess() -> None:
    # Given a run whose nodes only ever held 20 connections in all
    run = synthetic_run()
    for sample in run.broker:
        sample.connections = min(sample.connections, 10)

    sizing = figures_for(run)["sizing"]

    assert "too few" in sizing["reason"]
    assert all(fleet["nodes"] is None for fleet in sizing["fleets"])


def test_sampling_that_starts_after_the_ramp_cannot_measure_idle_cost() -> None:
    run = synthetic_run()
    run.broker = [s for s in run.broker if s.t >= 10]

    sizing = figures_for(run)["sizing"]

    assert "idle cost is unknown" in sizing["reason"]
    assert all(fleet["nodes"] is None for fleet in sizing["fleets"])


def test_a_broker_peak_with_no_fleet_sample_near_it_is_not_divided_by_a_far_one() -> None:
    # Given a partial run whose fleet samples start long after the broker's peak
    # (the baseline's broker samples, the edgeward phase's progress polls)
    run = synthetic_run()
    last = max(s.t for s in run.broker)
    for sample in run.samples:
        sample.t += last + 60
        sample.connected = 3

    sizing = figures_for(run)["sizing"]

    # Then no per-device cost is made up from the 3 devices then connected
    assert "no fleet sample near" in sizing["reason"]
    assert all(fleet["nodes"] is None for fleet in sizing["fleets"])


def test_headroom_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="headroom"):
        figures_for(synthetic_run(), headroom=1.0)


# --- files -------------------------------------------------------------------


def test_write_produces_json_markdown_and_valid_png_charts(tmp_path: Path) -> None:
    figures = report.write(synthetic_run(), tmp_path)

    document = json.loads((tmp_path / "report.json").read_text())
    assert document["messages_lost"] == 2
    assert len(document["series"]["fleet"]) == 31
    assert document["series"]["rollouts"][0]["latencies_ms"][:2] == [1.0, 2.0]
    for chart in report.CHARTS:
        assert (tmp_path / chart).read_bytes()[:8] == PNG_MAGIC, chart
    assert figures["charts"] == list(report.CHARTS)
    assert not any("failed" in note for note in figures["notes"])


def test_the_raw_run_data_is_saved_and_gives_the_same_figures_when_loaded(tmp_path: Path) -> None:
    run = synthetic_run()
    run.rollouts[0].processed, run.rollouts[0].processing_seconds = 200, 0.5
    report.write(run, tmp_path, node_memory_bytes=4 * GIB)

    loaded = RunData.load(tmp_path / report.RUN_DATA)

    assert loaded == run
    assert figures_for(loaded) == figures_for(run)


def test_recompute_rewrites_the_report_from_run_data_with_other_sizing_limits(
    tmp_path: Path,
) -> None:
    import subprocess

    report.write(synthetic_run(), tmp_path, node_memory_bytes=4 * GIB)
    before = json.loads((tmp_path / "report.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "edgeward.actors.cli", "simulate", "--recompute"]
        + ["--report", str(tmp_path), "--node-memory", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "recomputed from run-data.json" in done.stdout
    after = json.loads((tmp_path / "report.json").read_text())
    assert after["sizing"]["inputs"]["node_memory_bytes"] == GIB
    assert before["sizing"]["inputs"]["node_memory_bytes"] == 4 * GIB
    assert after["propagation_ms"] == before["propagation_ms"]


def test_recompute_without_run_data_says_what_is_missing(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "edgeward.actors.cli", "simulate", "--recompute"]
        + ["--report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "run-data.json does not exist" in done.stderr


def test_report_md_shows_the_headline_figures(tmp_path: Path) -> None:
    report.write(synthetic_run(), tmp_path, node_memory_bytes=4 * GIB)

    md = (tmp_path / "report.md").read_text()
    assert "PARTIAL" not in md
    assert "| Devices | 200 |" in md
    assert "| Converged | yes |" in md
    assert "200.5 / 360.1 / 396.0 / 400.0 ms" in md
    assert "398.0 ms / 400.0 ms" in md
    assert "8.00 ×" in md
    assert "2 of 400 expected" in md
    assert "| Unexpected closes | 1 |" in md
    assert "4.2 s / 6.1 s" in md
    assert "| 35,000 | 4 | 2 | not modelled | **4** | memory |" in md
    assert "| connect-timeout | 3 |" in md
    assert "`restart-node` (node=rabbit2@localhost)" in md
    assert "| Telemetry sent = received + dropped | 50 = 48 + 2: yes (40 alerts) |" in md
    assert (
        "| Telemetry end-to-end latency p50 / p90 / p99 / max | 3.5 / 12.0 / 80.2 / 95.0 ms "
        "(48 records; alerts 3.0 / 9.0 / 20.0 / 21.0 ms; events 60.0 / 90.0 / 94.5 / 95.0 ms) |"
    ) in md


def test_a_partial_run_is_marked_partial(tmp_path: Path) -> None:
    figures = report.write(synthetic_run(completed=False, duration=17.5), tmp_path)

    md = (tmp_path / "report.md").read_text()
    assert "**PARTIAL RUN**" in md
    assert "17.5 s" in md
    assert json.loads((tmp_path / "report.json").read_text())["completed"] is False
    assert any(note.startswith("Partial run") for note in figures["notes"])


def test_a_run_without_broker_samples_still_writes_every_file(tmp_path: Path) -> None:
    report.write(synthetic_run(broker=[], samples=[], rollouts=[], baseline=None), tmp_path)

    md = (tmp_path / "report.md").read_text()
    assert "**No node counts:**" in md
    for chart in report.CHARTS:
        assert (tmp_path / chart).read_bytes()[:8] == PNG_MAGIC, chart


def test_without_matplotlib_the_report_is_written_and_says_charts_were_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given matplotlib cannot be imported
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)

    figures = report.write(synthetic_run(), tmp_path)

    assert figures["charts"] == []
    assert not list(tmp_path.glob("*.png"))
    assert (tmp_path / "report.json").exists()
    assert "Charts skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()


# --- broker CPU ----------------------------------------------------------------


def cpu_run(*, restart_at: float | None = None, per_delivery: float = 0.002) -> RunData:
    """100 devices connect at 10/s over 10 s onto two nodes; quiet until t = 30,
    when revision 1 reaches all 100 within 2 s. The broker's CPU (split evenly
    over the nodes) is 0.1 core-ms per connected device per second, 10 core-ms
    per connection set up and 2 core-ms per bundle delivered."""
    steady, per_connection = 0.0001, 0.01
    run = synthetic_run(samples=[], broker=[], actions=[], rollouts=[], devices=100)
    run.rollouts = [
        Rollout(
            revision=1,
            t=30.0,
            targeted=100,
            online_at_publish=100,
            latencies=[0.02 * (i + 1) for i in range(100)],
            processed=100,
        )
    ]
    run.actions = [Action(t=30.0, kind="apply", detail={"revision": 1})]
    if restart_at is not None:
        run.actions.append(Action(t=restart_at, kind="restart-node", detail={}))
    for second in range(41):
        t = float(second)
        connected = min(100, 10 * second)
        device_seconds = 5 * t * t if t <= 10 else 500 + 100 * (t - 10)
        delivered = 0.0 if t <= 30 else min(100, 50 * (t - 30))
        cpu = steady * device_seconds + per_connection * connected + per_delivery * delivered
        run.samples.append(
            FleetSample(t, connected, connected, 100, 0, 0, 0, 50 * MIB, 0.1 * second)
        )
        for node in run.nodes:
            run.broker.append(
                BrokerSample(
                    t=t,
                    node=node,
                    memory_bytes=IDLE_MEMORY,
                    fds=IDLE_FDS,
                    erlang_processes=400,
                    connections=connected / 2,
                    cpu_seconds=5.0 + cpu / 2,
                )
            )
    return run


def test_broker_cpu_per_device_per_connection_and_per_delivery_come_from_their_windows() -> None:
    cpu = figures_for(cpu_run())["broker"]["cpu"]

    assert cpu["reason"] is None
    assert cpu["steady_core_seconds_per_device_second"] == pytest.approx(0.0001)
    assert cpu["core_seconds_per_connection"] == pytest.approx(0.01)
    assert cpu["core_seconds_per_delivery"] == pytest.approx(0.002)
    assert cpu["delivery_revision"] == 1


def test_cpu_nodes_are_the_largest_of_steady_storm_and_rollout_loads() -> None:
    # Given nodes of 4 cores with 25% headroom (3 usable), a 180 s storm and a 2 s rollout
    figures = report.compute(
        cpu_run(),
        node_cores=4,
        headroom=0.25,
        reconnect_target=180,
        rollout_target=2,
    )
    first = figures["sizing"]["fleets"][0]
    assert first["devices"] == 10_000
    cpu = first["constraints"]["cpu"]
    # Then 10,000 devices need 1 core steady, 0.56 for the storm, 10 for the rollout
    assert cpu["loads_cores"] == {
        "steady": pytest.approx(1.0),
        "reconnect storm": pytest.approx(10_000 * 0.01 / 180, abs=1e-3),
        "rollout": pytest.approx(10.0),
    }
    # And the rollout binds: ceil(10 / 3) = 4 nodes, with the arithmetic shown
    assert cpu["nodes"] == 4
    assert "rollout binds" in cpu["reasoning"] and "3 usable cores" in cpu["reasoning"]


def test_without_cpu_samples_cpu_is_not_modelled_and_says_why() -> None:
    run = cpu_run()
    for sample in run.broker:
        sample.cpu_seconds = 0.0
    figures = figures_for(run)
    assert "did not export their CPU" in figures["broker"]["cpu"]["reason"]
    assert figures["sizing"]["fleets"][0]["constraints"]["cpu"]["nodes"] is None
    assert "not modelled" in figures["sizing"]["cpu"]


def test_a_rollout_whose_cpu_does_not_stand_out_is_not_reported_as_free() -> None:
    # Given the broker's CPU over the rollout no more than its steady cost
    figures = figures_for(cpu_run(per_delivery=0.0))
    cpu = figures["broker"]["cpu"]
    # Then the cost per delivery is unknown, with the reason, not 0 core-ms
    assert cpu["core_seconds_per_delivery"] is None
    assert "did not exceed the steady cost" in cpu["delivery_reason"]
    assert figures["sizing"]["fleets"][0]["constraints"]["cpu"]["nodes"] is not None


def test_a_restart_before_the_rollout_keeps_its_cpu_out_of_the_delivery_cost() -> None:
    cpu = figures_for(cpu_run(restart_at=25.0))["broker"]["cpu"]
    assert cpu["core_seconds_per_delivery"] is None
    assert cpu["core_seconds_per_connection"] == pytest.approx(0.01)


# --- logins ---------------------------------------------------------------------

DEVICE_LOGINS = {
    "mode": "device",
    "users": DEVICES,
    "users_s": 1.25,
    "grants_s": {"raw": 0.5, "edgeward": 0.75},
    "setup_s": 2.5,
    "revoke_s": {"raw": 0.25, "edgeward": 0.5},
    "existing_before": 0,
    "limit_applied": True,
    "removed": DEVICES,
    "remove_s": 0.8,
    "left": 0,
}


def test_a_run_with_a_broker_user_per_device_says_so_and_what_making_them_took(
    tmp_path: Path,
) -> None:
    figures = report.write(
        synthetic_run(logins=dict(DEVICE_LOGINS), telemetry_stamped=48), tmp_path
    )

    assert figures["logins"] == DEVICE_LOGINS
    assert figures["telemetry"]["stamped"] == 48
    assert not [n for n in figures["notes"] if n.startswith("Logins")]
    md = (tmp_path / "report.md").read_text()
    assert "logins: a broker user per device;" in md
    assert (
        "| Device logins | a broker user each (200 made, device grants, max-connections 1); "
        "set-up 2.5 s (users 1.2 s, raw grants 0.5 s, edgeward grants 0.8 s), before the "
        "phases, not in the ramp; grants revoked before each vhost went (raw 0.2 s, "
        "edgeward 0.5 s); 200 removed after the run in 0.8 s |"
    ) in md
    assert json.loads((tmp_path / "report.json").read_text())["logins"]["mode"] == "device"


def test_a_run_with_the_shared_login_says_so_in_its_notes(tmp_path: Path) -> None:
    reason = "--share-connections 5: a connection shared by 5 devices is one login"
    figures = report.write(
        synthetic_run(logins={"mode": "shared", "reason": reason}, share_connections=5),
        tmp_path,
    )

    assert figures["logins"]["mode"] == "shared"
    shared = [n for n in figures["notes"] if n.startswith("Logins")]
    assert len(shared) == 1 and reason in shared[0] and "no user_id" in shared[0]
    md = (tmp_path / "report.md").read_text()
    assert "logins: shared (the broker URL's);" in md
    assert f"| Device logins | shared login of the broker URL ({reason}) |" in md


def test_run_data_from_before_device_users_reads_as_the_shared_login() -> None:
    figures = figures_for(synthetic_run())  # logins left at the default: {}
    assert figures["logins"]["mode"] == "shared"
    assert "before the simulator made a broker user per device" in figures["logins"]["reason"]
    assert figures["telemetry"]["stamped"] is None


def test_users_left_behind_and_unstamped_records_are_noted() -> None:
    logins = {**DEVICE_LOGINS, "left": 3, "existing_before": 7, "limit_applied": False}
    figures = figures_for(synthetic_run(logins=logins, telemetry_stamped=40))
    notes = [n for n in figures["notes"] if n.startswith("Logins")]
    assert any("3 of the run's device users were still on the broker" in n for n in notes)
    assert any("7 users named like this run's devices were already" in n for n in notes)
    assert any("only 40 of the 48 telemetry records" in n for n in notes)
    assert any("did not keep the device users' max-connections limit" in n for n in notes)


def test_a_failed_removal_is_noted() -> None:
    logins = {
        **DEVICE_LOGINS,
        "removed": None,
        "left": None,
        "problem": "device users were not removed: management API: refused",
    }
    figures = figures_for(synthetic_run(logins=logins))
    assert "Logins: device users were not removed: management API: refused." in figures["notes"]


def test_more_in_force_than_online_at_publish_is_put_down_to_overload_when_workers_lagged() -> None:
    # Given a rollout that more devices put in force than were counted online at publish
    def run_with(slowest_turn_s: float) -> RunData:
        run = synthetic_run(slowest_turn_s=slowest_turn_s)
        run.rollouts[0].online_at_publish = 10
        return run

    # When the workers kept up, it is a counting bug
    quick = figures_for(run_with(0.3))["notes"]
    assert any("a counting bug" in n for n in quick)
    # When they were overloaded (commands such as a cut reached them late), it says so
    slow = figures_for(run_with(54.1))["notes"]
    assert not any("a counting bug" in n for n in slow)
    assert any("overloaded (a loop turn took up to 54 s)" in n for n in slow)
