"""From a radius to a step: the normalized step ``r = |u| / rho`` and the scale applied to the update ``u``.

``r = tau / rho`` (eq. 17): ``r < 1`` is inside the convergence disk. ``"clip"`` scales ``u`` by
``min(1, r* rho / |u|)`` (eq. 19, Proposition 5.2), ``"set"`` by ``r* rho / |u|``. ``|u|`` is
``sqrt(sum_i |u_i|^2)`` over the parameter tensors.

Block-wise steps (``granularity="blocks"``): ``u = sum_b u_b`` over parameter blocks, each scaled by ``s_b`` in
[0, 1]. The spread of a sum is at most the sum of the spreads, so with ``D_bj = |u_b| * spread_j(u_b / |u_b|)`` per
softmax instance ``j`` the step ``w = sum_b s_b u_b`` has ``pi r(w) <= max_j sum_b s_b D_bj``
(:func:`spread_bound`); :func:`knapsack_scales` chooses ``s`` under that bound, and :func:`block_scale_up` the final
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


def knapsack_scales(decrease: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor | float) -> torch.Tensor:
    """Per-block scales ``s`` in [0, 1] maximizing ``sum_b s_b decrease_b`` subject to ``sum_b s_b cost_b <= budget``.

    The fractional knapsack, solved greedily (optimal for it): the blocks with ``decrease_b > 0`` and ``cost_b > 0`` in
    order of ``decrease_b / cost_b``, each taken up to 1 while the budget lasts, ``s_b = clamp((budget - C_b) /
    cost_b, 0, 1)`` with ``C_b`` the cost of the blocks before it; a block with ``decrease_b > 0`` and no cost is taken
    whole; a block with ``decrease_b <= 0`` gets 0. A negative budget counts as 0. Used with ``decrease_b = -g . u_b``
    (the first-order loss decrease of block ``b``'s update) and ``cost_b = max_j D_bj`` (:func:`spread_bound` is then at
    most ``budget``). Computed in float64; no host sync.

    Example:

    >>> knapsack_scales(torch.tensor([3.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 1.0]), 1.5)
    tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    if decrease.dim() != 1 or cost.shape != decrease.shape:
        raise ValueError(f"knapsack_scales: expects decrease and cost of one shape [blocks]; got shapes "
                         f"{tuple(decrease.shape)} and {tuple(cost.shape)}")
    decrease, cost = decrease.double(), cost.double().to(decrease.device)
    budget = torch.as_tensor(budget, dtype=torch.float64, device=decrease.device).clamp_min(0.0)
    paid = (decrease > 0) & (cost > 0)
    ratio = torch.where(paid, decrease / torch.where(paid, cost, 1.0), -math.inf)
    order = torch.argsort(ratio, descending=True, stable=True)
    sorted_cost = torch.where(paid, cost, 0.0)[order]
    before = torch.cumsum(sorted_cost, 0) - sorted_cost  # cost of the better blocks
    taken = ((budget - before) / torch.where(sorted_cost > 0, sorted_cost, 1.0)).clamp(0.0, 1.0)
    scales = torch.zeros_like(decrease).scatter(0, order, taken)
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
