"""hf_ghosts.radii.activations: Appendix B radii against closed forms and Cauchy's integral in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ghosts import radii

PI = math.pi
pytestmark = pytest.mark.usefixtures("single_thread")


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

@pytest.mark.parametrize("name", ["relu", "silu", "tanh", "gelu_new", "gelu"])
def test_activation_radius_is_nan_where_an_input_is_not_finite(name: str) -> None:
    preact = torch.tensor([0.7, math.nan, 0.7, math.inf, 0.7])
    slope = torch.tensor([1.0, 1.0, math.nan, 1.0, -math.inf])
    radius = radii.activation_radius(preact, slope, name)
    assert torch.isnan(radius[1:]).all()
    assert radius[0].item() == radii.activation_radius(preact[:1], slope[:1], name).item()
