"""hf_ghosts.radii against closed forms, float64 references and brute force (numpy, no shared code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import exp_sum, softmax_weights, turns

from hf_ghosts import radii

PI = math.pi
pytestmark = pytest.mark.usefixtures("single_thread")


def random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------ references
def polynomial_radius(logits: np.ndarray, powers: np.ndarray) -> float:
    """Exact radius for integer slopes: with ``x = e^t``, ``F`` is a polynomial; its roots give every zero.

    A root ``x`` gives ``t = log|x| + i (arg x + 2 pi n)``; the nearest is ``n = 0`` (``arg`` in ``(-pi, pi]``).
    """
    degree = int(powers.max())
    coefficients = np.zeros(degree + 1)
    np.add.at(coefficients, degree - powers, softmax_weights(logits))
    return min(abs(complex(math.log(abs(x)), np.angle(x))) for x in np.roots(coefficients))


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


# ------------------------------------------------------------------------------------------ spread, bound
def test_spread_is_max_minus_min_over_the_class_dim() -> None:
    slopes = random(3, 5, 7, seed=0)
    expected = slopes.numpy().max(-1) - slopes.numpy().min(-1)
    torch.testing.assert_close(radii.spread(slopes), torch.from_numpy(expected), rtol=0, atol=0)
    torch.testing.assert_close(radii.spread(torch.tensor([1.0, -2.0, 0.5])), torch.tensor(3.0))


def test_spread_dim_argument() -> None:
    slopes = random(4, 6, seed=1)
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
    slopes = random(2, 3, 5, seed=2)
    keys = torch.tensor([True, False, True, True, False])
    expected = slopes[..., keys].amax(-1) - slopes[..., keys].amin(-1)
    torch.testing.assert_close(radii.spread(slopes, keys), expected, rtol=0, atol=0)


def test_spread_rejects_nan_and_integers() -> None:
    with pytest.raises(ValueError, match=r"spread: `slopes` contains NaN or inf"):
        radii.spread(torch.tensor([1.0, math.nan]))
    with pytest.raises(TypeError, match="floating-point"):
        radii.spread(torch.tensor([1, 2]))


def test_rho_bound_is_pi_over_spread_and_inf_at_zero() -> None:
    spreads = torch.tensor([PI, 2.0, 1e-3, 0.0], dtype=torch.float64)
    expected = torch.tensor([1.0, PI / 2, PI / 1e-3, math.inf], dtype=torch.float64)
    torch.testing.assert_close(radii.rho_bound(spreads), expected, rtol=1e-15, atol=0)


def test_rho_bound_rejects_negative_and_nan() -> None:
    with pytest.raises(ValueError, match="negative"):
        radii.rho_bound(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="NaN or inf"):
        radii.rho_bound(torch.tensor(math.nan))


# ------------------------------------------------------------------------------------------ binary, top-2
def test_binary_radius_closed_form_and_its_zero() -> None:
    gap, slope_gap = random(50, seed=3, scale=4), random(50, seed=4)
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


# ------------------------------------------------------------------------------------------ exact radius
def test_exact_radius_equals_binary_radius_for_two_classes() -> None:
    logits, slopes = random(64, 2, seed=5, scale=3), random(64, 2, seed=6)
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
    logits, slopes = random(samples, classes, seed=classes, scale=2), random(samples, classes, seed=classes + 1)
    exact = radii.exact_radius(logits, slopes)
    bound = radii.rho_bound(radii.spread(slopes))
    assert torch.isfinite(exact).all()
    assert (exact >= bound * (1 - 1e-12)).all(), (exact / bound).min()


@pytest.mark.parametrize("classes", [3, 10])
def test_exact_radius_brute_force_zero_on_the_circle_and_none_inside(classes: int) -> None:
    logits, slopes = random(4, classes, seed=10 + classes, scale=2), random(4, classes, seed=20 + classes)
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
    logits = random(3, 4, seed=7)
    slopes = torch.tensor([[0.3] * 4, [0.0, 1.0, -1.0, 0.5], [-2.0] * 4], dtype=torch.float64)
    exact = radii.exact_radius(logits, slopes)
    assert exact[0].item() == math.inf and exact[2].item() == math.inf
    assert exact[1].item() == pytest.approx(radii.exact_radius(logits[1:2], slopes[1:2]).item(), rel=1e-12)
    assert math.isfinite(exact[1].item())


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_exact_radius_rejects_non_finite_input_clearly(bad: float) -> None:
    logits, slopes = random(2, 3, seed=8), random(2, 3, seed=9)
    with pytest.raises(ValueError, match=r"exact_radius: `logits` contains NaN or inf \(shape \(2, 3\)\)"):
        radii.exact_radius(logits.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(bad, dtype=torch.float64)), slopes)
    with pytest.raises(ValueError, match=r"exact_radius: `slopes` contains NaN or inf"):
        radii.exact_radius(logits, slopes.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(bad, dtype=torch.float64)))


def test_exact_radius_mixed_dtypes_dim_and_shape_checks() -> None:
    logits, slopes = random(2, 5, 4, seed=11, scale=2).float(), random(2, 5, 4, seed=12)
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
    logits, slopes = random(16, 6, seed=13, scale=2), random(16, 6, seed=14)
    torch.testing.assert_close(radii.exact_radius(logits, -slopes), radii.exact_radius(logits, slopes), rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------ activations
PREACT = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0, 7.0], dtype=torch.float64)
SLOPE = torch.tensor([0.5, -2.0, 1.0, 0.1, -0.3, 4.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("names", "distance"),
    [
        (("relu", "leaky_relu", "relu2", "prelu"), PREACT.abs()),
        (("sigmoid", "silu", "swish", "softplus"), torch.sqrt(PREACT**2 + PI**2)),
        (("tanh",), torch.sqrt(PREACT**2 + PI**2 / 4)),
        (("gelu", "linear", "identity"), torch.full_like(PREACT, math.inf)),
    ],
)
def test_activation_radius_closed_forms(names: tuple[str, ...], distance: torch.Tensor) -> None:
    for name in names:
        torch.testing.assert_close(radii.activation_radius(PREACT, SLOPE, name), distance / SLOPE.abs(), rtol=1e-14, atol=0)


def test_activation_radius_zero_slope_is_inf() -> None:
    for name in ("relu", "silu", "tanh", "gelu_new"):
        assert radii.activation_radius(torch.tensor([0.7]), torch.tensor([0.0]), name).item() == math.inf


def activation(name: str, w: np.ndarray) -> np.ndarray:
    """The activation itself at complex points (numpy); softplus on the branch analytic off ``i pi (2n + 1)``."""
    with np.errstate(over="ignore"):  # exp of the unused side of np.where
        if name == "tanh":
            return np.tanh(w)
        if name == "sigmoid":
            return 1 / (1 + np.exp(-w))
        if name in ("silu", "swish"):
            return w / (1 + np.exp(-w))
        if name == "softplus":
            return np.where(w.real > 0, w + np.log(1 + np.exp(-w)), np.log(1 + np.exp(w)))
        if name in ("gelu_tanh", "gelu_new"):
            return 0.5 * w * (1 + np.tanh(math.sqrt(2 / PI) * (w + 0.044715 * w**3)))
    raise ValueError(name)


def cauchy_deviation(f, radius: float, reference: float, terms: int = 6, points: int = 1 << 16) -> float:
    """How far Cauchy's integral over ``|t| = radius`` is from the Taylor coefficients of ``f`` at 0.

    ``c_k(R)``, the integral of ``f(t) t^{-k-1} / (2 pi i)`` over ``|t| = R`` (trapezoid rule: an FFT), equals the
    Taylor coefficient ``c_k`` for every ``R`` below the radius of convergence, and picks up the residues of the
    singularities once one lies inside. Returns ``max_k |c_k(R) - c_k(reference)| R^k / max_{|t| = R} |f|``.
    """

    def coefficients(r: float) -> tuple[np.ndarray, float]:
        values = f(r * np.exp(2j * np.pi * np.arange(points) / points))
        return np.fft.fft(values)[:terms] / points / r ** np.arange(terms), float(np.abs(values).max())

    taylor, _ = coefficients(reference)
    found, scale = coefficients(radius)
    return float((np.abs(found - taylor) * radius ** np.arange(terms)).max() / scale)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "silu", "swish", "softplus", "gelu_tanh", "gelu_new"])
def test_activation_radius_is_where_the_taylor_series_stops_converging(name: str) -> None:
    # t -> f(z + z' t) is analytic on |t| < rho (Cauchy's integral just inside reproduces the Taylor coefficients
    # from a small circle) and not beyond (just outside it does not): rho is its radius of convergence.
    for z, slope in ((0.0, 1.0), (-1.3, 2.5), (0.7, -0.4), (4.0, 1.0)):
        rho = radii.activation_radius(torch.tensor(z, dtype=torch.float64), torch.tensor(slope, dtype=torch.float64), name)
        rho = rho.item()

        def along(t: np.ndarray, z: float = z, slope: float = slope) -> np.ndarray:
            return activation(name, z + slope * t)

        assert cauchy_deviation(along, 0.999 * rho, reference=rho / 4) < 1e-10, (z, slope, rho)
        assert cauchy_deviation(along, 1.001 * rho, reference=rho / 4) > 1e-5, (z, slope, rho)


def test_activation_radius_gelu_tanh_nearest_pole_at_the_origin() -> None:
    # The docstring's nearest poles +-0.634 +- 2.755i: farther than tanh's own pi / 2.
    distance = radii.activation_radius(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), "gelu_new")
    assert distance.item() == pytest.approx(abs(complex(0.634, 2.755)), abs=2e-3)
    assert distance.item() > PI / 2


def test_activation_radius_unknown_name_lists_supported() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'mish'; supported: .*gelu_new.*relu.*silu.*tanh"):
        radii.activation_radius(torch.ones(2), torch.ones(2), "mish")


def test_activation_radius_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="activation_radius: `slope` contains NaN"):
        radii.activation_radius(torch.ones(2), torch.tensor([1.0, math.nan]), "relu")


# ------------------------------------------------------------------------------------------ step and scale
def test_normalized_step_values() -> None:
    torch.testing.assert_close(normalized := radii.normalized_step(torch.tensor([0.5, 2.0, 0.0]), torch.tensor([1.0, 0.5, 3.0])), torch.tensor([0.5, 4.0, 0.0]))
    assert normalized.dtype == torch.float32
    assert radii.normalized_step(3.0, 1.5).item() == 2.0
    assert radii.normalized_step(3.0, math.inf).item() == 0.0


@pytest.mark.parametrize(("update_norm", "rho"), [(-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (math.nan, 1.0), (1.0, math.nan)])
def test_normalized_step_rejects_invalid(update_norm: float, rho: float) -> None:
    with pytest.raises(ValueError, match="normalized_step"):
        radii.normalized_step(update_norm, rho)


def test_clip_scale_hand_values() -> None:
    assert radii.clip_scale(4.0, 1.0).item() == 0.25
    assert radii.clip_scale(0.5, 1.0).item() == 1.0
    assert radii.clip_scale(0.5, 1.0, mode="set").item() == 2.0
    assert radii.clip_scale(4.0, 1.0, r_target=2.0).item() == 0.5


def test_clip_scale_invariants() -> None:
    norms = torch.exp(random(200, seed=15, scale=3)).abs()
    rho = torch.exp(random(200, seed=16, scale=3)).abs()
    for target in (0.25, 1.0, 3.0):
        scale = radii.clip_scale(norms, rho, r_target=target)
        applied = radii.normalized_step(norms * scale, rho)
        assert (scale <= 1).all()
        assert (applied <= target * (1 + 1e-12)).all()
        # inside the target the step is untouched; outside it lands exactly on the target
        inside = radii.normalized_step(norms, rho) <= target
        assert (scale[inside] == 1).all()
        torch.testing.assert_close(applied[~inside], torch.full_like(applied[~inside], target), rtol=1e-12, atol=0)
        # clipping twice changes nothing
        again = radii.clip_scale(norms * scale, rho, r_target=target)
        torch.testing.assert_close(again, torch.ones_like(again), rtol=1e-12, atol=0)
        # "set" gives exactly r_target, whether it shrinks or grows the step
        exact = radii.normalized_step(norms * radii.clip_scale(norms, rho, r_target=target, mode="set"), rho)
        torch.testing.assert_close(exact, torch.full_like(exact, target), rtol=1e-12, atol=0)


def test_clip_scale_zero_update_and_infinite_radius_give_one() -> None:
    for mode in radii.CLIP_MODES:
        assert radii.clip_scale(0.0, 1.0, mode=mode).item() == 1.0
        assert radii.clip_scale(5.0, math.inf, mode=mode).item() == 1.0


def test_clip_scale_validates_mode_and_target() -> None:
    with pytest.raises(ValueError, match=r"clip_scale: mode must be one of \('clip', 'set'\); got 'clamp'"):
        radii.clip_scale(1.0, 1.0, mode="clamp")
    for target in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="r_target"):
            radii.clip_scale(1.0, 1.0, r_target=target)


# ------------------------------------------------------------------------------------------ certified, top-k
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
    logits, slopes = random(2, 1500, seed=30, scale=3), random(2, 1500, seed=31)
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
    certified = radii.certified_radius(random(2, 4, seed=32), slopes)
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
    logits, slopes = random(2, 3, 5, seed=41, scale=2), random(2, 3, 5, seed=42)
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
