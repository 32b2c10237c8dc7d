"""Several processes: which backend is in use, and global reductions over ranks and shards.

Every rank must compute the same ``rho``, the same scale and apply the same update. How that is
reached depends on the backend (see docs/usage.md, "Multiple GPUs"):

=============  ==========================  ===============================  =========================
backend        weights the controller      update norm ``|u|``              probe estimator
               sees on each rank
=============  ==========================  ===============================  =========================
single, DDP    the full weights (replicas  local (replicas agree: DDP       ``"auto"``: ``fd`` in fp32,
               under DDP)                  averaged the gradients)          ``jvp`` in 16 bits on CUDA; through
                                                                            ``functional_call`` on
                                                                            the unwrapped model
FSDP2          this rank's shard           ``sqrt`` of the all-reduced SUM  ``fd``, perturbing the
               (``DTensor.to_local()``)    of squares over the shards       local shards in place,
               any ``param_dtype``                                          all-gathered in fp32
FSDP1          refused (:data:`FSDP1_ERROR`)
DeepSpeed      refused by ``RhoTrainer`` (the engine steps flattened fp32 partitions)
=============  ==========================================================================================

In every backend each rank probes its own micro-batch, and
:func:`all_reduce_report` reduces the spreads with MAX (the FFN radius
with MIN) across processes; the scale is then computed from identical numbers everywhere and
applied to whatever each rank holds (its replica, or its shard).

Under FSDP2 the probe is :class:`~hf_ghosts.probe.ShardedRadiusProbe` (central differences written into
the local shards in place; why ``fd`` there: :mod:`hf_ghosts.probe.sharded`). A block-wise step
(:mod:`hf_ghosts.blocks`) sums each block's ``|u_b|^2`` and ``g . u_b`` over the shards (:func:`shard_sum`) and
splits a fused q/k/v projection at this rank's offset in it (:func:`local_offset`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hf_ghosts import compat
from hf_ghosts.radii import update_norm
from hf_ghosts.settings import REDUCTIONS

if TYPE_CHECKING:  # the probe imports this module (its collectives); a report is only handed in
    from hf_ghosts.probe.report import RadiusReport

__all__ = [
    "BACKENDS",
    "FSDP1_ERROR",
    "all_reduce_report",
    "any_rank",
    "check_fsdp_plugin",
    "detect_backend",
    "full_norm",
    "global_norm",
    "is_main_process",
    "local_offset",
    "local_tensor",
    "max_over_ranks",
    "shard_sum",
]

BACKENDS = ("single", "ddp", "fsdp2", "fsdp1")

FSDP1_ERROR = (
    "hf_ghosts supports FSDP through FSDP2 only (Accelerate: fsdp_version: 2). FSDP1 keeps the root module's "
    "unsharded flat parameters after a forward, so a probe that writes old +- h*v into the shards would be "
    "measured (and training continued) on stale weights. Use fsdp_version: 2, or DDP."
)

try:  # torch >= 2.6
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None  # type: ignore[assignment,misc]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on global rank 0, and when ``torch.distributed`` is not initialized."""
    return not _initialized() or dist.get_rank() == 0


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: ``tensor.to_local()`` for a DTensor (a view: writes reach the shard), else itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def detect_backend(model: torch.nn.Module) -> str:
    """``"fsdp2"`` (``fully_shard`` or DTensor parameters), ``"fsdp1"``, ``"ddp"`` (world size > 1) or ``"single"``.

    ``model`` is what the controller is given: the unwrapped model under DDP, the sharded one under FSDP.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    modules = list(model.modules())
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        return "fsdp1"
    if (FSDPModule is not None and any(isinstance(m, FSDPModule) for m in modules)) or (
        DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())
    ):
        return "fsdp2"
    return "ddp" if _initialized() and dist.get_world_size() > 1 else "single"


def check_fsdp_plugin(plugin: Any) -> None:
    """Raise ``ValueError`` for an Accelerate FSDP plugin the controller cannot serve: FSDP1.

    A 16-bit ``mixed_precision_policy.param_dtype`` is served: the probe all-gathers in fp32
    (:func:`hf_ghosts.compat.fsdp_full_precision`).

    Args:
        plugin: ``accelerator.state.fsdp_plugin`` (an ``accelerate.utils.FullyShardedDataParallelPlugin``).
    """
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"{FSDP1_ERROR} Got fsdp_version={version!r}.")


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (an all-reduce MAX; ``flag`` itself without a process group)."""
    if not _initialized() or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())  # host sync


def max_over_ranks(value: float) -> float:
    """The maximum of a finite or NaN ``value`` over all ranks (an all-reduce MAX; ``value`` itself without a process
    group); NaN if NaN on any rank (it travels as inf, which MAX keeps)."""
    if not _initialized() or dist.get_world_size() == 1:
        return value
    packed = torch.tensor([math.inf if math.isnan(value) else value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    result = float(packed.item())  # host sync
    return math.nan if result == math.inf else result


def all_reduce_report(report: RadiusReport, group: Any = None) -> RadiusReport:
    """Make ``report`` identical on every process: MAX of spreads, MIN of the radii (FFN, top-k output), SUM of counts.

    The MIN of per-rank top-k radii is a lower bound on the global batch radius: each is one on its rank's tokens.
    One ``all_reduce(MAX)`` carries the spreads and the negated radii together; a second
    (SUM) carries the position counts. A no-op when ``torch.distributed`` is not initialized.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return report
    extrema = {name: 1.0 if how == "max" else -1.0 for name, how in REDUCTIONS.items() if how != "sum"}
    present = {name: getattr(report, name) for name in extrema if getattr(report, name) is not None}
    # A NaN (NaN or inf slopes on some rank) travels as +inf, which MAX keeps (a collective's MAX may drop a NaN,
    # depending on rank order), and comes back as NaN: no spread is +inf (spread gives NaN), no negated radius is.
    packed = torch.cat([extrema[name] * t.reshape(-1).float() for name, t in present.items()])
    packed = packed.masked_fill(packed.isnan(), float("inf"))
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    packed = packed.masked_fill(packed == float("inf"), float("nan"))
    reduced: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor in present.items():  # one all_reduce(MAX) carried the spreads and the negated radii together
        reduced[name] = packed[offset : offset + tensor.numel()].reshape(tensor.shape) * extrema[name]
        offset += tensor.numel()
    counts = {name: getattr(report, name) for name, how in REDUCTIONS.items() if how == "sum" and getattr(report, name) is not None}
    if counts:  # one all_reduce(SUM) carries every position count (float64: exact for any count of tokens)
        summed = torch.stack([t.reshape(()).to(packed.device, torch.float64) for t in counts.values()])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        reduced.update({name: summed[i].to(t.device, t.dtype) for i, (name, t) in enumerate(counts.items())})
    return replace(report, **reduced)


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shard_groups(param: torch.Tensor) -> tuple[Any, ...]:
    """The process groups over which ``param``'s local pieces partition it (empty: replicated or plain tensor)."""
    if DTensor is None or not isinstance(param, DTensor):
        return ()
    mesh = param.device_mesh
    dims = tuple(i for i, placement in enumerate(param.placements) if placement.is_shard())
    if any(placement.is_partial() for placement in param.placements):
        raise ValueError(f"hf_ghosts: a parameter with a Partial placement cannot be measured; got {param.placements}")
    return tuple(mesh.get_group(i) for i in dims)


def shard_sum(sum_of: Callable[[list[int]], torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum over all ranks' pieces of the parameters ``like`` (float64 on the CPU, the same on every rank).

    ``sum_of(indices)`` is this rank's sum over its local pieces of ``like[i]``, ``i in indices``; it is called once per
    distinct sharding and summed (all-reduce SUM) over the mesh dimensions those parameters are sharded on, not over
    those they are replicated on. Plain tensors are replicas and are not reduced: without DTensors this is
    ``sum_of(all indices)`` itself, with no collective.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, param in enumerate(like):
        groups.setdefault(_shard_groups(param), []).append(i)
    total: torch.Tensor | None = None
    for process_groups, indices in groups.items():
        summed = sum_of(indices).double()
        for group in process_groups:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        total = summed.cpu() if total is None else total + summed.cpu()  # host sync
    if total is None:
        raise ValueError("shard_sum: no parameters to sum over")
    return total


def global_norm(local: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_i |u_i|^2)`` over the full tensors whose local pieces are ``local`` (float64, same on every rank):
    the :func:`shard_sum` of the local squares; 0 for an empty list."""
    if not local:
        return torch.zeros((), dtype=torch.float64)
    squares = lambda indices: torch.stack(torch._foreach_norm([local[i] for i in indices])).double().pow(2).sum()  # noqa: E731
    return shard_sum(squares, like).sqrt()


def full_norm(local: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|u|`` of the update whose pieces on this rank are ``local`` (of the parameters ``like``): :func:`global_norm`
    under FSDP2 (any DTensor), else :func:`~hf_ghosts.radii.update_norm` of the full tensors this rank holds."""
    if DTensor is not None and any(isinstance(p, DTensor) for p in like):
        return global_norm(local, like)
    return update_norm(local)


def local_offset(param: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's piece of ``param`` starts in the full tensor, per dimension: for a DTensor
    :func:`hf_ghosts.compat.dtensor_offset` (torch's rule for ``to_local()``), zeros for a plain tensor."""
    if DTensor is None or not isinstance(param, DTensor):
        return (0,) * param.dim()
    return compat.dtensor_offset(param)
