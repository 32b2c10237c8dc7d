"""Closed-form radii: the spread of the slopes and the bounds it gives.

Along a step ``theta + t v`` the logits move as ``z + a t`` (``a = J v``, the slopes) and the
cross-entropy is analytic in ``t`` up to the nearest complex zero of
``F(t) / F(0) = sum_k softmax(z)_k exp(a_k t)`` (eq. 8). With ``Delta = max_k a_k - min_k a_k``
(eq. 11), no zero lies in ``|t| < rho_a = pi / Delta`` (Theorem 4.6, eq. 14). Two classes have their
zeros at ``t = (-delta + i pi (2n + 1)) / (a_1 - a_2)``: radius ``sqrt(delta^2 + pi^2) / |a_1 - a_2|``
(Theorem 4.3), which the top-2 estimate applies to the two largest logits (eq. 13, 38).

No host sync: a NaN or inf input gives NaN where it lands, on the device; the caller checks the
one scalar it reads (:func:`~hf_ghosts.radii.step.check_radius`).
"""

from __future__ import annotations

import math

import torch

PI = math.pi


def _finite_or_nan(value: torch.Tensor) -> torch.Tensor:
    """``value`` where finite, NaN elsewhere (elementwise; no host sync)."""
    return torch.where(torch.isfinite(value), value, math.nan)


def spread(slopes: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """Spread of the slopes, ``Delta = max_k a_k - min_k a_k`` over ``dim`` (eq. 11).

    Args:
        slopes: directional derivatives ``a = J v`` (any float dtype).
        mask: optional boolean tensor broadcastable to ``slopes``; only entries where it is
            True count (valid keys, real classes). A slice with no valid entry has spread 0.
        dim: the class (or key) dimension.

    Returns:
        ``slopes`` reduced over ``dim``: the spread, ``>= 0``; NaN where a counted entry is NaN or inf
        (or the difference overflows).

    Example:

    >>> spread(torch.tensor([1.0, -2.0, 0.5]))
    tensor(3.)
    """
    if not slopes.is_floating_point():
        raise TypeError(f"spread: expects floating-point slopes; got dtype {slopes.dtype}")
    if mask is None:
        return _finite_or_nan(slopes.amax(dim) - slopes.amin(dim))
    mask = mask.to(torch.bool).expand_as(slopes)
    high = slopes.masked_fill(~mask, -math.inf).amax(dim)
    low = slopes.masked_fill(~mask, math.inf).amin(dim)
    return _finite_or_nan(torch.where(mask.any(dim), high - low, torch.zeros_like(high)))


def rho_bound(spread: torch.Tensor) -> torch.Tensor:
    """General lower bound on the radius, ``rho_a = pi / Delta`` (Theorem 4.6, eq. 14).

    A zero spread means the loss does not bend along the step: the radius is ``inf``
    (never a large finite number). A spread that is no spread (negative, NaN, inf) gives NaN.

    Example:

    >>> rho_bound(torch.tensor([math.pi, 0.0]))
    tensor([1., inf])
    """
    radius = torch.where(spread == 0, math.inf, PI / spread)
    return torch.where((spread >= 0) & (radius > 0), radius, math.nan)


def binary_radius(logit_gap: torch.Tensor, slope_gap: torch.Tensor) -> torch.Tensor:
    """Exact radius of a two-class softmax, ``sqrt(delta^2 + pi^2) / |a_1 - a_2|`` (Theorem 4.3).

    The zeros of ``w_1 e^{a_1 t} + w_2 e^{a_2 t}`` sit at ``t = (-delta + i pi (2n + 1)) / (a_1 - a_2)``
    with ``delta = z_1 - z_2``; ``inf`` where the slopes are equal, NaN where an input is NaN or inf.

    Example (``pi / 2``):

    >>> binary_radius(torch.tensor(0.0), torch.tensor(2.0))
    tensor(1.5708)
    """
    logit_gap, slope_gap = torch.broadcast_tensors(logit_gap, slope_gap)
    numerator = torch.sqrt(logit_gap**2 + PI**2)
    magnitude = slope_gap.abs()
    radius = torch.where(magnitude == 0, math.inf, numerator / magnitude)
    return torch.where(torch.isfinite(logit_gap) & torch.isfinite(slope_gap), radius, math.nan)


def top2_radius(logits: torch.Tensor, slopes: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Margin-aware radius of the top two classes, ``sqrt(delta^2 + pi^2) / |a_1 - a_2|`` (eq. 13, 38).

    ``delta`` is the gap between the two largest logits and ``a_1 - a_2`` the gap of their
    slopes. An estimate of the nearest ghost, not a proven bound. ``inf`` for one class.
    """
    if logits.shape != slopes.shape:
        raise ValueError(f"top2_radius: logits and slopes must match; got {tuple(logits.shape)} and {tuple(slopes.shape)}")
    if logits.shape[dim] < 2:
        return torch.full_like(logits.select(dim, 0), math.inf)
    top_logits, top_index = logits.topk(2, dim=dim)
    top_slopes = slopes.gather(dim, top_index)
    return binary_radius(
        top_logits.select(dim, 0) - top_logits.select(dim, 1),
        top_slopes.select(dim, 0) - top_slopes.select(dim, 1),
    )
