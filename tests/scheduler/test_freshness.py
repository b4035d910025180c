"""A slow spell then recovery: rates measured while the machine was overloaded fade toward the
prior as they age, so `auto` goes back to sketching without any new measurement; a fresh
measurement counts in full at once."""

from __future__ import annotations

import pytest

from pice.scheduler.freshness import EdgeSpeeds, FreshnessConfig, aged_rate, weight
from pice.scheduler.policy import PolicyConfig, QueryFeatures
from pice.scheduler.service import CloudMeter, Scheduler
from pice.scheduler.state import EdgeState

Q = QueryFeatures("What are good habits for remote work?", max_tokens=512, suitability=0.95)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(rate: float) -> tuple[EdgeState, ...]:
    return tuple(EdgeState(f"e{i}", ("edge-model",), 8, 0, rate) for i in range(2))


def test_a_slow_spell_then_recovery_without_new_measurements() -> None:
    clock = FakeClock()
    sched = Scheduler.build("dynamic", PolicyConfig(), cloud_slots=4,
                            freshness=FreshnessConfig(half_life_s=60.0), clock=clock)
    sched.cloud.observe_rate(60, 10.0)  # the cloud runs at its usual 6 tok/s
    slow = fleet(0.15)  # edges measured during the slow spell
    first = sched.decide(Q, slow)
    assert (first.mode, first.code) == ("cloud", "cloud-faster")
    modes = []
    for _ in range(12):  # nothing new is measured: every snapshot repeats the slow rates
        clock.now += 30.0
        modes.append(sched.decide(Q, slow).mode)
    assert modes[0] == "cloud" and modes[-1] == "progressive"
    assert modes.index("progressive") < 12  # back to sketching within six minutes
    # a new slow measurement counts in full at once: the slow spell is back
    again = sched.decide(Q, fleet(0.14))
    assert again.mode == "cloud"


def test_a_slow_cloud_spell_fades_too() -> None:
    clock = FakeClock()
    meter = CloudMeter(slots=2, freshness=FreshnessConfig(half_life_s=60.0,
                                                          cloud_prior_tokens_per_s=5.6),
                       clock=clock)
    meter.observe_rate(1, 10.0)  # 0.1 tok/s while overloaded
    assert meter.state().tokens_per_s == pytest.approx(0.1)
    clock.now += 600.0  # ten half-lives
    assert meter.state().tokens_per_s == pytest.approx(5.6, rel=0.01)
    meter.observe_rate(50, 10.0)  # a fresh measurement: the old mean is worth almost nothing
    assert meter.state().tokens_per_s == pytest.approx(5.0, rel=0.01)


def test_weights_and_blend() -> None:
    assert weight(0.0, 60.0) == 1.0 and weight(60.0, 60.0) == 0.5
    assert aged_rate(0.0, 16.0, 0.5) == 0.0  # unmeasured stays unmeasured
    assert aged_rate(1.0, 16.0, 0.5) == pytest.approx(4.0)  # geometric midpoint
    assert aged_rate(3.0, 16.0, 1.0) == pytest.approx(3.0)


def test_edge_speeds_age_only_unchanged_measurements() -> None:
    speeds = EdgeSpeeds(FreshnessConfig(half_life_s=10.0))
    e = EdgeState("a", (), 4, 0, 1.0, failure_rate=0.5)
    assert speeds.age((e,), 0.0) == (e,)
    [old] = speeds.age((e,), 10.0)
    assert old.tokens_per_s == pytest.approx(aged_rate(1.0, 16.25, 0.5))
    assert old.failure_rate == pytest.approx(0.25)
    fresh = EdgeState("a", (), 4, 0, 2.0, failure_rate=0.5)
    assert speeds.age((fresh,), 20.0) == (fresh,)
    with pytest.raises(ValueError, match="half_life_s must be > 0, got 0"):
        FreshnessConfig(half_life_s=0)
