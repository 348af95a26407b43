"""Reconnect backoff: full jitter, and a fleet that lost the broker together
spreads its first attempt instead of coming back as one wall."""

from __future__ import annotations

import random

from edgeward.simulator.scenario import parse
from edgeward.transport.connection import Backoff


def test_each_delay_is_uniform_between_zero_and_the_doubling_ceiling() -> None:
    rng = random.Random(7)
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    samples = {c: [] for c in ceilings}
    for _ in range(400):
        backoff = Backoff(base=0.5, cap=30.0, rng=rng)
        for ceiling in ceilings:
            samples[ceiling].append(backoff.next_delay())
    for ceiling, delays in samples.items():
        assert all(0 <= d <= ceiling for d in delays)
        # full jitter: delays reach well below half the ceiling, and near it
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling


def test_the_first_delay_after_a_loss_is_spread_over_the_spread_window() -> None:
    rng = random.Random(3)
    firsts = []
    for _ in range(2000):
        backoff = Backoff(base=0.5, cap=30.0, rng=rng, spread=30.0)
        backoff.next_delay()  # earlier failed attempts do not matter after a loss
        firsts.append(backoff.after_loss())
        assert backoff.next_delay() <= 1.0  # then the doubling resumes at attempt 1
    assert all(0 <= d <= 30.0 for d in firsts)
    # 2,000 devices over 30 s: no second holds much more than its share (~67)
    per_second = [sum(1 for d in firsts if s <= d < s + 1) for s in range(30)]
    assert max(per_second) < 110 and min(per_second) > 30


def test_a_failed_first_attempt_is_not_spread_only_a_loss_is() -> None:
    backoff = Backoff(base=0.5, spread=60.0, rng=random.Random(1))
    assert 0 <= backoff.next_delay() <= 0.5


def test_without_a_spread_a_loss_backs_off_from_the_start() -> None:
    backoff = Backoff(base=0.5, rng=random.Random(2))
    for _ in range(5):
        backoff.next_delay()
    assert 0 <= backoff.after_loss() <= 0.5


def test_a_scenario_sets_the_reconnect_spread_and_defaults_to_30_seconds() -> None:
    base = 'name = "x"\ndevices = 10\nduration = 5\n'
    assert parse(base).reconnect_spread == 30.0
    assert parse(base + "[ramp]\nreconnect_spread = 0\n").reconnect_spread == 0.0
