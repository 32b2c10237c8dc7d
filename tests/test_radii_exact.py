"""hf_ghosts.radii.exact: the argument-principle radius against polynomial roots, binary closed forms, Newton in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ghosts import radii
from tests.helpers import randn64
from tests.references import exp_sum, polynomial_radius, turns

PI = math.pi
pytestmark = pytest.mark.usefixtures("single_thread")


def newton_zero_at_modulus(logits: np.ndarray, slopes: np.ndarray, modulus: float) -> complex:
    """Newton from 256 points on ``|t| = modulus``; the converged zero whose modulus is nearest ``modulus``."""
    points = modulus * np.exp(2j * np.pi * np.arange(256) / 256)
    with np.errstate(all="ignore"):  # some starts run off to infinity; they are dropped below
        for _ in range(100):
            value, derivative, _ = exp_sum(logits, slopes, points)
            points = points - value / derivative
        value, _, scale = exp_sum(logits, slopes, points)
        zeros = points[np.isfinite(points) & (np.abs(value) < 1e-12 * scale)]
    assert zeros.size, "Newton found no zero near the returned radius"
    return complex(zeros[np.argmin(np.abs(np.abs(zeros) - modulus))])


# ------------------------------------------------------------------------------------------ exact radius
def test_exact_radius_equals_binary_radius_for_two_classes() -> None:
    logits, slopes = randn64(64, 2, seed=5, scale=3), randn64(64, 2, seed=6)
    expected = radii.binary_radius(logits[:, 0] - logits[:, 1], slopes[:, 0] - slopes[:, 1])
    torch.testing.assert_close(radii.exact_radius(logits, slopes), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("classes", [3, 4, 6])
def test_exact_radius_equals_polynomial_roots_for_integer_slopes(classes: int) -> None:
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(24, classes, generator=generator, dtype=torch.float64) * 2
    powers = torch.randint(0, 7, (24, classes), generator=generator)  # repeated slopes included
    powers[:, 0], powers[:, 1] = 0, 7
    expected = [polynomial_radius(logits[i].numpy(), powers[i].numpy()) for i in range(24)]
    torch.testing.assert_close(
        radii.exact_radius(logits, powers.double()), torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=0
    )


def test_exact_radius_when_the_top_two_classes_share_a_slope() -> None:
    # Classes 0 and 2 share slope 0 (and hold the two largest logits, so top-2 sees no spread):
    # F = (w_0 + w_2) + w_1 e^{6t} is binary with gap log((w_0 + w_2) / w_1) and slope gap 6.
    logits = torch.tensor([[0.9172, -3.2110, 0.2710]], dtype=torch.float64)
    slopes = torch.tensor([[0.0, 6.0, 0.0]], dtype=torch.float64)
    weights = logits.softmax(-1)[0]
    gap = torch.log((weights[0] + weights[2]) / weights[1])
    torch.testing.assert_close(radii.exact_radius(logits, slopes)[0], torch.sqrt(gap**2 + PI**2) / 6, rtol=1e-9, atol=0)


@pytest.mark.parametrize("gap", [100.0, 3000.0])
def test_exact_radius_of_very_confident_samples(gap: float) -> None:
    # A line of zeros at Re(s) = -gap with nearly equal moduli: the nearest must be found, not a
    # neighbour. At gap 3000, exp(b s) with |b s| ~ 1500 overflows float64 unless rescaled.
    logits = torch.tensor([[gap, 0.0], [0.3, 0.0]], dtype=torch.float64)
    slopes = torch.tensor([[0.5, -0.5], [1.0, -1.0]], dtype=torch.float64)
    expected = torch.tensor([math.sqrt(gap**2 + PI**2), math.sqrt(0.09 + PI**2) / 2], dtype=torch.float64)
    torch.testing.assert_close(radii.exact_radius(logits, slopes), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize(("classes", "samples"), [(3, 32), (10, 32), (200, 4)])
def test_exact_radius_is_never_below_the_pi_over_spread_bound(classes: int, samples: int) -> None:
    logits, slopes = randn64(samples, classes, seed=classes, scale=2), randn64(samples, classes, seed=classes + 1)
    exact = radii.exact_radius(logits, slopes)
    bound = radii.rho_bound(radii.spread(slopes))
    assert torch.isfinite(exact).all()
    assert (exact >= bound * (1 - 1e-12)).all(), (exact / bound).min()


@pytest.mark.parametrize("classes", [3, 10])
def test_exact_radius_brute_force_zero_on_the_circle_and_none_inside(classes: int) -> None:
    logits, slopes = randn64(4, classes, seed=10 + classes, scale=2), randn64(4, classes, seed=20 + classes)
    exact = radii.exact_radius(logits, slopes)
    for z, a, rho in zip(logits.numpy(), slopes.numpy(), exact.tolist(), strict=True):
        zero = newton_zero_at_modulus(z, a, rho)
        assert abs(zero) == pytest.approx(rho, rel=1e-9)
        # Argument principle on a dense circle just inside: no zero; just outside: at least one.
        points = 200_000
        assert round(turns(z, a, rho * (1 - 1e-4), points)) == 0
        assert round(turns(z, a, rho * (1 + 1e-4), points)) >= 1
        # And |F| stays away from 0 on a polar grid strictly inside.
        grid = np.linspace(0, rho * (1 - 1e-3), 60)[:, None] * np.exp(1j * np.linspace(0, 2 * np.pi, 721))[None, :]
        value, _, scale = exp_sum(z, a, grid.ravel())
        assert (np.abs(value) / scale).min() > 1e-6


def test_exact_radius_inf_for_one_class_or_equal_slopes() -> None:
    assert radii.exact_radius(torch.zeros(3, 1), torch.ones(3, 1)).tolist() == [math.inf] * 3
    logits = randn64(3, 4, seed=7)
    slopes = torch.tensor([[0.3] * 4, [0.0, 1.0, -1.0, 0.5], [-2.0] * 4], dtype=torch.float64)
    exact = radii.exact_radius(logits, slopes)
    assert exact[0].item() == math.inf and exact[2].item() == math.inf
    assert exact[1].item() == pytest.approx(radii.exact_radius(logits[1:2], slopes[1:2]).item(), rel=1e-12)
    assert math.isfinite(exact[1].item())


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_exact_radius_is_nan_on_a_sample_with_non_finite_input(bad: float) -> None:
    logits, slopes = randn64(3, 4, seed=8), randn64(3, 4, seed=9)
    clean = radii.exact_radius(logits, slopes)
    for row, (z, a) in enumerate(((logits.clone(), slopes), (logits, slopes.clone()))):
        (z if row == 0 else a)[1, 2] = bad
        result = radii.exact_radius(z, a)
        assert math.isnan(result[1].item())
        torch.testing.assert_close(result[[0, 2]], clean[[0, 2]], rtol=0, atol=0)  # the other samples as before


def test_exact_radius_mixed_dtypes_dim_and_shape_checks() -> None:
    logits, slopes = randn64(2, 5, 4, seed=11, scale=2).float(), randn64(2, 5, 4, seed=12)
    exact = radii.exact_radius(logits, slopes)
    assert exact.dtype == torch.float64 and exact.shape == (2, 5)
    torch.testing.assert_close(exact, radii.exact_radius(logits.double(), slopes), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        radii.exact_radius(logits.movedim(-1, 0), slopes.movedim(-1, 0), dim=0), exact, rtol=1e-12, atol=0
    )
    assert radii.exact_radius(logits, slopes.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="must match"):
        radii.exact_radius(logits, slopes[..., :3])


def test_exact_radius_sign_invariance() -> None:
    logits, slopes = randn64(16, 6, seed=13, scale=2), randn64(16, 6, seed=14)
    torch.testing.assert_close(radii.exact_radius(logits, -slopes), radii.exact_radius(logits, slopes), rtol=1e-9, atol=0)
