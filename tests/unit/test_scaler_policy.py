from __future__ import annotations

from actors.messages import PoolStats
from actors.scaler import next_target
from runtime.settings import ScalerSettings

POLICY = ScalerSettings(interval_s=1, high_water=0.8, low_water=0.3, scale_down_after_s=30, step=1)


def stats(idle: int, leased: int, target: int, starting: int = 0, min_idle: int = 1, max_size: int = 5) -> PoolStats:
    return PoolStats("c", starting, idle, leased, 0, min_idle, max_size, target, 0, 0.0, ())


def test_grows_by_a_step_above_high_water():
    assert next_target(stats(idle=1, leased=9, target=5, max_size=20), POLICY, 0, None, 0).target == 11


def test_never_grows_past_max_size():
    assert next_target(stats(idle=0, leased=5, target=4), POLICY, 0, None, 0).target == 5
    assert next_target(stats(idle=0, leased=5, target=5), POLICY, 0, None, 0).target is None


def test_missed_demand_grows_even_at_low_utilization():
    assert next_target(stats(idle=3, leased=0, target=3), POLICY, 2, None, 0).target == 5


def test_holds_between_the_waters():
    d = next_target(stats(idle=1, leased=1, target=2), POLICY, 0, 10.0, 50)
    assert d.target is None and d.low_since is None


def test_shrinks_only_after_the_stabilization_window():
    idle = stats(idle=4, leased=0, target=4)
    first = next_target(idle, POLICY, 0, None, now=100)
    assert first.target is None and first.low_since == 100
    assert next_target(idle, POLICY, 0, first.low_since, now=129).target is None
    assert next_target(idle, POLICY, 0, first.low_since, now=130).target == 1


def test_shrink_keeps_leased_plus_min_idle():
    s = stats(idle=8, leased=1, target=9, min_idle=2, max_size=10)
    assert next_target(s, POLICY, 0, 0.0, now=100).target == 3
