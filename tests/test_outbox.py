"""The telemetry outbox on its own: numbering, durability, bounds and drops,
on a real SQLite file (no broker; the sender is tested end to end in
test_telemetry_agent_e2e.py)."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import pika
import pytest
from brokerkit import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.actors.core import AgentCore
from edgeward.actors.outbox import Outbox, Sender
from edgeward.actors.shell import AgentShell, MemoryCache, SendsTelemetry
from edgeward.simulator.telemetry import SimBackend
from edgeward.transport.signing import Verifier
from edgeward.transport.wire import Record, decode

DEVICE = "pos-0001"


def alert(n: int) -> dict:
    return {"policy": "p", "action": "Block", "resource": f"/r/{n}"}


def kept(box: Outbox) -> list[tuple[int, str]]:
    return [(seq, kind) for seq, kind, _ in box.after(0, 1_000_000)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


def test_records_are_numbered_from_one_and_kept_in_order_across_a_reopen(path: Path) -> None:
    # Given an outbox that accepted an alert, a log and an event
    box = Outbox(path, DEVICE)
    records = [
        box.accept("alert", alert(1), 1.0),
        box.accept("log", {"line": "x"}, 2.0),
        box.accept("event", {"event": "gap"}, 3.0),
    ]
    box.close()
    # When it is opened again
    box = Outbox(path, DEVICE)
    # Then the records are there, numbered 1..3, each stored as its wire encoding
    assert [r.seq for r in records] == [1, 2, 3]
    rows = box.after(0, 10)
    assert [(seq, kind) for seq, kind, _ in rows] == [(1, "alert"), (2, "log"), (3, "event")]
    assert [Record.from_message(decode(data)) for _, _, data in rows] == records
    assert len(box) == 3


def test_sequence_numbers_are_never_reused_after_sent_records_were_deleted(path: Path) -> None:
    # Given an outbox whose every record was confirmed and deleted
    box = Outbox(path, DEVICE)
    for n in range(3):
        box.accept("alert", alert(n), 0.0)
    box.delete([1, 2, 3])
    box.close()
    # When it is opened again and accepts another record
    box = Outbox(path, DEVICE)
    record = box.accept("alert", alert(9), 0.0)
    # Then it gets the next number, not 1 again
    assert record.seq == 4 and len(box) == 1


_CHILD = """
import sys
from pathlib import Path
from edgeward.actors.outbox import Outbox
box = Outbox(Path(sys.argv[1]), "pos-0001", max_records=10**9, max_bytes=10**12)
while True:
    record = box.accept("alert", {"resource": "/r"}, 0.0)
    print(record.seq, flush=True)
"""


def test_every_record_accepted_before_a_kill_9_is_there_after_it(path: Path) -> None:
    # Given a process accepting records as fast as it can, saying each seq once accepted
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    said: list[int] = []
    # When it is killed with SIGKILL in the middle of it
    wait_until(lambda: said.append(int(child.stdout.readline())) or len(said) >= 200, timeout=30)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    said += [int(line) for line in child.stdout.read().split()]
    # Then every record it said it accepted is in the file, numbered without holes
    box = Outbox(path, DEVICE, max_records=10**9)
    seqs = [seq for seq, _ in kept(box)]
    assert set(said) <= set(seqs)
    assert seqs == list(range(1, len(seqs) + 1))
    # And the next number follows the last one kept
    assert box.accept("alert", alert(0), 0.0).seq == seqs[-1] + 1


def test_a_full_outbox_drops_the_oldest_log_before_any_alert_or_event(path: Path) -> None:
    # Given an outbox of 4 records holding alert, log, event, log
    box = Outbox(path, DEVICE, max_records=4)
    box.accept("alert", alert(1), 0.0)
    box.accept("log", {"n": 2}, 0.0)
    box.accept("event", {"event": "gap"}, 0.0)
    box.accept("log", {"n": 4}, 0.0)
    # When two more alerts arrive
    box.accept("alert", alert(5), 0.0)
    box.accept("alert", alert(6), 0.0)
    # Then the two logs went, oldest first, and were counted
    assert kept(box) == [(1, "alert"), (3, "event"), (5, "alert"), (6, "alert")]
    assert box.dropped == {"log": 2}
    # When one more comes with no log left
    box.accept("alert", alert(7), 0.0)
    # Then the oldest of the alerts and events goes
    assert kept(box) == [(3, "event"), (5, "alert"), (6, "alert"), (7, "alert")]
    assert box.dropped == {"log": 2, "alert": 1}


def test_a_log_arriving_at_an_outbox_full_of_alerts_is_the_one_dropped(path: Path) -> None:
    box = Outbox(path, DEVICE, max_records=2)
    box.accept("alert", alert(1), 0.0)
    box.accept("alert", alert(2), 0.0)
    record = box.accept("log", {"n": 3}, 0.0)
    assert record.seq == 3
    assert kept(box) == [(1, "alert"), (2, "alert")]
    assert box.dropped == {"log": 1}


def test_the_byte_bound_drops_like_the_count_bound(path: Path, tmp_path: Path) -> None:
    # Given an outbox bounded at just the bytes of a log, an alert and a log
    three = [("log", {"pad": "x" * 250}), ("alert", alert(2) | {"pad": "y" * 150})]
    three.append(("log", {"pad": "z" * 250}))  # logs larger than alerts
    probe = Outbox(tmp_path / "probe.sqlite", DEVICE)
    probe.accept_many(three, 0.0)
    box = Outbox(path, DEVICE, max_bytes=probe.bytes + 10)
    box.accept_many(three, 0.0)
    assert box.dropped == {}
    # When another alert would take it past the bound
    box.accept("alert", alert(4) | {"pad": "w" * 150}, 0.0)
    # Then the oldest log made room, and the bytes kept are within the bound
    assert kept(box) == [(2, "alert"), (3, "log"), (4, "alert")]
    assert box.bytes <= probe.bytes + 10 and box.dropped == {"log": 1}
    # And the byte count is what the file holds
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT sum(length(data)) FROM records").fetchone()[0] == box.bytes


def test_a_record_waiting_for_its_confirm_is_never_dropped(path: Path) -> None:
    # Given two logs, the oldest published and waiting for its confirm
    box = Outbox(path, DEVICE, max_records=2)
    box.accept("log", {"n": 1}, 0.0)
    box.accept("log", {"n": 2}, 0.0)
    box.in_flight.add(1)
    # When an alert needs room
    box.accept("alert", alert(3), 0.0)
    # Then the log not in flight went
    assert kept(box) == [(1, "log"), (3, "alert")]


def test_drop_counts_survive_a_reopen(path: Path) -> None:
    box = Outbox(path, DEVICE, max_records=1)
    for n in range(3):
        box.accept("log", {"n": n}, 0.0)
    box.close()
    assert Outbox(path, DEVICE, max_records=1).dropped == {"log": 2}


def test_drops_are_reported_once_per_change_as_an_event_record(path: Path) -> None:
    # Given an outbox that dropped two logs, and has room again (one was sent)
    box = Outbox(path, DEVICE, max_records=3)
    for n in range(5):
        box.accept("log", {"n": n}, 0.0)
    box.delete([3])
    # When drops are reported twice with nothing dropped in between
    first = box.report_drops(10.0)
    again = box.report_drops(11.0)
    # Then one "dropped" event says how many of each type, and the second says nothing
    assert first is not None and again is None
    assert (first.type, first.body["event"]) == ("event", "dropped")
    assert first.body["dropped"] == {"log": 2}
    assert first.body["since_last_report"] == {"log": 2}
    # And after a reopen, nothing new is reported
    box.close()
    assert Outbox(path, DEVICE, max_records=3).report_drops(12.0) is None


def test_a_drop_report_counts_the_record_it_pushed_out_to_make_room_for_itself(
    path: Path,
) -> None:
    # Given a full outbox of logs that dropped one
    box = Outbox(path, DEVICE, max_records=2)
    for n in range(3):
        box.accept("log", {"n": n}, 0.0)
    # When the drop is reported (the report itself needs the room of a log)
    report = box.report_drops(10.0)
    # Then the report counts that log too, and nothing is left to report
    assert report is not None and report.body["dropped"] == {"log": 2}
    assert box.dropped == {"log": 2} and box.report_drops(11.0) is None
    assert kept(box) == [(3, "log"), (4, "event")]


def test_an_input_position_is_stored_in_the_same_transaction_as_its_records(path: Path) -> None:
    box = Outbox(path, DEVICE)
    assert box.position("events") is None
    box.accept_many([("alert", alert(1)), ("alert", alert(2))], 0.0, source=("events", "7:120"))
    box.accept_many([], 0.0, source=("events", "7:180"))  # lines that made no record
    box.close()
    box = Outbox(path, DEVICE)
    assert box.position("events") == "7:180" and len(box) == 2


def test_deleting_confirmed_records_frees_their_room(path: Path) -> None:
    box = Outbox(path, DEVICE, max_records=2)
    box.accept("alert", alert(1), 0.0)
    box.accept("alert", alert(2), 0.0)
    box.delete([1, 2, 99])  # 99 is not there: nothing happens for it
    assert len(box) == 0 and box.bytes == 0
    box.accept("alert", alert(3), 0.0)
    box.accept("alert", alert(4), 0.0)
    assert box.dropped == {}


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from(["alert", "log", "event"]), min_size=1, max_size=60),
    max_records=st.integers(min_value=1, max_value=12),
)
def test_whatever_arrives_the_outbox_keeps_within_its_bound_and_accounts_for_every_record(
    tmp_path: Path, kinds: list[str], max_records: int
) -> None:
    path = tmp_path / f"outbox-{len(list(tmp_path.iterdir()))}.sqlite"
    box = Outbox(path, DEVICE, max_records=max_records)
    logs_kept_when_alert_dropped: list[int] = []
    for n, kind in enumerate(kinds):
        before = box.dropped["alert"] + box.dropped["event"]
        box.accept(kind, {"n": n}, 0.0)
        if box.dropped["alert"] + box.dropped["event"] > before:
            logs_kept_when_alert_dropped.append(sum(k == "log" for _, k in kept(box)))
    held = Counter(kind for _, kind in kept(box))
    # Every record is kept or counted as dropped, and the bound holds
    assert held + box.dropped == Counter(kinds)
    assert len(box) == sum(held.values()) <= max_records
    # An alert or event was dropped only when no log was left to drop
    assert all(n == 0 for n in logs_kept_when_alert_dropped)
    box.close()


# == the sender's pace and bookkeeping, on a fake clock ==========================
# (Timing cannot be tested against a real broker without sleeping; what the
# sender does on the wire is tested end to end in test_telemetry_agent_e2e.py.)


class FakeLoop:
    """``call_later`` on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list] = []  # [when, fn, cancelled]

    def call_later(self, delay: float, fn):
        timer = [self.now + delay, fn, False]
        self.timers.append(timer)

        class Handle:
            def cancel(self) -> None:
                timer[2] = True

        return Handle()

    def run_until(self, when: float) -> None:
        while True:
            due = sorted((t for t in self.timers if not t[2] and t[0] <= when), key=lambda t: t[0])
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer[0])
            timer[1]()
        self.now = when


class FakeChannel:
    """Records publishes; the test answers with confirms."""

    def __init__(self) -> None:
        self.is_open = True
        self.published: list[tuple[str, str, bytes, pika.BasicProperties, bool]] = []
        self._confirm = None
        self._return = None

    def add_on_return_callback(self, fn) -> None:
        self._return = fn

    def confirm_delivery(self, ack_nack_callback, callback) -> None:
        self._confirm = ack_nack_callback
        callback(None)

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False) -> None:
        self.published.append((exchange, routing_key, body, properties, mandatory))

    def ack(self, tag: int, multiple: bool = False) -> None:
        self._confirm(_Frame(pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple)))

    def nack(self, tag: int) -> None:
        self._confirm(_Frame(pika.spec.Basic.Nack(delivery_tag=tag)))

    def give_back(self, index: int) -> None:
        """The broker returns publish ``index`` (0-based) as unroutable."""
        _, _, body, props, _ = self.published[index]
        self._return(self, None, props, body)

    def seqs(self) -> list[int]:
        return [int(p[3].message_id.rpartition(":")[2]) for p in self.published]


class _Frame:
    def __init__(self, method) -> None:
        self.method = method


def sender_for(box: Outbox, **kwargs) -> tuple[Sender, FakeLoop, FakeChannel]:
    loop = FakeLoop()
    kwargs.setdefault("jitter", 0.0)
    sender = Sender(box, loop, clock=lambda: loop.now, rng=random.Random(7), **kwargs)
    return sender, loop, FakeChannel()


def test_sender_publishes_oldest_first_as_the_wire_contract_says_and_deletes_on_confirm(
    path: Path,
) -> None:
    # Given three records waiting
    box = Outbox(path, DEVICE)
    box.accept("alert", alert(1), 0.0)
    box.accept("log", {"n": 2}, 0.0)
    box.accept("event", {"event": "gap"}, 0.0)
    sender, loop, channel = sender_for(box)
    # When a channel is attached
    sender.attach(channel)
    loop.run_until(0.1)
    # Then they go out oldest first, each with its id, content type, persistence and key
    assert channel.seqs() == [1, 2, 3]
    for (exchange, key, body, props, mandatory), kind in zip(
        channel.published, ["alert", "log", "event"], strict=True
    ):
        assert (exchange, key, mandatory) == (
            "edgeward.uplink",
            f"telemetry.{DEVICE}.{kind}",
            True,
        )
        assert props.content_type == "application/cbor" and props.delivery_mode == 2
        assert Record.from_message(decode(body)).message_id == props.message_id
    # And nothing leaves the outbox before its confirm
    assert len(box) == 3
    channel.ack(2, multiple=True)
    assert [seq for seq, _ in kept(box)] == [3]
    channel.ack(3)
    assert len(box) == 0 and sender.confirmed == 3


def test_heartbeats_published_on_the_senders_channel_shift_its_confirm_numbers(
    path: Path,
) -> None:
    # Given a sender on the device's one channel, with a heartbeat published
    # on it (by the shell) before, between and after its records
    box = Outbox(path, DEVICE)
    sender, loop, channel = sender_for(box)
    sender.attach(channel)
    sender.count_publish()  # broker tag 1: a heartbeat
    box.accept("alert", alert(1), 0.0)  # tag 2
    loop.run_until(0.1)
    sender.count_publish()  # tag 3: a heartbeat
    box.accept("alert", alert(2), 0.0)  # tag 4
    loop.run_until(0.2)
    assert channel.seqs() == [1, 2]
    # When the broker confirms the heartbeats alone
    channel.ack(1)
    channel.ack(3)
    # Then no record leaves the outbox
    assert [seq for seq, _ in kept(box)] == [1, 2] and sender.confirmed == 0
    # And each record goes when its own tag is confirmed
    channel.ack(2)
    assert [seq for seq, _ in kept(box)] == [2]
    channel.ack(4)
    assert len(box) == 0 and sender.confirmed == 2
    # And a heartbeat before the channel is attached counts for nothing
    sender.detach()
    sender.count_publish()
    box.accept("alert", alert(3), 0.0)
    sender.attach(channel2 := FakeChannel())
    loop.run_until(0.3)
    channel2.ack(1)
    assert len(box) == 0


def test_sender_keeps_at_most_a_window_unconfirmed(path: Path) -> None:
    box = Outbox(path, DEVICE)
    box.accept_many([("alert", alert(n)) for n in range(10)], 0.0)
    sender, loop, channel = sender_for(box, window=4, rate=1000.0)
    sender.attach(channel)
    loop.run_until(5.0)
    assert channel.seqs() == [1, 2, 3, 4]
    channel.ack(2, multiple=True)  # two confirmed: two more may go
    loop.run_until(6.0)
    assert channel.seqs() == [1, 2, 3, 4, 5, 6]


def test_sender_drains_at_most_its_rate_per_second(path: Path) -> None:
    # Given 100 records waiting and a sender paced at 10 records/s
    box = Outbox(path, DEVICE)
    box.accept_many([("alert", alert(n)) for n in range(100)], 0.0)
    sender, loop, channel = sender_for(box, window=1000, rate=10.0)
    sender.attach(channel)
    # When 3 seconds pass, every publish confirmed at once
    sent = []
    for step in range(1, 31):
        loop.run_until(step / 10)
        sent.append(len(channel.published))
        if channel.published:
            channel.ack(len(channel.published), multiple=True)
    # Then about 10 went out per second, never a burst above the rate
    assert 29 <= sent[-1] <= 41
    assert sent[9] <= 20  # the first second: its initial allowance plus its pace


def test_sender_waits_a_random_delay_within_the_jitter_before_draining_a_backlog(
    path: Path,
) -> None:
    # Given more records than one window, and a jitter of 30 s
    box = Outbox(path, DEVICE)
    box.accept_many([("alert", alert(n)) for n in range(20)], 0.0)
    sender, loop, channel = sender_for(box, window=5, jitter=30.0)
    expected = random.Random(7).uniform(0, 30.0)
    # When a channel is attached
    sender.attach(channel)
    # Then nothing goes out before the drawn delay, and the drain starts at it
    loop.run_until(expected - 0.01)
    assert channel.published == []
    loop.run_until(expected + 0.01)
    assert channel.seqs() == [1, 2, 3, 4, 5]
    assert 0 < expected <= 30.0


def test_sender_sends_a_backlog_of_at_most_one_window_at_once(path: Path) -> None:
    box = Outbox(path, DEVICE)
    box.accept_many([("alert", alert(n)) for n in range(5)], 0.0)
    sender, loop, channel = sender_for(box, window=5, jitter=30.0)
    sender.attach(channel)
    loop.run_until(0.0)
    assert channel.seqs() == [1, 2, 3, 4, 5]


def test_sender_sends_a_new_record_as_soon_as_it_is_accepted(path: Path) -> None:
    box = Outbox(path, DEVICE)
    sender, loop, channel = sender_for(box)
    sender.attach(channel)
    loop.run_until(1.0)
    box.accept("alert", alert(1), 1.0)
    assert channel.seqs() == [1]


@pytest.mark.parametrize("refusal", ["nack", "return"], ids=["nacked", "returned-unroutable"])
def test_a_record_the_broker_did_not_take_stays_and_is_sent_again(path: Path, refusal: str) -> None:
    # Given two records published
    box = Outbox(path, DEVICE)
    box.accept_many([("alert", alert(1)), ("alert", alert(2))], 0.0)
    sender, loop, channel = sender_for(box, retry_delay=5.0)
    sender.attach(channel)
    loop.run_until(0.1)
    # When the broker takes the first but not the second
    channel.ack(1)
    if refusal == "nack":
        channel.nack(2)
    else:
        channel.give_back(1)
        channel.ack(2)  # a returned message is still confirmed
    # Then the second stays in the outbox and goes again after the retry delay
    assert [seq for seq, _ in kept(box)] == [2]
    loop.run_until(4.9)
    assert channel.seqs() == [1, 2]
    loop.run_until(5.1)
    assert channel.seqs() == [1, 2, 2]


def test_records_in_flight_when_the_channel_is_lost_go_out_on_the_next(path: Path) -> None:
    box = Outbox(path, DEVICE)
    box.accept_many([("alert", alert(n)) for n in range(3)], 0.0)
    sender, loop, first = sender_for(box)
    sender.attach(first)
    loop.run_until(0.1)
    first.ack(1)
    sender.detach()  # the connection went: 2 and 3 were never confirmed
    second = FakeChannel()
    sender.attach(second)
    loop.run_until(0.2)
    assert second.seqs() == [2, 3] and len(box) == 2


def test_sender_times_each_confirm_and_hands_the_counts_over_once(path: Path) -> None:
    from edgeward.transport.wire import CONFIRM_BUCKETS

    # Given three records sent at once
    box = Outbox(path, DEVICE)
    for n in range(3):
        box.accept("alert", alert(n), 0.0)
    sender, loop, channel = sender_for(box)
    sender.attach(channel)
    loop.run_until(0.0)
    assert channel.seqs() == [1, 2, 3]
    # When the broker confirms two after 8 ms, and nacks the third after 2 s
    loop.run_until(0.008)
    channel.ack(2, multiple=True)
    loop.run_until(2.0)
    channel.nack(3)
    # Then the two confirmed are counted in the 10 ms bucket, the nack is not timed
    counts, seconds = sender.latency.take()
    assert len(counts) == len(CONFIRM_BUCKETS) + 1
    assert counts[CONFIRM_BUCKETS.index(0.01)] == 2 and sum(counts) == 2
    assert seconds == pytest.approx(0.016)
    # And once taken they are not reported again
    assert sender.latency.take() == ((), 0.0)


# == the sender on the device's one channel, beside the shell's heartbeats ============


class PolicyChannel(FakeChannel):
    """The device's one channel as the shell uses it: qos, the stream consumer,
    heartbeats and telemetry all on it."""

    def __init__(self) -> None:
        super().__init__()
        self.consumers: list[dict] = []

    def basic_qos(self, prefetch_count: int, callback) -> None:
        callback(None)

    def basic_consume(self, queue, on_message, auto_ack=False, arguments=None) -> None:
        self.consumers.append({"queue": queue, "arguments": arguments})

    def keys(self) -> list[str]:
        return [p[1] for p in self.published]


class Host(SendsTelemetry, AgentShell):
    """The telemetry half mixed into a shell, as the agent and the simulator do."""

    def __init__(self, box: Outbox, loop: FakeLoop) -> None:
        core = AgentCore(DEVICE, {}, Verifier({}), heartbeat_interval=10.0, records=True)
        super().__init__(core, SimBackend(), MemoryCache(), clock=lambda: loop.now)
        self.outbox = box
        self.sender = Sender(box, loop, jitter=0.0, clock=lambda: loop.now)
        self.confirm_latency = self.sender.latency


def test_telemetry_shares_the_policy_channel_and_heartbeats_never_confirm_a_record(
    path: Path,
) -> None:
    # Given a device with an alert waiting, attached to its one channel
    box = Outbox(path, DEVICE)
    loop = FakeLoop()
    host = Host(box, loop)
    host.start()
    box.accept("alert", alert(1), 0.0)
    channel = PolicyChannel()
    host.attach(channel, 64)
    loop.run_until(0.1)
    # Then the stream consumer, the heartbeat and the record are all on it:
    # the heartbeat took confirm number 1 (it went out before the record)
    assert [c["queue"] for c in channel.consumers] == ["edgeward.policy"]
    assert channel.keys() == [f"telemetry.{DEVICE}.heartbeat", f"telemetry.{DEVICE}.alert"]
    # When the broker confirms the heartbeat
    channel.ack(1)
    # Then the record stays until its own confirm
    assert [seq for seq, _ in kept(box)] == [1]
    channel.ack(2)
    assert len(box) == 0 and host.sender.confirmed == 1
    # And when the channel goes, the sender lets go of it too
    host.detach("lost")
    assert host.sender.channel is None
