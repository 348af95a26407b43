"""The control plane's Prometheus /metrics: fleet-wide series from the
DeviceMirror and the TelemetryCollector, scraped over real HTTP from a control
plane on the real broker; never a label per device."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerkit import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_collector import Device, alert

from edgeward.actors import messages as m
from edgeward.actors.runtime import ControlPlane


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def plane(tmp_path: Path, broker_url: str) -> Iterator[tuple[ControlPlane, int]]:
    port = free_port()
    plane = ControlPlane(
        m.Settings(
            home=str(tmp_path / "home"),
            broker_url=broker_url,
            metrics_port=port,
            allow_shared_login=True,  # Device publishes as guest
        ),
        free_port(),
    )
    plane.start()
    try:
        yield plane, port
    finally:
        plane.stop()


def test_metrics_count_devices_by_state_and_telemetry_without_a_label_per_device(
    plane: tuple[ControlPlane, int], broker_url: str
) -> None:
    cp, port = plane
    # Given two enrolled devices that never reported, and one alert published
    for device in ("pos-0001", "pos-0002"):
        reply = cp.asys.ask(cp.addresses["mirror"], m.Enroll(device, (("store", "x"),)), 10)
        assert isinstance(reply, m.Reply) and reply.ok
    device = Device(broker_url)
    try:
        device.publish([alert("pos-0001", 1)])
    finally:
        device.close()
    # When Prometheus scrapes (the exporter refreshes every few seconds)
    metrics = wait_until(
        lambda: (
            (s := scrape(port)).get(("edgeward_devices", (("state", "unknown"),))) == 2
            and s.get(("edgeward_telemetry_stored_total", ())) == 1
            and s
        ),
        timeout=30,
        message="the exporter never showed 2 unknown devices and 1 stored record",
    )
    # Then every state has a series, 0 where no device is in it
    for state in ("in_sync", "pending", "drifted", "offline", "failed"):
        assert metrics[("edgeward_devices", (("state", state),))] == 0
    assert metrics[("edgeward_devices_by_revision", (("revision", "0"),))] == 2
    assert metrics[("edgeward_fleet_revision", ())] == 0
    assert metrics[("edgeward_telemetry_duplicates_total", ())] == 0
    # And the alert is counted by its severity and deciding policy
    key = (
        "edgeward_alerts_stored_total",
        (("policy", "pos-block-network-tools"), ("severity", "5")),
    )
    assert metrics[key] == 1
    assert 0 <= metrics[("edgeward_metrics_age_seconds", ())] < 30
    # And no series names a device
    assert not any("device" in dict(labels) or "pos-0001" in str(labels) for _, labels in metrics)


def test_anything_but_get_metrics_is_refused_with_its_status(
    plane: tuple[ControlPlane, int],
) -> None:
    _, port = plane
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert missing.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(request, timeout=5)
    assert posted.value.code == 405


def test_collector_lag_is_the_stream_tail_less_the_stored_offset(
    tmp_path: Path, broker_url: str
) -> None:
    # Given a control plane whose collector commits only every 1,000 records
    port = free_port()
    settings = m.Settings(
        home=str(tmp_path / "home"),
        broker_url=broker_url,
        metrics_port=port,
        collector_batch=1000,
        collector_batch_ms=600_000,
        allow_shared_login=True,
    )
    cp = ControlPlane(settings, free_port())
    cp.start()
    device = Device(broker_url)
    try:
        # When 10 records arrive, which it holds uncommitted
        device.publish([alert("pos-0001", seq) for seq in range(1, 11)])
        wait_until(
            lambda: (r := cp.collector_status().get("reader")) and r["pending"] == 10,
            timeout=30,
            message="the collector never held the 10 records",
        )
        # Then the lag it reports is those 10 offsets (measured every 15 s)
        metrics = wait_until(
            lambda: (s := scrape(port)).get(("edgeward_collector_lag", ())) == 10 and s,
            timeout=45,
            message="the exporter never showed a lag of 10",
        )
        assert metrics[("edgeward_telemetry_stored_total", ())] == 0
    finally:
        device.close()
        cp.stop()


def test_devices_confirm_latency_counts_from_heartbeats_add_up_in_one_histogram(
    plane: tuple[ControlPlane, int], broker_url: str
) -> None:
    from edgeward.transport import topology
    from edgeward.transport.wire import CONFIRM_BUCKETS, Heartbeat

    cp, port = plane
    # Given two enrolled devices
    for name in ("pos-0001", "pos-0002"):
        reply = cp.asys.ask(cp.addresses["mirror"], m.Enroll(name, (("store", "x"),)), 10)
        assert isinstance(reply, m.Reply) and reply.ok
    # When each reports, in two heartbeats, the confirms it timed since the last
    slots = len(CONFIRM_BUCKETS) + 1
    fast = tuple(3 if i == 1 else 0 for i in range(slots))  # 3 within 10 ms
    slow = tuple(1 if i == slots - 1 else 0 for i in range(slots))  # 1 beyond 30 s
    device = Device(broker_url)
    try:
        for name, confirms, seconds in (
            ("pos-0001", fast, 0.024),
            ("pos-0002", fast, 0.021),
            ("pos-0002", slow, 45.0),
        ):
            hb = Heartbeat(
                name,
                0.0,
                0,
                0,
                "",
                "ok",
                rejected={"bad_signature": 2} if name == "pos-0002" else {},
                confirms=confirms,
                confirm_seconds=seconds,
            )
            device.publish_raw(topology.heartbeat_routing_key(name), hb.encode())
    finally:
        device.close()
    # Then /metrics has one fleet-wide histogram holding all seven (the exporter
    # refreshes the device rows and the mirror's counters by separate asks, so
    # wait for both to have seen the heartbeats)
    rejected = ("edgeward_bundles_rejected", (("reason", "bad_signature"),))
    metrics = wait_until(
        lambda: (
            (s := scrape(port)).get(("edgeward_telemetry_confirm_seconds_count", ())) == 7
            and rejected in s
            and s
        ),
        timeout=30,
        message="the histogram never counted 7 confirms with the refusals reported",
    )
    bucket = "edgeward_telemetry_confirm_seconds_bucket"
    assert metrics[(bucket, (("le", "0.005"),))] == 0
    assert metrics[(bucket, (("le", "0.01"),))] == 6
    assert metrics[(bucket, (("le", "30.0"),))] == 6
    assert metrics[(bucket, (("le", "+Inf"),))] == 7
    assert metrics[("edgeward_telemetry_confirm_seconds_sum", ())] == pytest.approx(45.045)
    # And the bundles devices refused are summed by reason, from their last heartbeats
    assert metrics[rejected] == 2
