"""Exact radius by the argument principle: the modulus of the nearest complex zero of ``F``.

``F(t) = sum_k softmax(z)_k e^{a_k t}`` (eq. 8). Per sample, in float64: ``b = (a - mid) / Delta`` in
``[-1/2, 1/2]`` and ``s = Delta t`` (multiplying by ``e^{-mid t}`` moves no zero), so
``F(s) = sum_k w_k e^{b_k s}``. The number of zeros in ``|s| < R`` is the winding number
``(1 / 2 pi) oint d arg F`` around the circle (argument principle); no zero lies in ``|s| < pi``
(Theorem 4.6). Circles are grown, bisected, and Newton ``s <- s - F(s) / F'(s)`` polishes the zero.

Iterative, with data-dependent loop counts: these functions read scalars on the host (they are
measurements, not on the training path). A sample with a NaN or inf logit or slope gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hf_ghosts.radii.bounds import PI, top2_radius


def _exp_sum(
    log_weights: torch.Tensor, rates: torch.Tensor, points: torch.Tensor, chunk_elements: int, with_magnitude: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``F(s) = sum_k exp(log w_k + b_k s)``, ``F'(s)`` (and ``sum_k |terms|``) at ``points[n, m]``.

    Every value at a point is divided by that point's largest term modulus: a positive real factor,
    so it moves no zero, no argument and no Newton step, and ``exp`` cannot overflow on a large
    circle. Summed over classes in chunks, so that about ``chunk_elements`` terms exist at once.
    """
    chunk = max(1, chunk_elements // max(1, points.numel()))
    shift = torch.full(points.shape, -math.inf, dtype=torch.float64, device=points.device)
    for start in range(0, rates.shape[1], chunk):
        real = log_weights.real[:, start : start + chunk, None] + rates.real[:, start : start + chunk, None] * points.real[:, None, :]
        shift = torch.maximum(shift, real.amax(1))
    value = torch.zeros(points.shape, dtype=torch.complex128, device=points.device)
    derivative = torch.zeros_like(value)
    magnitude = torch.zeros_like(shift) if with_magnitude else None
    for start in range(0, rates.shape[1], chunk):
        rate = rates[:, start : start + chunk, None]
        term = torch.exp(log_weights[:, start : start + chunk, None] + rate * points[:, None, :] - shift[:, None, :])
        value += term.sum(1)
        derivative += (rate * term).sum(1)
        if magnitude is not None:
            magnitude += term.abs().sum(1)
    return value, derivative, magnitude


def _circle_points(radius: torch.Tensor) -> int:
    # |b| <= 1/2, so each term turns by at most radius/2 per radian of the circle: 8 points per
    # unit of radius keep every term's turn under pi/8 between neighbouring points.
    return int(8 * math.ceil(radius.max().item())) + 64


def _arc_turn(
    log_weights: torch.Tensor,
    rates: torch.Tensor,
    radius: torch.Tensor,
    start: torch.Tensor,
    stop: torch.Tensor,
    chunk_elements: int,
    depth: int,
) -> torch.Tensor:
    """Turn of ``F`` along each arc ``radius * e^{i [start, stop]}`` (row ``n`` of the inputs is arc ``n``).

    The turn is summed over 16 sub-arcs; a sub-arc turning by more than ``pi / 2`` (a zero close
    to the circle turns ``F`` fast there) is split again, ``depth`` more times.
    """
    theta = start[:, None] + (stop - start)[:, None] * torch.linspace(0, 1, 17, dtype=torch.float64, device=start.device)
    value, _, _ = _exp_sum(log_weights, rates, radius[:, None] * torch.exp(1j * theta), chunk_elements)
    steps = torch.angle(value[:, 1:] / value[:, :-1])
    coarse = steps.abs() > PI / 2
    if depth > 0 and coarse.any():
        arc, piece = coarse.nonzero(as_tuple=True)
        steps[arc, piece] = _arc_turn(
            log_weights[arc], rates[arc], radius[arc], theta[arc, piece], theta[arc, piece + 1], chunk_elements, depth - 1
        )
    return steps.sum(1)


def _winding(log_weights: torch.Tensor, rates: torch.Tensor, radius: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Number of zeros of ``F`` inside ``|s| < radius`` per sample (argument principle).

    The turn of ``F`` is summed over neighbouring circle points; that is only right while each
    step turns by less than ``pi``, so steps above ``pi / 2`` are resampled finer (up to 16^3x).
    """
    count = _circle_points(radius)
    angles = torch.linspace(0, 2 * PI, count + 1, dtype=torch.float64, device=radius.device)
    value, _, _ = _exp_sum(log_weights, rates, radius[:, None] * torch.exp(1j * angles[:-1])[None, :], chunk_elements)
    steps = torch.angle(value.roll(-1, dims=1) / value)
    coarse = steps.abs() > PI / 2
    if coarse.any():
        row, piece = coarse.nonzero(as_tuple=True)
        steps[row, piece] = _arc_turn(
            log_weights[row], rates[row], radius[row], angles[piece], angles[piece + 1], chunk_elements, depth=2
        )
    return torch.round(steps.sum(1) / (2 * PI)).to(torch.int64)


def exact_radius(
    logits: torch.Tensor,
    slopes: torch.Tensor,
    dim: int = -1,
    *,
    rtol: float = 1e-9,
    max_radius: float = 1e4,
    chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """Exact radius: modulus of the nearest complex zero of ``sum_k softmax(z)_k e^{a_k t}`` (eq. 8).

    Method, per sample, in float64: centre and scale the slopes, ``b = (a - mid) / Delta`` in
    ``[-1/2, 1/2]`` and ``s = Delta t`` (multiplying by ``e^{-mid t}`` moves no zero). No zero
    lies in ``|s| < pi`` (Theorem 4.6). The argument principle counts zeros inside a circle;
    circles are grown from ``pi`` (starting near the top-2 estimate) until one holds a zero,
    bisected (geometrically) to a bracket of relative width 1%, and Newton's method, started from
    the points of smallest ``|F|`` on the outer circle, polishes the zero to ``rtol``. The
    result is the smallest polished modulus not beyond the bracket, or the bracket's outer end
    (within ~1% of the zero) if Newton lands on no zero there. Cost: ``O(K * radius)`` complex exponentials per circle, in
    chunks of ``chunk_elements``; fine for a full LM vocabulary over a few hundred tokens.

    Equals :func:`binary_radius` for two classes, and is never below :func:`rho_bound`.
    ``inf`` for one class or equal slopes, NaN for a sample with a NaN or inf logit or slope; a radius
    beyond ``max_radius / Delta`` raises.

    Args:
        logits: ``[..., K]`` logits ``z`` (softmax weights ``w = softmax(z)``).
        slopes: ``[..., K]`` directional derivatives ``a`` of the logits.
        dim: the class dimension.
        rtol: relative tolerance of Newton's polish.
        max_radius: largest ``|s| = Delta * rho`` searched.
        chunk_elements: complex exponentials evaluated at once.

    Returns:
        ``[...]`` radii in units of ``t``, in the dtype of ``slopes``.
    """
    def solve(log_weights: torch.Tensor, slopes: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        return _exact_scaled_radius(
            log_weights, slopes, width, rtol=rtol, max_radius=max_radius, chunk_elements=chunk_elements
        )

    return _radius_per_sample("exact_radius", logits, slopes, dim, solve)


def _radius_per_sample(
    name: str,
    logits: torch.Tensor,
    slopes: torch.Tensor,
    dim: int,
    solve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Shared frame of :func:`exact_radius` and :func:`~hf_ghosts.radii.certified.certified_radius`: check the
    shapes, flatten the samples to float64 rows, and divide ``solve(log_softmax(z), a, Delta)`` (a radius in
    ``s = Delta t``) by ``Delta`` on the rows with ``Delta > 0``; ``inf`` on the others with finite inputs, NaN on
    the rows holding a NaN or inf. Returns ``[...]`` in the dtype of ``slopes``."""
    if logits.shape != slopes.shape:
        raise ValueError(f"{name}: logits and slopes must match; got {tuple(logits.shape)} and {tuple(slopes.shape)}")
    out_dtype = slopes.dtype if slopes.is_floating_point() else torch.float64
    logits = logits.movedim(dim, -1).to(torch.float64)
    slopes = slopes.movedim(dim, -1).to(torch.float64)
    batch_shape = logits.shape[:-1]
    logits, slopes = logits.reshape(-1, logits.shape[-1]), slopes.reshape(-1, slopes.shape[-1])
    width = slopes.amax(-1) - slopes.amin(-1)
    finite = torch.isfinite(logits).all(-1) & torch.isfinite(slopes).all(-1)
    result = torch.full(width.shape, math.inf, dtype=torch.float64, device=logits.device).masked_fill(~finite, math.nan)
    live = finite & (width > 0)
    if live.any():
        result[live] = solve(torch.log_softmax(logits[live], -1), slopes[live], width[live]) / width[live]
    return result.reshape(batch_shape).to(out_dtype)


def _exact_scaled_radius(
    log_weights: torch.Tensor,
    slopes: torch.Tensor,
    width: torch.Tensor,
    *,
    rtol: float,
    max_radius: float,
    chunk_elements: int,
) -> torch.Tensor:
    """Nearest zero modulus of ``sum_k w_k e^{b_k s}``, ``b`` scaled to ``[-1/2, 1/2]``."""
    middle = (slopes.amax(-1) + slopes.amin(-1)) / 2
    rates = ((slopes - middle[:, None]) / width[:, None]).to(torch.complex128)
    log_weights = log_weights.to(torch.complex128)
    samples, _classes = rates.shape

    def zeros_inside(rows: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        # Only the rows still searching: a circle's point count follows its largest radius.
        return _winding(log_weights[rows], rates[rows], radius, chunk_elements)

    # Grow circles until each sample has a zero inside: start at the top-2 estimate (scaled),
    # capped, since top-2 can be far off (near-equal top slopes) and big circles are costly.
    guess = top2_radius(log_weights.real, slopes) * width
    low = torch.full((samples,), PI, dtype=torch.float64, device=rates.device)
    high = torch.clamp(torch.nan_to_num(guess, posinf=PI) * 1.05, min=PI * 1.05, max=min(max_radius, 16 * PI))
    counts = zeros_inside(torch.ones_like(low, dtype=torch.bool), high)
    for _ in range(64):
        if (counts > 0).all():
            break
        todo = counts == 0
        if (high[todo] >= max_radius).any():
            raise ValueError(
                f"exact_radius: no zero within |Delta * t| < {max_radius:g} for some sample; "
                "raise `max_radius` (the logits are extremely confident)"
            )
        low[todo] = high[todo]
        high[todo] = torch.clamp(high[todo] * 1.5, max=max_radius)
        counts[todo] = zeros_inside(todo, high[todo])

    # Bisect to a 1% bracket, and on while the circle holds more than the nearest conjugate pair
    # (zeros come in pairs: real logits and slopes): a confident sample has a line of zeros at
    # nearly equal moduli, and Newton below must start next to the nearest one.
    def unsettled() -> torch.Tensor:
        return (high > low * 1.01) | ((counts > 2) & (high > low * (1 + 1e-12)))

    active = unsettled()
    while active.any():
        middle_radius = torch.sqrt(low[active] * high[active])
        inner = zeros_inside(active, middle_radius)
        inside = inner > 0
        high[active] = torch.where(inside, middle_radius, high[active])
        counts[active] = torch.where(inside, inner, counts[active])
        low[active] = torch.where(inside, low[active], middle_radius)
        active = unsettled()

    # Newton from the circle points of smallest |F|: the zero just inside the circle is near them.
    count = _circle_points(high)
    angles = torch.linspace(0, 2 * PI, count + 1, dtype=torch.float64, device=rates.device)[:-1]
    circle = high[:, None] * torch.exp(1j * angles)[None, :]
    value, _, _ = _exp_sum(log_weights, rates, circle, chunk_elements)
    starts = circle.gather(1, value.abs().topk(min(8, count), dim=1, largest=False).indices)
    points = starts.clone()
    for _ in range(60):
        value, derivative, _ = _exp_sum(log_weights, rates, points, chunk_elements)
        step = value / derivative
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        points = points - step
        if (step.abs() <= rtol * points.abs()).all():
            break
    value, _, scale = _exp_sum(log_weights, rates, points, chunk_elements, with_magnitude=True)
    # Any polished zero is a true zero, so a modulus below `low` (a zero the sampled circle
    # missed) is kept: it only makes the answer more exact. No zero lies below pi (Theorem 4.6).
    converged = (value.abs() <= 1e-8 * scale) & (points.abs() <= high[:, None] * (1 + 1e-6))
    modulus = torch.where(converged, points.abs(), torch.full_like(points.real, math.inf)).amin(1)
    return torch.where(torch.isfinite(modulus), modulus, high)
