"""From a radius to a step: the normalized step ``r = |u| / rho`` and the scale applied to the update ``u``.

``r = tau / rho`` (eq. 17): ``r < 1`` is inside the convergence disk. ``"clip"`` scales ``u`` by
``min(1, r* rho / |u|)`` (eq. 19, Proposition 5.2), ``"set"`` by ``r* rho / |u|``. ``|u|`` is
``sqrt(sum_i |u_i|^2)`` over the parameter tensors.

Block-wise steps (``granularity="blocks"``): ``u = sum_b u_b`` over parameter blocks, each scaled by ``s_b`` in
[0, 1]. The spread of a sum is at most the sum of the spreads, so with ``D_bj = |u_b| * spread_j(u_b / |u_b|)`` per
softmax instance ``j`` the step ``w = sum_b s_b u_b`` has ``pi r(w) <= max_j sum_b s_b D_bj``
(:func:`spread_bound`); :func:`block_allocation` chooses ``s`` under that bound, and :func:`block_scale_up` the final
factor once ``r(w)`` is measured.

No host sync: an invalid input (``|u| < 0``, ``rho <= 0``, NaN) gives NaN on the device. A caller that
reads ``rho`` on the host checks it once with :func:`check_radius`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CLIP_MODES = ("clip", "set")


def check_radius(rho: float, caller: str) -> float:
    """``rho`` itself if it is a radius (``> 0``, ``inf`` allowed), else a ``ValueError`` naming ``caller``.

    The radii propagate NaN and inf inputs as NaN instead of checking them (a check is a host sync);
    the caller checks the one float it has read.

    Example:

    >>> check_radius(2.0, "me")
    2.0
    >>> check_radius(float("nan"), "me")
    Traceback (most recent call last):
    ...
    ValueError: me: the measured radius is nan, and a radius is > 0 (inf allowed); NaN means ...
    """
    if not rho > 0:
        raise ValueError(
            f"{caller}: the measured radius is {rho!r}, and a radius is > 0 (inf allowed); NaN means the slopes or "
            "logits contain NaN or inf: a radius needs finite inputs: check the update and the logits for overflow"
        )
    return rho


def normalized_step(update_norm: torch.Tensor | float, rho: torch.Tensor | float) -> torch.Tensor:
    """Normalized step ``r = tau / rho`` (eq. 17): ``r < 1`` is inside the convergence disk.

    ``rho = inf`` gives ``r = 0``; ``update_norm < 0``, ``rho <= 0`` or a NaN give NaN.
    """
    update_norm = torch.as_tensor(update_norm, dtype=torch.float64 if not torch.is_tensor(update_norm) else None)
    rho = torch.as_tensor(rho, dtype=update_norm.dtype, device=update_norm.device)
    return torch.where((update_norm >= 0) & (rho > 0), update_norm / rho, math.nan)


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
    A zero update, or ``rho = inf`` (nothing bends along the step), gives scale 1; an invalid
    ``|u|`` or ``rho`` (see :func:`normalized_step`) gives NaN.

    Example:

    >>> clip_scale(4.0, 1.0)
    tensor(0.2500, dtype=torch.float64)
    >>> clip_scale(0.5, 1.0, mode="set")
    tensor(2., dtype=torch.float64)
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip_scale: mode must be one of {CLIP_MODES}; got {mode!r}")
    if not r_target > 0 or not math.isfinite(r_target):
        raise ValueError(f"clip_scale: r_target must be a finite number > 0; got {r_target!r}")
    r = normalized_step(update_norm, rho)
    ratio = torch.where(r == 0, 1.0, r_target / r)
    if mode == "clip":
        ratio = torch.clamp(ratio, max=1.0)
    return ratio


def update_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|u| = sqrt(sum_i |u_i|^2)`` over a list of tensors, accumulated in float64 (0 for an empty list).

    Example:

    >>> update_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5., dtype=torch.float64)
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))).double())


def spread_bound(scales: torch.Tensor, spreads: torch.Tensor) -> torch.Tensor:
    """The certificate of a block-wise step: ``max_j sum_b s_b D_bj``, a bound on the spread of ``sum_b s_b u_b``.

    ``spreads`` is ``[blocks, instances]`` (``D_bj``: block ``b``'s spread on softmax instance ``j``, the output
    softmax or one attention head), ``scales`` is ``[blocks]``. Slopes are linear in the direction, and the spread
    ``max a - min a`` of a sum is at most the sum of the spreads, so ``pi r(sum_b s_b u_b) <= spread_bound(s, D)``
    for ``s >= 0``. 0 for no instance.

    Example:

    >>> spread_bound(torch.tensor([1.0, 0.5]), torch.tensor([[1.0, 2.0], [4.0, 0.0]]))
    tensor(3.)
    """
    if spreads.dim() != 2 or scales.shape != spreads.shape[:1]:
        raise ValueError(f"spread_bound: expects scales [blocks] and spreads [blocks, instances]; got shapes "
                         f"{tuple(scales.shape)} and {tuple(spreads.shape)}")
    return (scales.to(spreads.dtype) @ spreads).amax() if spreads.shape[1] else spreads.new_zeros(())


def block_allocation(decrease: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor | float) -> torch.Tensor:
    """Per-block scales ``s`` in [0, 1] maximizing ``sum_b decrease_b sqrt(s_b)`` subject to ``sum_b s_b cost_b <=
    budget``: the predicted decrease with diminishing returns, so that every useful block keeps moving.

    With ``decrease_b = -g . u_b`` (block ``b``'s first-order loss decrease) and ``cost_b = max_j D_bj`` (its spread,
    so :func:`spread_bound` is at most ``budget = pi r*``). The first-order decrease itself (a fractional knapsack)
    hands the whole budget to the block of best decrease per spread (the head), which then trains alone at a too high
    rate; ``sqrt`` gives diminishing returns. The optimum (KKT): ``s_b = min(1, (decrease_b / (lambda cost_b))^2)``,
    i.e. the budget shared in proportion to ``decrease_b^2 / cost_b`` among the blocks below 1, found by water-filling
    (blocks at 1 leave the rest to the others, at most one round per block). A block with ``decrease_b > 0`` and no cost
    is taken whole; one with ``decrease_b <= 0`` gets 0; a negative budget counts as 0. Float64, no host sync.

    Example:

    >>> block_allocation(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 1.0]), 1.0)
    tensor([0.8000, 0.2000, 0.0000], dtype=torch.float64)
    >>> block_allocation(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 1.0]), 1.5)
    tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    if decrease.dim() != 1 or cost.shape != decrease.shape:
        raise ValueError(f"block_allocation: expects decrease and cost of one shape [blocks]; got shapes "
                         f"{tuple(decrease.shape)} and {tuple(cost.shape)}")
    decrease, cost = decrease.double(), cost.double().to(decrease.device)
    budget = torch.as_tensor(budget, dtype=torch.float64, device=decrease.device).clamp_min(0.0)
    paid = (decrease > 0) & (cost > 0)
    safe_cost = torch.where(paid, cost, 1.0)
    weight = torch.where(paid, decrease * decrease / safe_cost, 0.0)  # each block's share of the budget
    capped = torch.zeros_like(paid)
    for _ in range(decrease.numel() + 1):  # water-filling: a round caps at least one block or changes nothing
        free = paid & ~capped
        left = (budget - torch.where(capped, cost, 0.0).sum()).clamp_min(0.0)
        total = torch.where(free, weight, 0.0).sum()
        share = torch.where(free, left * weight / (safe_cost * torch.where(total > 0, total, 1.0)), 0.0)
        capped = capped | (free & (share >= 1.0))
    scales = torch.where(capped, 1.0, share.clamp(0.0, 1.0))
    return torch.where(paid, scales, torch.where((decrease > 0) & (cost <= 0), 1.0, 0.0))


def block_scale_up(r_target: float, r_measured: float, top_scale: float) -> float:
    """The factor ``c = min(r* / r(w), 1 / max_b s_b)`` applied to the measured block-wise step ``w = sum_b s_b u_b``.

    ``r(c w) = c r(w) <= r*`` (the certificate is the measurement of ``w``), and no block moves more than the optimizer
    proposed (``c s_b <= 1``). ``r(w) = 0`` (nothing bends along ``w``) gives ``1 / max_b s_b``.

    Example:

    >>> block_scale_up(2.0, 1.0, 0.5), block_scale_up(2.0, 4.0, 0.5)
    (2.0, 0.5)
    """
    if not top_scale > 0 or not r_measured >= 0 or not r_target > 0:
        raise ValueError(f"block_scale_up: expects r_target > 0, r_measured >= 0 and top_scale > 0; got {r_target!r}, "
                         f"{r_measured!r} and {top_scale!r}")
    return min(r_target / r_measured, 1.0 / top_scale) if r_measured > 0 else 1.0 / top_scale
