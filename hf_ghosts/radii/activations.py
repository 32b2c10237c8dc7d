"""Radius of an FFN activation along the step (Appendix B).

A neuron's pre-activation moves as ``z + z' t``; the activation ``phi`` is analytic in ``t`` up to the
nearest point of its complex singular set ``S``: ``rho = dist(z, S) / |z'|`` (eq. 21). ReLU family:
``S = {0}``; logistic family (sigmoid, SiLU, softplus): poles at ``i pi (2n + 1)``; tanh: ``i pi (n + 1/2)``;
tanh-approximate GELU: roots of ``sqrt(2/pi) (z + 0.044715 z^3) = i pi (n + 1/2)``; exact GELU: entire.

No host sync: NaN or inf in ``z`` or ``z'`` gives NaN at that neuron, on the device.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from hf_ghosts.radii.bounds import PI


@cache
def _gelu_tanh_singularities(terms: int = 8) -> tuple[tuple[float, float], ...]:
    """Poles of ``tanh(sqrt(2/pi) (z + 0.044715 z^3))``: roots of the cubic ``= i pi (n + 1/2)``."""
    import numpy as np

    scale, cubic = math.sqrt(2 / PI), 0.044715
    poles = []
    for n in range(-terms, terms):
        poles.extend(np.roots([scale * cubic, 0.0, scale, -1j * PI * (n + 0.5)]))
    return tuple((float(p.real), float(abs(p.imag))) for p in poles)


ACTIVATION_FAMILIES: dict[str, tuple[str, ...]] = {
    "kink": ("relu", "leaky_relu", "relu2", "prelu"),
    "logistic": ("sigmoid", "silu", "swish", "softplus"),
    "tanh": ("tanh",),
    "gelu_tanh": ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
    "entire": ("gelu", "linear", "identity"),
}


def activation_radius(preact: torch.Tensor, slope: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-neuron radius of an activation along the step, ``dist(z, S) / |z'|`` (Appendix B, eq. 21).

    ``S`` is the activation's singular set in the complex plane:
    ReLU family, the kink at 0 (``dist = |z|``); sigmoid, SiLU/Swish, softplus, poles at
    ``i pi (2n + 1)`` (``dist = sqrt(z^2 + pi^2)``); tanh, poles at ``i pi (n + 1/2)``
    (``dist = sqrt(z^2 + pi^2 / 4)``); tanh-approximate GELU, the poles of
    ``tanh(sqrt(2/pi)(z + 0.044715 z^3))``, solved from the cubic (nearest at
    ``+-0.634 +- 2.755i``, farther than tanh's ``pi / 2``); exact (erf) GELU, entire: ``inf``.
    A zero slope gives ``inf``; a NaN or inf ``z`` or ``z'`` gives NaN.

    Args:
        preact: pre-activations ``z``.
        slope: their directional derivatives ``z'`` (same shape).
        activation: a name from ``ACTIVATION_FAMILIES`` (Hugging Face ``hidden_act`` names).
    """
    family = next((fam for fam, names in ACTIVATION_FAMILIES.items() if activation in names), None)
    if family is None:
        supported = sorted(name for names in ACTIVATION_FAMILIES.values() for name in names)
        raise ValueError(f"activation_radius: unknown activation {activation!r}; supported: {', '.join(supported)}")
    preact, slope = torch.broadcast_tensors(preact, slope)
    if family == "kink":
        distance = preact.abs()
    elif family == "logistic":
        distance = torch.sqrt(preact**2 + PI**2)
    elif family == "tanh":
        distance = torch.sqrt(preact**2 + (PI / 2) ** 2)
    elif family == "gelu_tanh":
        distance = torch.full_like(preact, math.inf)
        for real, imag in _gelu_tanh_singularities():
            distance = torch.minimum(distance, torch.sqrt((preact - real) ** 2 + imag**2))
    else:
        distance = torch.full_like(preact, math.inf)
    magnitude = slope.abs()
    radius = torch.where(magnitude > 0, distance / magnitude, torch.full_like(distance, math.inf))
    return torch.where(torch.isfinite(preact) & torch.isfinite(slope), radius, math.nan)

