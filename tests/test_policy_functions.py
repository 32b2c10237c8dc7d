"""The pure functions of :mod:`hf_ghosts.policy`, on hand-computed values and invariants (no model, no controller):
when a step is probed (:func:`probe_due`) or reuses the last radius (:func:`reused_scale`), the scheduled target ``r*(t)`` and the step's scale.

The expected values are worked out from the definitions in the docstrings: ``scale = min(1, r* rho / |u|)`` (clip),
``r* rho / |u|`` (set), 1 (monitor); ``r*(t) = r_target lr(t) / peak``; a probe when any trigger fires.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from hf_ghosts.policy import ProbeSchedule, probe_due, reused_scale, scheduled_target, step_scale

SCHEDULE = ProbeSchedule(every=16, trigger_r=0.5, trigger_growth=2.0)
MODES = ("clip", "set", "monitor")


# ----------------------------------------------------------------------------------------------------- probe_due
def test_probe_due_on_hand_computed_cases() -> None:
    # (steps since the probe, growth of |u|, estimated applied r) against r* = 1: the r trigger sits at 0.5
    cases = [
        ((3, 1.1, 0.2), False),  # nothing fires
        ((15, 1.1, 0.2), False),  # one step short of every = 16
        ((16, 1.1, 0.2), True),  # every
        ((40, 1.0, 0.0), True),
        ((3, 2.0, 0.2), False),  # growth equal to the trigger: not above it
        ((3, 2.01, 0.2), True),
        ((3, 1.1, 0.5), False),  # r equal to trigger_r * r*: not above it
        ((3, 1.1, 0.51), True),
        ((0, 0.0, 0.0), False),  # the step just probed, reused at once
    ]
    for (since, growth, r), expected in cases:
        assert probe_due(SCHEDULE, since, growth, r, 1.0) is expected, (since, growth, r)
    assert probe_due(SCHEDULE, 3, 1.1, 0.9, 2.0) is False  # the r trigger scales with r*: 0.9 <= 0.5 * 2
    assert probe_due(SCHEDULE, 3, 1.1, 1.1, 2.0) is True


def test_probe_due_without_a_usable_probe_or_with_every_one_always_probes() -> None:
    for mode in MODES:
        assert probe_due(SCHEDULE, None, 0.0, 0.0, 1.0, mode) is True
        assert probe_due(ProbeSchedule(every=1, trigger_r=math.inf, trigger_growth=math.inf), 0, 0.0, 0.0, 1.0, mode)


def test_the_r_trigger_guards_a_rescale_so_monitor_ignores_it() -> None:
    assert probe_due(SCHEDULE, 3, 1.1, 100.0, 1.0, "clip") and probe_due(SCHEDULE, 3, 1.1, 100.0, 1.0, "set")
    assert not probe_due(SCHEDULE, 3, 1.1, 100.0, 1.0, "monitor")
    assert probe_due(SCHEDULE, 3, 2.5, 0.0, 1.0, "monitor") and probe_due(SCHEDULE, 16, 1.0, 0.0, 1.0, "monitor")


def test_triggers_set_to_inf_are_off() -> None:
    off = ProbeSchedule(every=4, trigger_r=math.inf, trigger_growth=math.inf)
    assert [probe_due(off, since, 1e9, 1e9, 1.0) for since in range(6)] == [False] * 4 + [True] * 2


def test_probe_due_is_monotone_in_every_trigger() -> None:
    """A step that must be probed still must with more steps since the probe, more growth or a larger ``r``."""
    sinces, growths, rs = range(0, 20, 3), (0.5, 1.0, 1.9, 2.0, 2.1, 5.0), (0.0, 0.3, 0.5, 0.7, 3.0)
    for mode in MODES:
        for (s1, s2), (g1, g2), (r1, r2) in itertools.product(
            itertools.combinations(sinces, 2), itertools.combinations(growths, 2), itertools.combinations(rs, 2)
        ):
            if probe_due(SCHEDULE, s1, g1, r1, 1.0, mode):
                assert probe_due(SCHEDULE, s2, g2, r2, 1.0, mode), (mode, s1, s2, g1, g2, r1, r2)


# ---------------------------------------------------------------------------------------------- scheduled_target
def test_scheduled_target_follows_the_learning_rate() -> None:
    assert scheduled_target(1.0, 1e-4, 2e-4) == pytest.approx(0.5)
    assert scheduled_target(2.0, 3e-4, 3e-4) == pytest.approx(2.0)  # at the peak: r_target
    assert scheduled_target(1.0, 0.0, 2e-4) == 0.0  # the first warm-up step: no step
    assert scheduled_target(0.5, 1e-5, 1e-3) == pytest.approx(0.005)
    # a linear warm-up over 10 steps to lr 1e-3: r*(t) climbs linearly to r_target
    warm_up = [scheduled_target(2.0, 1e-3 * (k + 1) / 10, 1e-3) for k in range(10)]
    assert warm_up == pytest.approx([0.2 * (k + 1) for k in range(10)])


def test_scheduled_target_without_a_schedule_is_the_target() -> None:
    assert scheduled_target(1.0, None, 2e-4) == 1.0  # lr unknown
    assert scheduled_target(1.5, 1e-4, None) == 1.5  # peak unknown
    assert scheduled_target(1.5, 1e-4, 0.0) == 1.5  # peak zero: no ratio to take


# ---------------------------------------------------------------------------------------------------- step_scale
def test_step_scale_on_hand_computed_values() -> None:
    assert step_scale(4.0, 1.0, 1.0, "clip") == pytest.approx(0.25)  # r = 4 clipped to 1
    assert step_scale(0.5, 1.0, 1.0, "clip") == 1.0  # inside: unchanged
    assert step_scale(2.0, 1.0, 2.0, "clip") == 1.0  # exactly at the target: unchanged
    assert step_scale(6.0, 1.5, 2.0, "clip") == pytest.approx(0.5)  # r = 4 against r* = 2
    assert step_scale(0.5, 1.0, 1.0, "set") == pytest.approx(2.0)  # set lengthens a short step
    assert step_scale(4.0, 1.0, 1.0, "set") == pytest.approx(0.25)
    assert step_scale(3.0, 2.0, 0.5, "set") == pytest.approx(1 / 3)  # |u| = 3 to r* rho = 1
    assert step_scale(4.0, 1.0, 1.0, "monitor") == 1.0


def test_step_scale_with_no_radius_to_cross_is_one() -> None:
    for mode in MODES:
        assert step_scale(5.0, math.inf, 1.0, mode) == 1.0  # nothing bends along the step
        assert step_scale(0.0, 1.0, 1.0, mode) == 1.0  # nothing to scale


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_step_scale_with_no_usable_target(target: float) -> None:
    """lr = 0 in warm-up gives r* = 0: set takes no step, clip leaves the step as the optimizer made it."""
    assert step_scale(4.0, 1.0, target, "set") == 0.0
    assert step_scale(4.0, 1.0, target, "clip") == 1.0
    assert step_scale(4.0, 1.0, target, "monitor") == 1.0


def test_applied_r_meets_the_target_and_clipping_twice_changes_nothing() -> None:
    """``r_applied = scale |u| / rho``: at most ``r*`` when clipping (equal where it clipped), exactly ``r*`` when
    setting; a clipped step clipped again is left as it is."""
    generator = random.Random(0)
    for _ in range(500):
        norm, rho, target = (10 ** generator.uniform(-4, 2) for _ in range(3))
        clip, set_ = step_scale(norm, rho, target, "clip"), step_scale(norm, rho, target, "set")
        applied = clip * norm / rho
        assert 0 < clip <= 1 and applied <= target * (1 + 1e-12)
        assert (clip == 1.0) == (norm / rho <= target)
        if clip < 1:
            assert applied == pytest.approx(target, rel=1e-12)
            assert step_scale(clip * norm, rho, target, "clip") == pytest.approx(1.0, rel=1e-12)
        assert set_ * norm / rho == pytest.approx(target, rel=1e-12)


# -------------------------------------------------------------------------------------------------- reused_scale
def test_reused_scale_without_a_usable_last_radius_probes() -> None:
    for last_rho in (None, math.nan, math.inf, -math.inf):
        assert reused_scale(SCHEDULE, "clip", 0.1, 1.0, last_rho, 3, 0.1) is None
    assert reused_scale(SCHEDULE, "clip", 0.1, 1.0, 1.0, None, 0.1) is None  # no probe since the last skip


def test_reused_scale_estimates_the_applied_r_with_the_last_radius() -> None:
    # clip, r* = 2, last rho = 1: |u| = 0.9 passes unchanged (r = 0.9 <= 0.5 * 2): reused, scale 1
    assert reused_scale(SCHEDULE, "clip", 0.9, 2.0, 1.0, 3, 0.9) == 1.0
    # |u| = 1.1: r = 1.1 > 1: probed, although the clip would not touch it
    assert reused_scale(SCHEDULE, "clip", 1.1, 2.0, 1.0, 3, 1.1) is None
    # |u| = 3 would be clipped to r = 2 (scale 2/3): the applied r, 2, is above 1: probed
    assert reused_scale(SCHEDULE, "clip", 3.0, 2.0, 1.0, 3, 3.0) is None
    # with trigger_r = 1 the clipped step's applied r (2 against 1 * 2) is not above it: reused at scale 2/3
    assert reused_scale(ProbeSchedule(16, 1.0, 2.0), "clip", 3.0, 2.0, 1.0, 3, 3.0) == pytest.approx(2 / 3)
    # set always applies r = r*: the default trigger 0.5 probes every step, trigger_r = 1 reuses (scale r* rho / |u|)
    assert reused_scale(SCHEDULE, "set", 0.01, 1.0, 1.0, 3, 0.01) is None
    assert reused_scale(ProbeSchedule(16, 1.0, 2.0), "set", 0.01, 1.0, 1.0, 3, 0.01) == pytest.approx(100.0)
    # monitor: r is not a trigger, and nothing is scaled
    assert reused_scale(SCHEDULE, "monitor", 50.0, 2.0, 1.0, 3, 50.0) == 1.0


def test_reused_scale_measures_growth_against_the_last_probe() -> None:
    assert reused_scale(SCHEDULE, "clip", 0.02, 2.0, 1.0, 3, 0.01) == 1.0  # x2: not above the trigger
    assert reused_scale(SCHEDULE, "clip", 0.021, 2.0, 1.0, 3, 0.01) is None  # x2.1
    assert reused_scale(SCHEDULE, "monitor", 0.021, 2.0, 1.0, 3, 0.01) is None
    assert reused_scale(SCHEDULE, "clip", 0.01, 2.0, 1.0, 3, 0.0) is None  # the last probe saw |u| = 0: inf growth
    assert reused_scale(SCHEDULE, "clip", 0.01, 2.0, 1.0, 16, 0.01) is None  # every
