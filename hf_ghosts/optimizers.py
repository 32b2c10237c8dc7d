"""Optimizer plumbing: the torch optimizer inside a wrapper, its learning rates, step hooks, Adam's first moment,
snapshots of the weights, and the non-finite-gradient check. Never re-implements a step: the optimizer makes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_ghosts.distributed import any_rank, local_tensor
from hf_ghosts.settings import RhoSettings

__all__ = [
    "check_first_moments",
    "current_lr",
    "has_nonfinite_gradient",
    "innermost",
    "param_groups",
    "peak_lr",
    "register_step_hooks",
    "scale_first_moments",
    "snapshot",
]


def check_first_moments(optimizer: Any, settings: RhoSettings) -> None:
    """With ``rescale_moments``, refuse an optimizer without Adam's first moment (no ``betas``)."""
    inner = innermost(optimizer)
    if settings.rescale_moments and "betas" not in inner.defaults:
        name = settings.name("rescale_moments")
        raise settings.error("rescale_moments", (
            f"{type(inner).__name__} has no first moment (no 'betas'); {name} scales Adam's exp_avg. Use an "
            f"Adam-family optimizer or set {name}=False"
        ))


def scale_first_moments(optimizer: Any, params: Sequence[torch.Tensor], scale: float | Sequence[torch.Tensor]) -> None:
    """``exp_avg <- scale * exp_avg`` for ``params`` (those with state): the momentum of the step as applied. ``scale``:
    one number, or one tensor per parameter broadcasting against it (the block step's scale of each element; under
    FSDP2 against this rank's piece)."""
    state = innermost(optimizer).state
    per_parameter = not isinstance(scale, (int, float))
    scales = list(scale) if per_parameter else [scale] * len(params)
    pairs = [(local_tensor(state[p]["exp_avg"]), s) for p, s in zip(params, scales, strict=True) if "exp_avg" in state.get(p, {})]
    if pairs:
        torch._foreach_mul_([moment for moment, _ in pairs], [s for _, s in pairs] if per_parameter else scale)


def register_step_hooks(
    optimizer: Any, before: Callable[[], None], after: Callable[[], None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks calling ``before()`` and ``after()`` around each ``step`` of the torch optimizer inside ``optimizer``."""
    inner = innermost(optimizer)
    return [inner.register_step_pre_hook(lambda *_: before()), inner.register_step_post_hook(lambda *_: after())]


def innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's (or any) ``.optimizer`` wrapper."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"RhoController: expected a torch.optim.Optimizer (or a wrapper of one); got {type(optimizer).__name__}")
    return optimizer


def param_groups(optimizer: Any) -> list[dict[str, Any]]:
    return innermost(optimizer).param_groups


def current_lr(optimizer: Any) -> float:
    """The largest ``lr`` of the param groups now (what the scheduler set for the step about to run)."""
    return max(float(group["lr"]) for group in param_groups(optimizer))


def peak_lr(optimizer: Any) -> float:
    """The largest ``initial_lr`` (stored by torch's schedulers), else the largest ``lr``, over the param groups."""
    return max(float(group.get("initial_lr", group["lr"])) for group in param_groups(optimizer))


def has_nonfinite_gradient(params: list[torch.Tensor], sharded: bool = False) -> bool:
    """Whether some gradient holds a NaN or inf (``|g|`` not finite). Under FSDP2 (``sharded``) each rank sees only
    its shards, so the answer is OR-reduced over the ranks (a collective: all ranks call it, and all skip together)."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    nonfinite = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())  # host sync
    return any_rank(nonfinite) if sharded else nonfinite


def snapshot(tensors: list[torch.Tensor], into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copies of ``tensors``: written in place into ``into`` when given (no new memory), else fresh clones."""
    if into is None:
        return [t.clone() for t in tensors]
    torch._foreach_copy_(into, tensors)
    return into
