"""The simulator's self-driven actors re-arm a wakeup Thespian never
delivered, and never end up running two chains of wakeups."""

from __future__ import annotations

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
