"""The simulator's telemetry pieces on their own (no broker): the in-memory
outbox keeps and drops exactly what the agent's SQLite outbox does, the
stream tally counts each (device, seq) once and times it, simulated devices
judge their alerts with the agent's evaluator, and the shard raises them at
the scenario's rate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.actors.outbox import Outbox
from edgeward.enforcement.evaluator import OpenEvent
from edgeward.simulator import telemetry
from edgeward.simulator.run import Policies
from edgeward.simulator.scenario import Step
from edgeward.simulator.shard import Shard, ShardConfig, SimDevice
from edgeward.simulator.telemetry import (
    ALERT_EVENT,
    MemoryOutbox,
    SimBackend,
    StreamTally,
    compiled_for,
)
from edgeward.transport.wire import Record, decode

DEVICE = "sim-000007"


def alert(n: int) -> dict:
    return {"policy": "p", "action": "Block", "resource": f"/r/{n}"}


def held(box: MemoryOutbox | Outbox) -> list[tuple[int, str]]:
    return [(seq, kind) for seq, kind, _ in box.after(0, 1_000_000)]


# == the in-memory outbox ==========================================================


def test_records_are_numbered_per_device_from_one_and_kept_as_their_wire_encoding() -> None:
    box = MemoryOutbox(DEVICE)
    records = [
        box.accept("alert", alert(1), 1.0),
        box.accept("log", {"line": "x"}, 2.0),
        box.accept("event", {"event": "gap"}, 3.0),
    ]
    rows = box.after(0, 10)
    assert [r.seq for r in records] == [1, 2, 3]
    assert [Record.from_message(decode(data)) for _, _, data in rows] == records
    assert len(box) == 3 and box.accepted == 3
    # The sender asks for what follows its cursor, at most a window
    assert [seq for seq, _, _ in box.after(1, 1)] == [2]


def test_confirmed_records_leave_and_their_numbers_are_never_given_again() -> None:
    box = MemoryOutbox(DEVICE, max_records=2)
    box.accept("alert", alert(1), 0.0)
    box.accept("alert", alert(2), 0.0)
    box.delete([1, 2, 99])  # 99 is not there: nothing happens for it
    assert len(box) == 0 and box.bytes == 0
    assert box.accept("alert", alert(3), 0.0).seq == 3
    assert box.dropped == {}


def test_a_full_outbox_drops_the_oldest_log_before_any_alert_or_event() -> None:
    # Given an outbox of 4 records holding alert, log, event, log
    box = MemoryOutbox(DEVICE, max_records=4)
    box.accept("alert", alert(1), 0.0)
    box.accept("log", {"n": 2}, 0.0)
    box.accept("event", {"event": "gap"}, 0.0)
    box.accept("log", {"n": 4}, 0.0)
    # When two more alerts arrive
    box.accept("alert", alert(5), 0.0)
    box.accept("alert", alert(6), 0.0)
    # Then the two logs went, oldest first, and were counted
    assert held(box) == [(1, "alert"), (3, "event"), (5, "alert"), (6, "alert")]
    assert box.dropped == {"log": 2}
    # When one more comes with no log left, the oldest alert or event goes
    box.accept("alert", alert(7), 0.0)
    assert held(box) == [(3, "event"), (5, "alert"), (6, "alert"), (7, "alert")]
    assert box.dropped == {"log": 2, "alert": 1}


def test_a_record_waiting_for_its_confirm_is_not_dropped_while_another_can_be() -> None:
    box = MemoryOutbox(DEVICE, max_records=2)
    box.accept("log", {"n": 1}, 0.0)
    box.accept("log", {"n": 2}, 0.0)
    box.in_flight.add(1)
    box.accept("alert", alert(3), 0.0)
    assert held(box) == [(1, "log"), (3, "alert")]


def test_the_byte_bound_drops_like_the_count_bound() -> None:
    probe = MemoryOutbox(DEVICE)
    probe.accept("log", {"pad": "x" * 250}, 0.0)
    probe.accept("alert", alert(2) | {"pad": "y" * 150}, 0.0)
    box = MemoryOutbox(DEVICE, max_bytes=probe.bytes + 10)
    box.accept("log", {"pad": "x" * 250}, 0.0)
    box.accept("alert", alert(2) | {"pad": "y" * 150}, 0.0)
    box.accept("alert", alert(3) | {"pad": "z" * 150}, 0.0)
    assert held(box) == [(2, "alert"), (3, "alert")]
    assert box.bytes <= probe.bytes + 10 and box.dropped == {"log": 1}


def test_drops_are_reported_once_as_an_event_that_counts_the_room_it_took() -> None:
    # Given a full outbox of logs that dropped one
    box = MemoryOutbox(DEVICE, max_records=2)
    for n in range(3):
        box.accept("log", {"n": n}, 0.0)
    # When the drop is reported (the report needs the room of a log)
    report = box.report_drops(10.0)
    # Then one "dropped" event counts both logs, and nothing is left to report
    assert report is not None and (report.type, report.body["event"]) == ("event", "dropped")
    assert report.body["dropped"] == {"log": 2}
    assert box.dropped == {"log": 2} and box.report_drops(11.0) is None
    assert held(box) == [(3, "log"), (4, "event")]
    # And every record accepted is held or was dropped
    assert box.accepted == len(box) + sum(box.dropped.values())


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryOutbox(DEVICE, max_records=0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("accept"), st.sampled_from(["alert", "log", "event"])),
            st.tuples(st.just("confirm"), st.integers(min_value=1, max_value=3)),
            st.tuples(st.just("publish"), st.integers(min_value=1, max_value=3)),
            st.tuples(st.just("report"), st.just(0)),
        ),
        max_size=50,
    ),
    max_records=st.integers(min_value=1, max_value=8),
)
def test_the_memory_outbox_keeps_and_drops_what_the_agents_outbox_does(
    tmp_path: Path, steps: list[tuple[str, object]], max_records: int
) -> None:
    # Given the agent's SQLite outbox and the simulator's, with the same bound
    agents = Outbox(
        tmp_path / f"o-{len(list(tmp_path.iterdir()))}.sqlite", DEVICE, max_records=max_records
    )
    ours = MemoryOutbox(DEVICE, max_records=max_records)
    # When the same records arrive, are published, confirmed and drops reported
    confirmed = 0
    for n, (op, arg) in enumerate(steps):
        for box in (agents, ours):
            if op == "accept":
                box.accept(str(arg), {"n": n}, float(n))
            elif op == "publish":  # the oldest few go in flight
                box.in_flight.update(seq for seq, _, _ in box.after(0, int(arg)))  # type: ignore[arg-type]
            elif op == "confirm":  # and are confirmed
                done = sorted(box.in_flight)[: int(arg)]  # type: ignore[call-overload]
                if box is ours:  # (one dropped in flight, for want of any other, is gone)
                    confirmed += len(set(done) & {seq for seq, _ in held(box)})
                box.in_flight.difference_update(done)
                box.delete(done)
            else:
                box.report_drops(float(n))
        # Then both hold the same records, byte for byte, and counted the same drops
        assert ours.after(0, 1000) == agents.after(0, 1000)
        assert ours.dropped == agents.dropped and (len(ours), ours.bytes) == (
            len(agents),
            agents.bytes,
        )
        assert ours.next_seq == agents.next_seq
    # And every record accepted is held, was confirmed, or was dropped
    assert ours.accepted == len(ours) + confirmed + sum(ours.dropped.values())
    agents.close()


# == counting the stream ===========================================================


def encoded(device: str, seq: int, at: float, kind: str = "alert") -> bytes:
    return Record(device, seq, at, kind, alert(seq)).encode()


def test_the_tally_counts_each_device_and_seq_once_and_times_it() -> None:
    tally = StreamTally()
    # Records of two devices, one of them read twice (a resend), and a stranger
    tally.add(encoded("sim-000001", 1, 100.0), 100.010)
    tally.add(encoded("sim-000001", 2, 100.0), 100.020)
    tally.add(encoded("sim-000002", 1, 100.0), 100.030)
    tally.add(encoded("sim-000001", 1, 100.0), 105.0)  # again: not counted, not timed
    tally.add(b"\xa1\x61v\x01", 100.0)  # CBOR, but no record
    tally.add(encoded("sim-000002", 4000, 100.0, "event"), 100.040)  # a seq far ahead
    assert tally.counts() == {
        "received": 4,
        "duplicates": 1,
        "malformed": 1,
        "stamped": 0,  # none was read with a user_id
        "by_type": {"alert": 3, "event": 1},
    }
    latency = tally.latency_ms()
    assert (latency["p50"], latency["max"], latency["count"]) == (25.0, 40.0, 4)
    assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert latency["by_type"]["event"]["count"] == 1


def test_the_tally_counts_records_stamped_with_their_own_devices_login() -> None:
    tally = StreamTally()
    tally.add(encoded("sim-000001", 1, 100.0), 100.1, "sim-000001")  # its own login
    tally.add(encoded("sim-000001", 1, 100.0), 100.2, "sim-000001")  # a repeat: once
    tally.add(encoded("sim-000001", 2, 100.0), 100.3, "sim-000002")  # another's login
    tally.add(encoded("sim-000001", 3, 100.0), 100.4)  # none
    assert (tally.received, tally.stamped) == (3, 1)
    assert tally.counts()["stamped"] == 1


def test_an_empty_tally_has_no_latency() -> None:
    latency = StreamTally().latency_ms()
    assert latency["p50"] is None and latency["count"] == 0 and latency["by_type"] == {}


# == judging alerts ================================================================


def simulator_policies(policies: int = 3) -> list[dict]:
    state = Policies()
    state.step(Step(0, "apply", policies=policies, changed=policies))
    return list(state.state.values())


def test_every_generated_policy_blocks_the_simulated_alert_and_the_alert_names_it() -> None:
    # Given a simulated device's backend with the simulator's policies in force
    backend = SimBackend()
    backend.apply(simulator_policies(), "digest-of-three", revision=4)
    # When it judges the alert event, the evaluator blocks it
    decision = backend.evaluate(ALERT_EVENT)
    assert decision.action == "Block" and decision.policy == "sim-all-0"
    body = backend.alert(ALERT_EVENT, decision)
    assert body["resource"] == "/etc/pos/secrets/payment.key"
    assert (body["operation"], body["severity"], body["revision"]) == ("File", 5, 4)
    # And with nothing in force the same event passes unremarked
    assert SimBackend().evaluate(ALERT_EVENT).action == "Allow"
    # And an unrelated read is not an alert
    assert backend.evaluate(OpenEvent(path="/etc/hosts")).action == "Allow"


def test_devices_with_the_same_set_in_force_share_one_compiled_index() -> None:
    policies = simulator_policies()
    first, second = SimBackend(), SimBackend()
    first.apply(policies, "same-digest")
    second.apply(list(policies), "same-digest")
    first.evaluate(ALERT_EVENT)
    second.evaluate(ALERT_EVENT)
    assert (
        compiled_for("same-digest", policies, "audit")
        is telemetry._COMPILED[("same-digest", "audit")]
    )
    assert len([k for k in telemetry._COMPILED if k[0] == "same-digest"]) == 1


def shard_of(
    devices: int, alert_rate: float, seed: int = 3
) -> tuple[Shard, asyncio.AbstractEventLoop]:
    """A shard that is never started: no connection, only its devices."""
    loop = asyncio.new_event_loop()
    config = ShardConfig(
        first=0,
        labels=[{"store": "berlin"}] * devices,
        urls=["amqp://guest:guest@127.0.0.1:1/%2F"],
        mode="edgeward",
        alert_rate=alert_rate,
        seed=seed,
    )
    return Shard(config, loop), loop


def raised(shard: Shard, loop: asyncio.AbstractEventLoop, seconds: float) -> list[int]:
    """Alerts in each device's outbox after ``seconds`` of the alert process."""
    policies = simulator_policies()
    for device in shard.devices:
        assert isinstance(device, SimDevice)
        device.backend.apply(policies, "digest-of-three")
    shard.start_alerts()
    loop.run_until_complete(asyncio.sleep(seconds))
    shard.stop_alerts()
    return [d.outbox.accepted for d in shard.devices if isinstance(d, SimDevice)]


def test_a_shard_raises_alerts_at_the_scenarios_rate_on_every_device() -> None:
    # Given 40 devices, each raising 25 alerts a second on average
    shard, loop = shard_of(40, 25.0)
    try:
        # When the alert process runs for a second
        per_device = raised(shard, loop, 1.0)
    finally:
        loop.close()
    # Then about 40 x 25 alerts were raised (a Poisson count: within 5 sigma)
    assert abs(sum(per_device) - 1000) < 5 * 1000**0.5
    assert shard.alerts == sum(per_device)
    # And each device got its share, not a few all of them
    assert min(per_device) > 0 and max(per_device) < 3 * 25


def test_the_same_seed_raises_alerts_on_the_same_devices_in_the_same_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    judged: list[int] = []
    monkeypatch.setattr(SimDevice, "judge", lambda self, event: judged.append(self.index))
    orders = []
    for _ in range(2):
        judged.clear()
        shard, loop = shard_of(10, 50.0, seed=11)
        try:
            raised(shard, loop, 0.3)
        finally:
            loop.close()
        orders.append(list(judged))
    # How many fall within 0.3 s is the clock's; which device comes next is the seed's
    shorter, longer = sorted(orders, key=len)
    assert len(shorter) > 20 and longer[: len(shorter)] == shorter
