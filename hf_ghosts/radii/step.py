"""From a radius to a step: the normalized step ``r = |u| / rho`` and the scale applied to the update ``u``.

``r = tau / rho`` (eq. 17): ``r < 1`` is inside the convergence disk. ``"clip"`` scales ``u`` by
``min(1, r* rho / |u|)`` (eq. 19, Proposition 5.2), ``"set"`` by ``r* rho / |u|``. ``|u|`` is
``sqrt(sum_i |u_i|^2)`` over the parameter tensors.

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
