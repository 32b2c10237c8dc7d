"""Convergence-radius math of "Ghosts of Softmax" (arXiv 2603.13552).

Pure functions on tensors: no models, no Trainer, no distributed code, no host syncs except
the input checks that raise. Along a step ``theta + t v`` the logits move as ``z + a t``
(``a = J v``) and the cross-entropy is analytic in ``t`` up to the nearest complex zero of
``F(t) / F(0) = sum_k softmax(z)_k exp(a_k t)`` (eq. 8). Everything here estimates or bounds
the modulus of that zero, or turns it into a step size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

import torch

__all__ = [
    "ACTIVATION_FAMILIES",
    "CLIP_MODES",
    "activation_radius",
    "binary_radius",
    "certified_radius",
    "clip_scale",
    "exact_radius",
    "normalized_step",
    "rho_bound",
    "spread",
    "top2_radius",
    "topk_exact_radius",
    "topk_radius",
    "update_norm",
    "widest_tokens",
]

PI = math.pi
CLIP_MODES = ("clip", "set")


def _check_finite(name: str, **tensors: torch.Tensor) -> None:
    for arg, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"{name}: `{arg}` contains NaN or inf (shape {tuple(tensor.shape)}); "
                "a radius needs finite inputs: check the update and the logits for overflow"
            )


def spread(slopes: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """Spread of the slopes, ``Delta = max_k a_k - min_k a_k`` over ``dim`` (eq. 11).

    Args:
        slopes: directional derivatives ``a = J v`` (any float dtype).
        mask: optional boolean tensor broadcastable to ``slopes``; only entries where it is
            True count (valid keys, real classes). A slice with no valid entry has spread 0.
        dim: the class (or key) dimension.

    Returns:
        ``slopes`` reduced over ``dim``: the spread, ``>= 0``.

    Example: ``spread(torch.tensor([1.0, -2.0, 0.5]))`` is ``tensor(3.)``.
    """
    if not slopes.is_floating_point():
        raise TypeError(f"spread: expects floating-point slopes; got dtype {slopes.dtype}")
    if mask is None:
        _check_finite("spread", slopes=slopes)
        return slopes.amax(dim) - slopes.amin(dim)
    mask = mask.to(torch.bool).expand_as(slopes)
    _check_finite("spread", slopes=torch.where(mask, slopes, torch.zeros_like(slopes)))
    high = slopes.masked_fill(~mask, -math.inf).amax(dim)
    low = slopes.masked_fill(~mask, math.inf).amin(dim)
    return torch.where(mask.any(dim), high - low, torch.zeros_like(high))


def rho_bound(spread: torch.Tensor) -> torch.Tensor:
    """General lower bound on the radius, ``rho_a = pi / Delta`` (Theorem 4.6, eq. 14).

    A zero spread means the loss does not bend along the step: the radius is ``inf``
    (never a large finite number).

    Example: ``rho_bound(torch.tensor([pi, 0.0]))`` is ``tensor([1., inf])``.
    """
    _check_finite("rho_bound", spread=spread)
    if (spread < 0).any():
        raise ValueError("rho_bound: a spread is max - min and cannot be negative; got a negative value")
    return torch.where(spread > 0, PI / spread, torch.full_like(spread, math.inf))


def binary_radius(logit_gap: torch.Tensor, slope_gap: torch.Tensor) -> torch.Tensor:
    """Exact radius of a two-class softmax, ``sqrt(delta^2 + pi^2) / |a_1 - a_2|`` (Theorem 4.3).

    The zeros of ``w_1 e^{a_1 t} + w_2 e^{a_2 t}`` sit at ``t = (-delta + i pi (2n + 1)) / (a_1 - a_2)``
    with ``delta = z_1 - z_2``; ``inf`` where the slopes are equal.

    Example: ``binary_radius(torch.tensor(0.0), torch.tensor(2.0))`` is ``pi / 2``.
    """
    logit_gap, slope_gap = torch.broadcast_tensors(logit_gap, slope_gap)
    _check_finite("binary_radius", logit_gap=logit_gap, slope_gap=slope_gap)
    numerator = torch.sqrt(logit_gap**2 + PI**2)
    magnitude = slope_gap.abs()
    return torch.where(magnitude > 0, numerator / magnitude, torch.full_like(numerator, math.inf))


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
    ``inf`` for one class or equal slopes; a radius beyond ``max_radius / Delta`` raises.

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
    """Shared frame of :func:`exact_radius` and :func:`certified_radius`: check the inputs, flatten the samples
    to float64 rows, and divide ``solve(log_softmax(z), a, Delta)`` (a radius in ``s = Delta t``) by ``Delta`` on
    the rows with ``Delta > 0``; ``inf`` on the others. Returns ``[...]`` in the dtype of ``slopes``."""
    if logits.shape != slopes.shape:
        raise ValueError(f"{name}: logits and slopes must match; got {tuple(logits.shape)} and {tuple(slopes.shape)}")
    _check_finite(name, logits=logits, slopes=slopes)
    out_dtype = slopes.dtype if slopes.is_floating_point() else torch.float64
    logits = logits.movedim(dim, -1).to(torch.float64)
    slopes = slopes.movedim(dim, -1).to(torch.float64)
    batch_shape = logits.shape[:-1]
    logits, slopes = logits.reshape(-1, logits.shape[-1]), slopes.reshape(-1, slopes.shape[-1])
    width = slopes.amax(-1) - slopes.amin(-1)
    result = torch.full(width.shape, math.inf, dtype=torch.float64, device=logits.device)
    live = width > 0
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


def _compress(log_weights: torch.Tensor, rates: torch.Tensor, exact: int, bins: int) -> tuple[torch.Tensor, ...]:
    """``sum_k w_k e^{b_k s}`` as ``sum_j W_j e^{c_j s}`` plus an error term, ``b`` in ``[-1/2, 1/2]``.

    The ``exact`` largest weights and the two extreme rates stay as they are (``h_j = 0``); every other
    class goes to one of ``bins`` equal rate bins: ``W_j`` its weight, ``c_j`` the middle of its rates,
    ``h_j`` their largest distance from ``c_j``. For ``|s| = R``:
    ``|w e^{b s} - w e^{c s}| = w e^{c Re s} |e^{(b - c) s} - 1| <= w e^{c Re s} (e^{h R} - 1)``.

    Returns ``(log W, c, h)``, each ``[rows, exact + 2 + bins]`` (empty bins: ``log W = -1e300``).
    """
    rows, classes = rates.shape
    if classes <= exact + 2 + bins:
        return log_weights, rates, torch.zeros_like(rates)
    priority = log_weights.clone()
    priority.scatter_(1, rates.argmax(1, keepdim=True), math.inf)
    priority.scatter_(1, rates.argmin(1, keepdim=True), math.inf)
    kept = priority.topk(exact + 2, dim=1).indices
    binned = torch.ones_like(rates, dtype=torch.bool).scatter_(1, kept, False)
    slot = torch.clamp(((rates + 0.5) * bins).floor().long(), 0, bins - 1) + bins * torch.arange(rows, device=rates.device)[:, None]
    slot, weight, rate = slot[binned], log_weights[binned], rates[binned]

    def reduce(values: torch.Tensor, how: str, initial: float) -> torch.Tensor:
        out = torch.full((rows * bins,), initial, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, slot, values, how, include_self=False)

    top = reduce(weight, "amax", -math.inf)
    total = torch.zeros_like(top).index_add_(0, slot, torch.exp(weight - top[slot]))
    bin_log = torch.clamp((top + torch.log(total)).view(rows, bins), min=-1e300)  # ~ -inf where empty
    high, low = reduce(rate, "amax", 0.0).view(rows, bins), reduce(rate, "amin", 0.0).view(rows, bins)
    return (
        torch.cat((log_weights.gather(1, kept), bin_log), 1),
        torch.cat((rates.gather(1, kept), (high + low) / 2), 1),
        torch.cat((torch.zeros_like(kept, dtype=rates.dtype), (high - low) / 2), 1),
    )


def _arc_check(
    log_weights: torch.Tensor,
    centres: torch.Tensor,
    halfwidths: torch.Tensor,
    radius: torch.Tensor,
    start: torch.Tensor,
    stop: torch.Tensor,
    depth: int,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per arc ``radius * e^{i [start, stop]}`` (row ``n`` of the inputs is arc ``n``): certified?, and ``G``'s turn.

    ``G(s) = sum_j W_j e^{c_j s}`` (``|c_j| <= 1/2``) is evaluated at 17 points; each point ``p`` covers
    the half sub-arcs on either side (``|s - p| <= l = radius * dtheta / 2``). There
    ``|G(s) - G(p)| <= l sup|G'| <= (l / 2) M(p) e^{l / 2}`` (``M = sum_j |terms|``) and
    ``|F - G| <= E(p) e^{l / 2}`` (``E = sum_j W_j e^{c_j Re s} (e^{h_j radius} - 1)``). A point passes if
    ``|G(p)| > (l / 2) M(p) e^{l / 2} + E(p) e^{l / 2}``: then ``|G| > |F - G|`` on its sub-arcs (Rouché)
    and ``G`` turns by less than ``pi / 2`` over each, so the summed steps are ``G``'s exact turn.
    Sub-arcs with a failing end are split again, ``depth`` more times.
    """
    theta = start[:, None] + (stop - start)[:, None] * torch.linspace(0, 1, 17, dtype=torch.float64, device=start.device)
    points = radius[:, None] * torch.exp(1j * theta)
    exponent = log_weights[:, :, None] + centres[:, :, None] * points.real[:, None, :]
    shift = exponent.amax(1, keepdim=True)
    magnitude = torch.exp(exponent - shift)
    phase = centres[:, :, None] * points.imag[:, None, :]
    value = torch.complex((magnitude * torch.cos(phase)).sum(1), (magnitude * torch.sin(phase)).sum(1))
    error = (magnitude * torch.expm1(halfwidths * radius[:, None])[:, :, None]).sum(1)
    reach = (radius * (stop - start) / 32)[:, None]  # l: half a sub-arc
    grow = torch.exp(reach / 2)
    passed = value.abs() > (reach / 2 * magnitude.sum(1) + error) * grow
    steps = torch.angle(value[:, 1:] / value[:, :-1])
    good = passed[:, 1:] & passed[:, :-1]
    # where |G| <= E already, no finer sampling helps: that arc fails
    hopeless = (value.abs() <= error * grow).any(1, keepdim=True)
    retry = ~good & ~hopeless
    if depth > 0 and retry.any():
        # At most `budget` sub-arcs are sampled finer (memory and time stay bounded); any others stay failed,
        # which only makes the answer more conservative.
        budget = max(16, chunk_elements // (17 * log_weights.shape[1]))
        arc, piece = retry.nonzero(as_tuple=True)
        arc, piece = arc[:budget], piece[:budget]
        good[arc, piece], steps[arc, piece] = _arc_check(
            log_weights[arc],
            centres[arc],
            halfwidths[arc],
            radius[arc],
            theta[arc, piece],
            theta[arc, piece + 1],
            depth - 1,
            chunk_elements,
        )
    return good.all(1), steps.sum(1)


def _zero_free(
    log_weights: torch.Tensor, centres: torch.Tensor, halfwidths: torch.Tensor, radius: torch.Tensor, chunk_elements: int
) -> torch.Tensor:
    """Per row, whether ``F`` certainly has no zero in ``|s| < radius``.

    Every arc of the circle passes :func:`_arc_check` (so ``|G| > |F - G|`` on the whole circle and
    ``G``'s winding number is exact) and ``G`` winds 0 times: by Rouché's theorem ``F`` has as many
    zeros inside as ``G`` (argument principle): none.
    """
    rows, terms = log_weights.shape
    arcs = max(4, -(-_circle_points(radius) // 8))  # 16 sub-arcs each: twice the points of _winding
    edges = torch.linspace(0, 2 * PI, arcs + 1, dtype=torch.float64, device=radius.device)
    owner = torch.arange(rows, device=radius.device).repeat_interleave(arcs)
    good = torch.empty(rows * arcs, dtype=torch.bool, device=radius.device)
    turn = torch.empty(rows * arcs, dtype=torch.float64, device=radius.device)
    batch = max(1, chunk_elements // (17 * terms))
    for first in range(0, rows * arcs, batch):
        part = slice(first, first + batch)
        row, arc = owner[part], torch.arange(rows * arcs, device=radius.device)[part] % arcs
        good[part], turn[part] = _arc_check(
            log_weights[row], centres[row], halfwidths[row], radius[row], edges[arc], edges[arc + 1], 3, chunk_elements
        )
    winding = torch.round(turn.view(rows, arcs).sum(1) / (2 * PI))
    return good.view(rows, arcs).all(1) & (winding == 0)


def certified_radius(
    logits: torch.Tensor,
    slopes: torch.Tensor,
    dim: int = -1,
    *,
    rtol: float = 5e-2,
    exact_classes: int = 64,
    bins: int = 256,
    max_radius: float = 1e4,
    chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """A lower bound on the exact radius (nearest zero of ``sum_k softmax(z)_k e^{a_k t}``, eq. 8) at any ``K``.

    In ``s = Delta t`` with rates ``b = (a - mid) / Delta`` in ``[-1/2, 1/2]`` (as :func:`exact_radius`),
    ``F(s) = sum_k w_k e^{b_k s}`` is replaced by ``G(s) = sum_j W_j e^{c_j s}``: the ``exact_classes``
    largest weights and the two extreme rates kept, every other class merged into one of ``bins`` rate
    bins (weight ``W_j``, centre ``c_j``, half-width ``h_j``). On ``|s| = R``,
    ``|F - G| <= E(s) = sum_j W_j e^{c_j Re s} (e^{h_j R} - 1)``. Rouché's theorem: where ``|G| > E`` on
    the circle, ``F`` and ``G`` have the same number of zeros inside; so a circle on which ``G`` winds
    0 times and dominates ``E`` bounds a zero-free disk of ``F``. The largest such ``R`` is found by
    growing and bisecting circles (to ``rtol``), then tried just inside ``G``'s nearest zero found
    by Newton. With ``K <= exact_classes + 2 + bins`` nothing is merged (``E = 0``) and the result is
    the exact radius to ~1e-6. Cost: ``O(exact_classes + bins)`` terms per circle point, whatever
    ``K`` (plus one ``O(K)`` pass to bin). The circle is sampled (as in :func:`exact_radius`):
    rigorous up to that sampling.

    Never below :func:`rho_bound` (``pi / Delta``, Theorem 4.6) nor, up to sampling, above
    :func:`exact_radius`. ``inf`` for one class or equal slopes.

    Args:
        logits, slopes: ``[..., K]``; dim: the class dimension.
        rtol: relative width of the final bisection bracket.
        exact_classes, bins: the compressed sum's size (more: tighter, dearer).
        max_radius: largest ``|s|`` searched; beyond it the result is ``max_radius / Delta``.
        chunk_elements: complex exponentials evaluated at once.

    Returns:
        ``[...]`` radii in units of ``t``, in the dtype of ``slopes``.
    """
    def solve(log_weights: torch.Tensor, slopes: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        rates = (slopes - ((slopes.amax(-1) + slopes.amin(-1)) / 2)[:, None]) / width[:, None]
        compressed = _compress(log_weights, rates, exact_classes, bins)
        return _certified_scaled_radius(*compressed, rtol=rtol, max_radius=max_radius, chunk_elements=chunk_elements)

    return _radius_per_sample("certified_radius", logits, slopes, dim, solve)


def _certified_scaled_radius(
    log_weights: torch.Tensor,
    centres: torch.Tensor,
    halfwidths: torch.Tensor,
    *,
    rtol: float,
    max_radius: float,
    chunk_elements: int,
) -> torch.Tensor:
    """Largest certified zero-free ``|s|`` of ``F`` (at least ``pi``) from its compressed form."""
    rows = log_weights.shape[0]

    def free(todo: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        return _zero_free(log_weights[todo], centres[todo], halfwidths[todo], radius, chunk_elements)

    exact = bool((halfwidths == 0).all())
    margins = (1e-4, 1e-3, 1e-2) if exact else (3e-3, 1e-2, 3e-2)

    def polish(rows_in: torch.Tensor, circle_radius: torch.Tensor) -> torch.Tensor:
        """Newton on ``G`` from the points of smallest ``|G|`` on a circle; certify just inside the zero found.

        Raises ``low`` of the rows (indices) where a trial circle passes; returns which did.
        """
        lw, rate = log_weights[rows_in].to(torch.complex128), centres[rows_in].to(torch.complex128)
        # starts: the 8 points of smallest |G| on each of a few circles up to circle_radius (Newton is cheap
        # next to a certificate; the more starts, the likelier the nearest zero is among the zeros found)
        starts = []
        for fraction in (0.4, 0.55, 0.7, 0.85, 1.0):
            ring = torch.maximum(circle_radius * fraction, torch.full_like(circle_radius, PI * 1.05))
            count = _circle_points(ring)
            angles = torch.linspace(0, 2 * PI, count + 1, dtype=torch.float64, device=low.device)[:-1]
            circle = ring[:, None] * torch.exp(1j * angles)[None, :]
            value, _, _ = _exp_sum(lw, rate, circle, chunk_elements)
            starts.append(circle.gather(1, value.abs().topk(min(8, count), dim=1, largest=False).indices))
        points = torch.cat(starts, 1)
        for _ in range(30):
            value, derivative, _ = _exp_sum(lw, rate, points, chunk_elements)
            step = value / derivative
            step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
            points = points - step
            if (step.abs() <= 1e-12 * points.abs()).all():
                break
        value, _, scale = _exp_sum(lw, rate, points, chunk_elements, with_magnitude=True)
        # any zero of G past low will do: a trial circle that holds another zero fails its certificate
        near = (value.abs() <= 1e-8 * scale) & (points.abs() >= low[rows_in, None])
        zero = torch.where(near, points.abs(), torch.full_like(points.real, math.inf)).amin(1)
        done = torch.zeros_like(zero, dtype=torch.bool)
        for margin in margins:
            trial = zero * (1 - margin)
            todo = ~done & torch.isfinite(trial) & (trial > low[rows_in])
            if not todo.any():
                break
            passed = free(rows_in[todo], trial[todo])
            low[rows_in[todo][passed]] = trial[todo][passed]
            done[todo.nonzero().squeeze(1)[passed]] = True
        return done

    # Theorem 4.6: |s| < pi is zero-free for F itself. First: Newton from a circle near the top-2 estimate,
    # and a certificate just inside the zero it finds (most rows stop here, after one or two circles).
    guess = top2_radius(log_weights, centres)
    low = torch.full((rows,), PI, dtype=torch.float64, device=log_weights.device)
    high = torch.clamp(torch.nan_to_num(guess, posinf=PI) * 1.05, min=PI * 1.05, max=min(max_radius, 8 * PI))
    everyone = torch.arange(rows, device=low.device)
    left = everyone[~polish(everyone, high)]
    if left.numel() == 0:
        return low
    # The others: grow circles until one fails, bisect to rtol, and polish again.
    todo = torch.zeros(rows, dtype=torch.bool, device=low.device)
    todo[left] = True
    ok = todo.clone()
    ok[todo] = free(todo, high[todo])
    while ok.any():
        low[ok] = torch.maximum(low[ok], high[ok])
        capped = ok & (high >= max_radius)
        ok &= ~capped
        high[capped] = math.inf  # nothing to find below max_radius: low is the answer
        if not ok.any():
            break
        high[ok] = torch.clamp(high[ok] * 1.5, max=max_radius)
        ok[ok.clone()] = free(ok, high[ok])
    active = todo & torch.isfinite(high) & (high > low * (1 + rtol))
    while active.any():
        middle = torch.sqrt(low[active] * high[active])
        inside = free(active, middle)
        low[active] = torch.where(inside, middle, low[active])
        high[active] = torch.where(inside, high[active], middle)
        active = todo & torch.isfinite(high) & (high > low * (1 + rtol))
    rest = (todo & torch.isfinite(high)).nonzero().squeeze(1)
    if rest.numel():
        polish(rest, high[rest])
    return low


TOPK_POOL = 4  # the top-k radius looks for k distinct rows among the TOPK_POOL * k widest tokens


def widest_tokens(widths: torch.Tensor, valid: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` valid tokens of largest spread and the next spread: ``(indices, Delta_(k+1))``.

    Args:
        widths: ``[tokens]`` spreads ``Delta_i`` (flattened positions); valid: ``[tokens]`` bool (``None``: all).
        k: how many to pick (``>= 0``); fewer when fewer tokens are valid.

    Returns:
        Flat indices into ``widths`` (widest first) and ``Delta_(k+1)``, the largest spread not picked
        (0 when every valid token was picked), in ``widths``' dtype.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"widest_tokens: k must be an integer >= 0; got {k!r}")
    widths = widths.reshape(-1)
    keep = torch.ones_like(widths, dtype=torch.bool) if valid is None else valid.reshape(-1).to(torch.bool)
    ranked = torch.where(keep, widths, torch.full_like(widths, -math.inf))
    count = min(k + 1, int(keep.sum()))  # host sync
    values, indices = ranked.topk(count)
    picked = min(k, count)
    following = values[picked] if count > picked else widths.new_zeros(())
    return indices[:picked], following


def topk_radius(
    logits: torch.Tensor,
    slopes: torch.Tensor,
    next_spread: torch.Tensor | float,
    k: int | None = None,
    **certified: float,
) -> torch.Tensor:
    """``min(min_i max(rho_cert(i), pi / Delta_i), pi / Delta_cap)`` over the first ``k`` distinct rows.

    The rows are tokens widest first (:func:`widest_tokens`). A row equal to one already taken (same logits
    and slopes: a repeated context, e.g. the first position of sequences that start alike) has the same exact
    radius and is covered by it; the first row past ``k`` distinct ones caps the rest at ``pi / Delta_cap``
    (``Delta_cap = next_spread`` when every row was taken or covered). ``rho_cert`` is
    :func:`certified_radius` (never above a token's exact radius) and ``pi / Delta_i`` Theorem 4.6's bound:
    the result is a lower bound on the batch radius ``min_i rho_exact(i)`` (eq. 14).

    Args:
        logits, slopes: ``[m, K]``, tokens in descending spread; next_spread: the largest spread of the tokens
            not among the ``m``.
        k: distinct rows given a certified radius (``None``: all ``m``).
        **certified: passed to :func:`certified_radius` (``rtol``, ``exact_classes``, ``bins``, ...).

    Returns:
        A scalar radius in units of ``t``, float64 (inf with no token of nonzero spread).
    """
    logits, slopes = logits.to(torch.float64), slopes.to(torch.float64)
    widths = spread(slopes) if logits.shape[0] else slopes.new_zeros(0)
    cap = torch.as_tensor(next_spread, dtype=torch.float64, device=slopes.device)
    taken: list[int] = []
    for row in range(logits.shape[0]):
        if any(torch.equal(logits[row], logits[t]) and torch.equal(slopes[row], slopes[t]) for t in taken):
            continue  # a repeat of a row taken: same exact radius
        if k is not None and len(taken) == k:
            cap = widths[row]
            break
        taken.append(row)
    rest = rho_bound(cap)
    if not taken:
        return rest
    exact = torch.maximum(certified_radius(logits[taken], slopes[taken], **certified), rho_bound(widths[taken]))
    return torch.minimum(exact.amin(), rest)


def topk_exact_radius(
    logits: torch.Tensor,
    slopes: torch.Tensor,
    k: int,
    valid_mask: torch.Tensor | None = None,
    **certified: float,
) -> torch.Tensor:
    """Batch radius, tighter than ``pi / max Delta``: exact (certified) radii for the ``k`` widest tokens.

    With tokens sorted by spread ``Delta_(1) >= Delta_(2) >= ...``:
    ``rho_k = min(min_{i <= k} rho_exact(i), pi / Delta_(k+1))`` (:func:`widest_tokens`, then
    :func:`topk_radius`; repeated rows count once, among the ``TOPK_POOL * k`` widest). A lower bound on the batch radius ``min_i rho_exact(i)`` (eq. 14): every
    token past the ``k``-th has ``rho_exact >= pi / Delta_i >= pi / Delta_(k+1)`` (Theorem 4.6), and
    :func:`certified_radius` never exceeds a token's exact radius. Never below :func:`rho_bound` of the
    largest spread (``k = 0`` gives it exactly); with ``k`` at least the number of tokens, the min of
    their exact radii (to the certificate's precision).

    Args:
        logits, slopes: ``[..., K]``: every leading position is one token.
        k: tokens given an exact radius (``>= 0``).
        valid_mask: ``[...]`` bool, tokens that count (labels not ``-100``); ``None``: all.
        **certified: passed to :func:`certified_radius` (``rtol``, ``exact_classes``, ``bins``, ...).

    Returns:
        A scalar radius in units of ``t`` (``inf`` with no valid token of nonzero spread), in ``slopes``' dtype.
    """
    if logits.shape != slopes.shape or logits.dim() < 1:
        raise ValueError(
            f"topk_exact_radius: logits and slopes must match; got {tuple(logits.shape)} and {tuple(slopes.shape)}"
        )
    tokens = logits.shape[:-1]
    if valid_mask is not None and valid_mask.shape != tokens:
        raise ValueError(
            f"topk_exact_radius: valid_mask must have the tokens' shape {tuple(tokens)}; got {tuple(valid_mask.shape)}"
        )
    out_dtype = slopes.dtype if slopes.is_floating_point() else torch.float64
    logits, slopes = logits.reshape(-1, logits.shape[-1]), slopes.reshape(-1, slopes.shape[-1])
    chosen, following = widest_tokens(spread(slopes.to(torch.float64)), valid_mask, TOPK_POOL * k)
    return topk_radius(logits[chosen], slopes[chosen], following, k, **certified).to(out_dtype)


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
    A zero slope gives ``inf``.

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
    _check_finite("activation_radius", preact=preact, slope=slope)
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
        return torch.full_like(preact, math.inf)
    magnitude = slope.abs()
    return torch.where(magnitude > 0, distance / magnitude, torch.full_like(distance, math.inf))


def normalized_step(update_norm: torch.Tensor | float, rho: torch.Tensor | float) -> torch.Tensor:
    """Normalized step ``r = tau / rho`` (eq. 17): ``r < 1`` is inside the convergence disk.

    ``rho = inf`` gives ``r = 0``.
    """
    update_norm = torch.as_tensor(update_norm, dtype=torch.float64 if not torch.is_tensor(update_norm) else None)
    rho = torch.as_tensor(rho, dtype=update_norm.dtype, device=update_norm.device)
    if (update_norm < 0).any() or (rho <= 0).any() or torch.isnan(update_norm).any() or torch.isnan(rho).any():
        raise ValueError("normalized_step: expects update_norm >= 0 and rho > 0 (inf allowed for rho)")
    return update_norm / rho


def clip_scale(
    update_norm: torch.Tensor | float,
    rho: torch.Tensor | float,
    r_target: float = 1.0,
    mode: str = "clip",
) -> torch.Tensor:
    """Scale for the proposed update ``u`` (eq. 19, Proposition 5.2).

    ``"clip"``: ``min(1, r_target * rho / |u|)``, so the applied step has ``r <= r_target``.
    ``"set"``: ``r_target * rho / |u|``, so the applied step has ``r = r_target`` exactly; the
    step length comes from the geometry, the direction from the optimizer.
    A zero update, or ``rho = inf`` (nothing bends along the step), gives scale 1.

    Example: ``clip_scale(4.0, 1.0)`` is ``0.25``; ``clip_scale(0.5, 1.0, mode="set")`` is ``2.0``.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip_scale: mode must be one of {CLIP_MODES}; got {mode!r}")
    if not r_target > 0 or not math.isfinite(r_target):
        raise ValueError(f"clip_scale: r_target must be a finite number > 0; got {r_target!r}")
    r = normalized_step(update_norm, rho)
    ratio = torch.where(r > 0, r_target / r, torch.ones_like(r))
    if mode == "clip":
        ratio = torch.clamp(ratio, max=1.0)
    return ratio


def update_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|u| = sqrt(sum_i |u_i|^2)`` over a list of tensors, accumulated in float64 (0 for an empty list).

    Example: ``update_norm([torch.tensor([3.0]), torch.tensor([4.0])])`` is ``tensor(5., dtype=torch.float64)``.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))).double())
