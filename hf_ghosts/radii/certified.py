"""Rouché-certified radius and the top-k batch radius built on it.

``F(s) = sum_k w_k e^{b_k s}`` (``s = Delta t``, ``b`` in ``[-1/2, 1/2]``, as in
:mod:`~hf_ghosts.radii.exact`) is compressed to ``G(s) = sum_j W_j e^{c_j s}`` (the largest weights and
the extreme rates kept, the rest in rate bins of half-width ``h_j``), with
``|F - G| <= E(s) = sum_j W_j e^{c_j Re s} (e^{h_j |s|} - 1)``. Rouché: where ``|G| > E`` on a circle on
which ``G`` winds 0 times, ``F`` has no zero inside; the largest such circle is a lower bound on the exact
radius, at any vocabulary size.

The batch radius over tokens ``i`` is ``min_i rho_exact(i)``; with spreads sorted
``Delta_(1) >= Delta_(2) >= ...``, ``rho_k = min(min_{i <= k} rho_cert(i), pi / Delta_(k+1))`` is a lower
bound on it (Theorem 4.6 for the rest, eq. 14).

Iterative, with data-dependent loop counts and shapes: these functions read scalars on the host (off the
default training path: ``radius="topk_exact"`` only). A NaN or inf input gives NaN.
"""

from __future__ import annotations

import math

import torch

from hf_ghosts.radii.bounds import PI, rho_bound, spread, top2_radius
from hf_ghosts.radii.exact import _circle_points, _exp_sum, _radius_per_sample


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
    :func:`~hf_ghosts.radii.exact.exact_radius`. ``inf`` for one class or equal slopes, NaN for a sample with a NaN
    or inf input.

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

