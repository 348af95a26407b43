"""The simulator's self-driven actors re-arm a wakeup Thespian never
delivered, and never end up running two chains of wakeups."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from thespian.actors import WakeupMessage

from edgeward.simulator import actors
from edgeward.simulator.actors import STALL_SECONDS, Driven


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Actor(Driven):
    """Records the wakeups it asks for instead of asking Thespian."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, Any]] = []

    def wakeupAfter(self, delay: Any, payload: Any = None) -> None:  # noqa: N802
        self.asked.append((delay, payload))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(actors.time, "monotonic", clock)
    return clock


def test_an_actor_on_time_is_not_rearmed(clock: Clock) -> None:
    actor = Actor()
    assert actor.rearm_if_stalled(0.25) is False  # never armed: nothing to re-arm
    actor.arm(timedelta(milliseconds=2))
    clock.now += STALL_SECONDS  # late, but not past the stall limit
    assert actor.rearm_if_stalled(0.25) is False
    assert len(actor.asked) == 1 and actor.stalls == 0


def test_a_wakeup_never_delivered_is_rearmed_and_the_late_original_ignored(clock: Clock) -> None:
    # Given an actor whose wakeup was lost
    actor = Actor()
    actor.arm(0.25)
    lost = WakeupMessage(0.25, actor.asked[-1][1])
    clock.now += 0.25 + STALL_SECONDS + 0.1
    # When the silence is noticed, a new wakeup is armed
    assert actor.rearm_if_stalled(0.25) is True
    assert len(actor.asked) == 2 and actor.stalls == 1
    fresh = WakeupMessage(0.25, actor.asked[-1][1])
    # Then only the new one drives the actor: the old one, should it come, is stale
    assert actor.current(fresh) and not actor.current(lost)
    # And a second look right away re-arms nothing more
    assert actor.rearm_if_stalled(0.25) is False and len(actor.asked) == 2


class Director(actors.SimulationDirector):
    """A director whose sends and wakeups are recorded instead of made."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[Any, Any]] = []
        self.asked: list[tuple[Any, Any]] = []

    def send(self, target: Any, msg: Any) -> None:
        self.sent.append((target, msg))

    def wakeupAfter(self, delay: Any, payload: Any = None) -> None:  # noqa: N802
        self.asked.append((delay, payload))

    def tick(self, clock: Clock, seconds: float) -> None:
        clock.now += seconds
        self.receiveMsg_WakeupMessage(WakeupMessage(0.25, self._generation), None)

    def nudges(self) -> list[Any]:
        return [t for t, m in self.sent if isinstance(m, actors.Command) and m.kind == "nudge"]


def test_a_silent_shard_is_nudged_once_until_it_reports_again(clock: Clock) -> None:
    # Given a director running a phase with two shards, both just heard from
    director = Director()
    director.phase = actors.StartPhase(
        mode="raw", urls=(), publish_url="", configs=(), started_at=0.0
    )
    director.result = actors.PhaseResult(mode="raw")
    director.shards = ["shard-0", "shard-1"]
    director.reported_at = {0: clock.now, 1: clock.now}
    director.arm(0.25)
    # When neither reports for a minute (busy in long loop turns)
    for _ in range(240):
        director.tick(clock, 0.25)
    # Then each was nudged once, not once per few seconds of silence
    assert director.nudges() == ["shard-0", "shard-1"]
    # And a shard that reports and falls silent again is nudged again
    director.receiveMsg_ShardReport(actors.ShardReport(0, 0.0, {}), "shard-0")
    for _ in range(4 * int(STALL_SECONDS) + 4):
        director.tick(clock, 0.25)
    assert director.nudges() == ["shard-0", "shard-1", "shard-0"]


def test_a_node_down_notice_is_answered_only_once_every_shard_has_taken_it() -> None:
    # Given a director with two shards
    director = Director()
    director.shards = ["shard-0", "shard-1"]
    # When the run says a node goes down
    director.receiveMsg_Command(actors.Command("node-down", "amqp://n2"), "runner")
    # Then both shards are told, and the run waits
    told = [t for t, m in director.sent if isinstance(m, actors.Command)]
    assert told == ["shard-0", "shard-1"]
    assert not [m for t, m in director.sent if t == "runner"]
    # Until both have taken it (one shard deep in a long loop turn answers late)
    director.receiveMsg_Acked(actors.Acked(1, "node-down"), "shard-1")
    assert not [m for t, m in director.sent if t == "runner"]
    director.receiveMsg_Acked(actors.Acked(0, "node-down"), "shard-0")
    assert [m for t, m in director.sent if t == "runner"] == [{"ok": True, "acked": "node-down"}]
    # And other commands are answered at once, as before
    director.receiveMsg_Command(actors.Command("cut"), "runner")
    assert [m for t, m in director.sent if t == "runner"][-1] == {"ok": True}


KILL_FORKS = """
import os, subprocess, sys, time
from edgeward.simulator.run import kill_forks

other = subprocess.Popen(["sleep", "30"])  # a child that is not a fork: left alone
forks = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:  # a grandchild fork too
            time.sleep(30)
            os._exit(0)
        time.sleep(30)
        os._exit(0)
    forks.append(pid)
# A daemon, as Thespian's admin starts: a child that starts a session of its
# own, forks and exits; the grandchild (orphaned) forks an actor of its own.
read, write = os.pipe()
daemonizer = os.fork()
if daemonizer == 0:
    os.setsid()
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        os.write(write, b"up")
        time.sleep(30)
        os._exit(0)
    os._exit(0)
os.read(read, 2)  # the daemon and its actor are running, our child is a zombie
time.sleep(0.5)
print(kill_forks())
for pid in forks + [daemonizer]:
    os.waitpid(pid, 0)
print(other.poll())
other.kill()
"""


def test_the_processes_a_run_forked_are_ended_and_nothing_else() -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILL_FORKS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    killed, other = done.stdout.split()
    assert killed == "6"  # two forks and a fork of each, the daemon and its fork
    assert other == "None"  # the sleep (another program) still runs


class LateDirector:
    """An actor system whose director answered an earlier, timed-out ask late."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)

    def ask(self, to: Any, msg: Any, timeout: float) -> Any:
        return self.replies.pop(0) if self.replies else None

    def listen(self, timeout: float) -> Any:
        return self.replies.pop(0) if self.replies else None


def test_a_late_answer_to_an_earlier_ask_is_not_taken_for_this_ones(tmp_path) -> None:
    from edgeward.simulator.actors import EndPhase, PhaseResult
    from edgeward.simulator.run import Runner
    from edgeward.simulator.scenario import parse

    runner = Runner(parse("devices = 1\nduration = 1\n"), tmp_path, brokers=["amqp://x/"])
    result = PhaseResult(mode="edgeward")
    # Given the answer to a progress poll that timed out, arriving first
    runner.asys = LateDirector({"connected": 10}, result)
    # Then the phase's end waits past it for the phase's result
    assert runner.ask(EndPhase(), 5, expect=lambda r: isinstance(r, PhaseResult)) is result
    # And with nothing but stale answers it says the director did not answer
    runner.asys = LateDirector({"connected": 10})
    with pytest.raises(RuntimeError, match="did not answer EndPhase"):
        runner.ask(EndPhase(), 5, expect=lambda r: isinstance(r, PhaseResult))


class DirectorLostAtTheEnd:
    """An actor system whose director answers the phase's progress polls
    (two shards reporting, a loop turn of 3 s), then never its end."""

    def __init__(self) -> None:
        self.polls = 0

    def ask(self, to: Any, msg: Any, timeout: float) -> Any:
        from edgeward.simulator.actors import EndPhase, Progress, StartPhase

        if isinstance(msg, StartPhase):
            return {"started": 2}
        if isinstance(msg, Progress):
            self.polls += 1
            return {
                "shards_reporting": 2,
                "connected": 2,
                "online": 2,
                "in_sync": 0,
                "errors": {"handshake_timeout": 1},
                "slowest_turn_s": 3.0,
                "rss": 50_000_000,
                "base_rss": 40_000_000,
            }
        assert isinstance(msg, EndPhase)
        return None

    def listen(self, timeout: float) -> Any:
        return None


def test_a_phase_whose_end_is_lost_keeps_what_the_progress_polls_saw(tmp_path) -> None:
    from edgeward.simulator import model
    from edgeward.simulator.run import Runner
    from edgeward.simulator.scenario import parse

    # Given a run whose director answers progress polls but not the phase's end
    runner = Runner(
        parse("devices = 2\nduration = 1\ntelemetry = false\n"),
        tmp_path,
        brokers=["amqp://x/"],
    )
    runner.asys = DirectorLostAtTheEnd()
    runner.out = lambda *args: None
    run = model.RunData(
        scenario={},
        devices=2,
        workers=1,
        verify="every",
        share_connections=1,
        brokers=["amqp://x/"],
        nodes=1,
        broker_config="default",
        started_at=0.0,
    )
    # When the edgeward phase ends
    with pytest.raises(RuntimeError, match="did not answer EndPhase"):
        runner.edgeward(["amqp://x/"], [], run)
    # Then the fleet figures over time are the polls', and the report says so
    assert len(run.samples) == runner.asys.polls >= 2
    assert run.samples[-1].connected == 2 and run.samples[-1].errors == 1
    assert run.client_base_rss_bytes == 40_000_000  # client cost is above the workers' start
    assert any("progress polls" in note for note in run.notes)
    # And the overloaded workers are remembered for the report
    assert runner.slowest_turn == 3.0


def test_a_connection_lost_on_a_node_being_restarted_is_no_unexpected_close() -> None:
    import asyncio

    from edgeward.simulator.shard import Shard, ShardConfig

    loop = asyncio.new_event_loop()
    try:
        shard = Shard(
            ShardConfig(
                first=0, labels=[{}], urls=["amqp://guest:guest@127.0.0.1:5673/run"], mode="raw"
            ),
            loop,
        )
        # Given node 2 announced down by its cluster URL (vhost "/")
        shard.down_nodes.add("amqp://guest:***@127.0.0.1:5673/%2F")
        # When a device loses its connection to that node (its URL names the run's vhost)
        shard._on_link_event("lost:connection_reset", "amqp://sim-000001:***@127.0.0.1:5673/run: x")
        # Then it is an error of its kind, not an unexpected close
        assert shard.unexpected_closes == 0 and shard.errors["lost:connection_reset"] == 1
        # And a loss on another node is one
        shard._on_link_event("lost:connection_reset", "amqp://sim-000001:***@127.0.0.1:5672/run: x")
        assert shard.unexpected_closes == 1
    finally:
        loop.close()
