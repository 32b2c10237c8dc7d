"""hf_ghosts.radii.certified: the Rouché-certified radius and the top-k batch radius, against polynomial roots and numpy."""

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


def integer_slope_batch(tokens: int, classes: int, degree: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    """Logits and integer slopes in ``[0, degree]`` (both ends used), and each token's true radius (polynomial roots)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, classes, generator=generator, dtype=torch.float64) * scale
    powers = torch.randint(0, degree + 1, (tokens, classes), generator=generator)
    powers[:, 0], powers[:, 1] = 0, degree
    truth = torch.tensor([polynomial_radius(logits[i].numpy(), powers[i].numpy()) for i in range(tokens)], dtype=torch.float64)
    return logits, powers.double(), truth


@pytest.mark.parametrize(("classes", "degree", "compress"), [(6, 7, False), (40, 12, False), (400, 40, True)])
def test_certified_radius_is_a_lower_bound_on_the_polynomial_roots(classes: int, degree: int, compress: bool) -> None:
    logits, slopes, truth = integer_slope_batch(12, classes, degree, seed=classes)
    # compress: 8 exact classes and 16 bins force the Rouché certificate to carry a nonzero |F - G|
    options = {"exact_classes": 8, "bins": 16} if compress else {}
    certified = radii.certified_radius(logits, slopes, **options)
    bound = radii.rho_bound(radii.spread(slopes))
    assert (certified <= truth).all(), (certified / truth).max()
    assert (certified >= bound).all()
    # and tight: uncompressed, Newton takes it to 1e-4; compressed this coarsely, within 20%
    assert (certified >= truth * (0.8 if compress else 1 - 2e-4)).all(), (certified / truth).min()


@pytest.mark.slow
def test_certified_radius_compressed_disk_is_zero_free_on_a_dense_grid() -> None:
    # Gaussian slopes over 1500 classes, 16 kept and 64 bins, checked in numpy: |F| > 0 inside, no turn on the circle.
    logits, slopes = randn64(2, 1500, seed=30, scale=3), randn64(2, 1500, seed=31)
    certified = radii.certified_radius(logits, slopes, exact_classes=16, bins=64)
    bound = radii.rho_bound(radii.spread(slopes))
    assert (certified > 1.5 * bound).all()  # far tighter than pi / Delta here
    for z, a, rho in zip(logits.numpy(), slopes.numpy(), certified.tolist(), strict=True):
        assert round(turns(z, a, rho, 5_000)) == 0
        grid = np.linspace(0, rho, 30)[:, None] * np.exp(1j * np.linspace(0, 2 * np.pi, 241))[None, :]
        value, _, scale = exp_sum(z, a, grid.ravel())
        assert (np.abs(value) / scale).min() > 1e-8


def test_certified_radius_inf_for_equal_slopes_and_shape_checks() -> None:
    slopes = torch.tensor([[0.3] * 4, [0.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    certified = radii.certified_radius(randn64(2, 4, seed=32), slopes)
    assert certified[0].item() == math.inf and math.isfinite(certified[1].item())
    with pytest.raises(ValueError, match="certified_radius: logits and slopes must match"):
        radii.certified_radius(torch.zeros(2, 3), torch.zeros(2, 4))


def test_topk_exact_radius_between_the_bound_and_the_true_batch_radius() -> None:
    logits, slopes, truth = integer_slope_batch(16, 10, 9, seed=40)
    scale = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)[:, None]  # tokens of different spreads
    slopes, truth = slopes * scale, truth / scale[:, 0]
    widest = radii.rho_bound(radii.spread(slopes)).min()
    previous = widest
    for k in (0, 1, 2, 4, 8, 15, 16, 40):
        radius = radii.topk_exact_radius(logits, slopes, k)
        assert widest <= radius <= truth.min(), k
        assert radius >= previous * (1 - 1e-12), k  # more exact tokens never loosen it (here)
        previous = radius
    assert radii.topk_exact_radius(logits, slopes, 0) == widest
    # k covering every token: the batch's exact radius
    assert radii.topk_exact_radius(logits, slopes, 16).item() == pytest.approx(truth.min().item(), rel=2e-4)


def test_topk_exact_radius_uses_pi_over_the_next_spread() -> None:
    # Token 0: a confident binary sample (exact radius sqrt(20^2 + pi^2) / 4 >> pi / 4); token 1: spread 2.
    logits = torch.tensor([[20.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    slopes = torch.tensor([[2.0, -2.0], [1.0, -1.0], [0.25, -0.25]], dtype=torch.float64)
    assert radii.topk_exact_radius(logits, slopes, 1).item() == pytest.approx(PI / 2, rel=1e-12)
    assert radii.topk_exact_radius(logits, slopes, 2).item() == pytest.approx(PI / 2, rel=2e-4)  # binary, gap 0
    expected = math.sqrt(400 + PI**2) / 4
    assert radii.topk_exact_radius(logits[:1], slopes[:1], 1).item() == pytest.approx(expected, rel=2e-4)
    assert radii.topk_exact_radius(logits[:1], slopes[:1], 1).item() <= expected


def test_topk_exact_radius_valid_mask_shapes_and_errors() -> None:
    logits, slopes = randn64(2, 3, 5, seed=41, scale=2), randn64(2, 3, 5, seed=42)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    wide = slopes.clone()
    wide[0, 1] *= 100  # masked: must not count
    expected = radii.topk_exact_radius(logits[mask], slopes[mask], 3)
    assert radii.topk_exact_radius(logits, wide, 3, mask) == expected
    assert radii.topk_exact_radius(logits, wide, 0, mask) == radii.rho_bound(radii.spread(slopes[mask])).min()
    assert radii.topk_exact_radius(logits, slopes, 2, torch.zeros(2, 3, dtype=torch.bool)).item() == math.inf
    assert radii.topk_exact_radius(logits.float(), slopes.float(), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        radii.topk_exact_radius(logits, slopes, -1)
    with pytest.raises(ValueError, match="valid_mask must have the tokens' shape"):
        radii.topk_exact_radius(logits, slopes, 1, mask[0])


def test_certified_and_topk_radius_are_nan_with_a_non_finite_slope() -> None:
    logits, slopes = randn64(3, 5, seed=43, scale=2), randn64(3, 5, seed=44)
    clean = radii.certified_radius(logits, slopes)
    slopes[2, 1] = math.nan
    certified = radii.certified_radius(logits, slopes)
    assert math.isnan(certified[2].item())
    torch.testing.assert_close(certified[:2], clean[:2], rtol=0, atol=0)
    assert math.isnan(radii.topk_exact_radius(logits, slopes, 1).item())  # the NaN row is the widest: picked
    assert math.isnan(radii.topk_exact_radius(logits, slopes, 0).item())  # or the cap pi / Delta_(1)
    valid = torch.tensor([True, True, False])
    assert radii.topk_exact_radius(logits, slopes, 1, valid) == radii.topk_exact_radius(logits[:2], slopes[:2], 1)
