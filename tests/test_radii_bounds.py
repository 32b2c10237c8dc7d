"""hf_ghosts.radii.bounds: the spread, pi / Delta, the two-class and top-2 radii, against closed forms and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ghosts import radii
from tests.helpers import randn64
from tests.references import exp_sum

PI = math.pi
pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------ spread, bound
def test_spread_is_max_minus_min_over_the_class_dim() -> None:
    slopes = randn64(3, 5, 7, seed=0)
    expected = slopes.numpy().max(-1) - slopes.numpy().min(-1)
    torch.testing.assert_close(radii.spread(slopes), torch.from_numpy(expected), rtol=0, atol=0)
    torch.testing.assert_close(radii.spread(torch.tensor([1.0, -2.0, 0.5])), torch.tensor(3.0))


def test_spread_dim_argument() -> None:
    slopes = randn64(4, 6, seed=1)
    torch.testing.assert_close(radii.spread(slopes, dim=0), radii.spread(slopes.T, dim=-1), rtol=0, atol=0)
    assert radii.spread(slopes, dim=0).shape == (6,)


def test_spread_counts_only_masked_entries_and_an_empty_slice_is_zero() -> None:
    slopes = torch.tensor([[5.0, 1.0, -1.0, -7.0], [2.0, 0.0, 9.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[False, True, True, False], [True, False, False, False], [False, False, False, False]])
    # row 0: max(1, -1) - min(1, -1) = 2; row 1: one entry -> 0; row 2: no entry -> 0
    torch.testing.assert_close(radii.spread(slopes, mask), torch.tensor([2.0, 0.0, 0.0]), rtol=0, atol=0)
    # entries outside the mask may hold anything, even inf (a dropped key)
    torch.testing.assert_close(radii.spread(slopes.masked_fill(~mask, math.inf), mask), torch.tensor([2.0, 0.0, 0.0]))


def test_spread_mask_broadcasts() -> None:
    slopes = randn64(2, 3, 5, seed=2)
    keys = torch.tensor([True, False, True, True, False])
    expected = slopes[..., keys].amax(-1) - slopes[..., keys].amin(-1)
    torch.testing.assert_close(radii.spread(slopes, keys), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_spread_is_nan_where_a_counted_slope_is_not_finite(bad: float) -> None:
    slopes = randn64(3, 4, seed=3)
    slopes[1, 2] = bad
    result = radii.spread(slopes)
    assert math.isnan(result[1].item())
    torch.testing.assert_close(result[[0, 2]], radii.spread(slopes[[0, 2]]), rtol=0, atol=0)
    # masked: only a counted entry makes NaN
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert math.isnan(radii.spread(slopes, mask)[1].item())
    mask[1, 2] = False
    assert radii.spread(slopes, mask)[1].item() == radii.spread(slopes[1, [0, 1, 3]]).item()


def test_spread_overflowing_to_inf_is_nan_and_integers_are_refused() -> None:
    huge = torch.finfo(torch.float32).max
    assert math.isnan(radii.spread(torch.tensor([huge, -huge])).item())
    with pytest.raises(TypeError, match="floating-point"):
        radii.spread(torch.tensor([1, 2]))


def test_rho_bound_is_pi_over_spread_and_inf_at_zero() -> None:
    spreads = torch.tensor([PI, 2.0, 1e-3, 0.0], dtype=torch.float64)
    expected = torch.tensor([1.0, PI / 2, PI / 1e-3, math.inf], dtype=torch.float64)
    torch.testing.assert_close(radii.rho_bound(spreads), expected, rtol=1e-15, atol=0)


def test_rho_bound_of_a_negative_nan_or_inf_spread_is_nan() -> None:
    radius = radii.rho_bound(torch.tensor([1.0, -0.5, math.nan, math.inf, 0.0]))
    assert radius[0].item() == pytest.approx(PI) and radius[4].item() == math.inf
    assert torch.isnan(radius[1:4]).all()


# ------------------------------------------------------------------------------------------ binary, top-2
def test_binary_radius_closed_form_and_its_zero() -> None:
    gap, slope_gap = randn64(50, seed=3, scale=4), randn64(50, seed=4)
    radius = radii.binary_radius(gap, slope_gap)
    torch.testing.assert_close(radius, torch.sqrt(gap**2 + PI**2) / slope_gap.abs(), rtol=1e-15, atol=0)
    # The zero t = (-delta + i pi) / (a_1 - a_2) of w_1 e^{a_1 t} + w_2 e^{a_2 t} has that modulus.
    for delta, a in zip(gap.tolist()[:10], slope_gap.tolist()[:10], strict=True):
        t = complex(-delta, PI) / a
        value, _, scale = exp_sum(np.array([delta, 0.0]), np.array([a, 0.0]), np.array([t]))
        assert abs(value[0]) < 1e-13 * scale[0]
        expected = radii.binary_radius(torch.tensor(delta, dtype=torch.float64), torch.tensor(a, dtype=torch.float64))
        assert abs(t) == pytest.approx(expected.item(), rel=1e-14)


def test_binary_radius_minimum_is_pi_over_spread_and_equal_slopes_are_inf() -> None:
    assert radii.binary_radius(torch.tensor(0.0), torch.tensor(2.0)).item() == pytest.approx(PI / 2, rel=1e-7)
    assert radii.binary_radius(torch.tensor(1.5), torch.tensor(0.0)).item() == math.inf
    assert radii.binary_radius(torch.tensor(1.5), torch.tensor(-2.0)) == radii.binary_radius(torch.tensor(1.5), torch.tensor(2.0))


def test_binary_radius_of_non_finite_gaps_is_nan() -> None:
    gaps = torch.tensor([math.nan, math.inf, 1.0, 1.0, 0.5])
    slope_gaps = torch.tensor([1.0, 1.0, math.nan, -math.inf, 2.0])
    radius = radii.binary_radius(gaps, slope_gaps)
    assert torch.isnan(radius[:4]).all()
    assert radius[4].item() == pytest.approx(math.sqrt(0.25 + PI**2) / 2)


def test_top2_radius_hand_example() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9]], dtype=torch.float64)
    slopes = torch.tensor([[0.5, -1.5, 2.0], [7.0, 1.0, 0.5]], dtype=torch.float64)
    # row 0: top two are classes 0 and 1, margin 2, slope gap 2 -> sqrt(4 + pi^2) / 2
    # row 1: top two are classes 1 and 2, margin 0.1, slope gap 0.5 -> sqrt(0.01 + pi^2) / 0.5
    expected = torch.tensor([math.sqrt(4 + PI**2) / 2, math.sqrt(0.01 + PI**2) / 0.5], dtype=torch.float64)
    torch.testing.assert_close(radii.top2_radius(logits, slopes), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(radii.top2_radius(logits.T, slopes.T, dim=0), expected, rtol=1e-12, atol=0)


def test_top2_radius_one_class_is_inf_and_shapes_must_match() -> None:
    assert radii.top2_radius(torch.zeros(4, 1), torch.ones(4, 1)).tolist() == [math.inf] * 4
    with pytest.raises(ValueError, match="must match"):
        radii.top2_radius(torch.zeros(2, 3), torch.zeros(2, 4))



def test_top2_radius_nan_in_the_top_two_is_nan() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    slopes = torch.tensor([[math.nan, 1.0, 0.0], [0.5, -1.5, math.nan]])
    radius = radii.top2_radius(logits, slopes)
    assert math.isnan(radius[0].item())
    assert radius[1].item() == pytest.approx(math.sqrt(4 + PI**2) / 2)  # a class outside the top two does not count
