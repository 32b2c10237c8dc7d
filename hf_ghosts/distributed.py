"""Several processes: which backend is in use, global reductions over shards, and the FSDP2 probe.

Every rank must compute the same ``rho``, the same scale and apply the same update. How that is
reached depends on the backend (see the README's "Multiple GPUs"):

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

Why ``fd`` under FSDP2: FSDP2 all-gathers the shards in module hooks and swaps the parameters
it registers, so neither ``functional_call`` with dual tensors (``NotImplementedError: Operator
aten._has_same_storage_numel.default does not have a sharding strategy registered``) nor with
plain ones (``aten.embedding.default got mixed torch.Tensor and DTensor``) reaches the forward.
:class:`ShardedRadiusProbe` writes ``old +- h v`` into the local shards in place, runs the
sharded model's own forward (which all-gathers what was written), and copies the saved shards
back, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hf_ghosts import compat
from hf_ghosts.probe import RadiusProbe, RadiusReport, _logits_of, forward_kwargs

__all__ = [
    "BACKENDS",
    "FSDP1_ERROR",
    "ShardedRadiusProbe",
    "all_reduce_report",
    "any_rank",
    "check_fsdp_plugin",
    "detect_backend",
    "global_norm",
    "is_main_process",
    "local_tensor",
]

logger = logging.getLogger(__name__)

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


def all_reduce_report(report: RadiusReport, group: Any = None) -> RadiusReport:
    """Make ``report`` identical on every process: MAX of spreads, MIN of the radii (FFN, top-k output), SUM of counts.

    The MIN of per-rank top-k radii is a lower bound on the global batch radius: each is one on its rank's tokens.
    One ``all_reduce(MAX)`` carries the spreads and the negated radii together; a second
    (SUM) carries the token count. A no-op when ``torch.distributed`` is not initialized.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return report
    parts = [t.reshape(-1).float() for t in (report.out_spread, report.attn_spread) if t is not None]
    for radius in (report.ffn_radius, report.ffn_activation_radius, report.out_radius):
        if radius is not None:
            parts.append(-radius.reshape(-1).float())
    # A NaN (NaN or inf slopes on some rank) travels as +inf, which MAX keeps (a collective's MAX may drop a NaN,
    # depending on rank order), and comes back as NaN: no spread is +inf (spread gives NaN), no negated radius is.
    packed = torch.cat(parts)
    packed = packed.masked_fill(packed.isnan(), float("inf"))
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    packed = packed.masked_fill(packed == float("inf"), float("nan"))
    offset = 0

    def take(tensor: torch.Tensor | None, sign: float = 1.0) -> torch.Tensor | None:
        nonlocal offset
        if tensor is None:
            return None
        value = packed[offset : offset + tensor.numel()].reshape(tensor.shape) * sign
        offset += tensor.numel()
        return value

    out_spread = take(report.out_spread)
    attn_spread = take(report.attn_spread)
    ffn_radius = take(report.ffn_radius, -1.0)
    ffn_activation_radius = take(report.ffn_activation_radius, -1.0)
    out_radius = take(report.out_radius, -1.0)
    tokens = report.output_tokens
    if tokens is not None:
        tokens = tokens.clone()
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM, group=group)
    return RadiusReport(
        out_spread=out_spread, attn_spread=attn_spread, ffn_radius=ffn_radius, output_tokens=tokens,
        ffn_activation_radius=ffn_activation_radius, out_radius=out_radius,
    )


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


def global_norm(local: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_i |u_i|^2)`` over the full tensors whose local pieces are ``local`` (float64, same on every rank).

    ``like[i]`` is the parameter ``local[i]`` belongs to: for a DTensor, the squares are summed
    (all-reduce SUM) over the mesh dimensions it is sharded on and not over those it is replicated
    on; plain tensors are replicas and are not reduced. One all-reduce per distinct sharding.
    """
    groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for piece, param in zip(local, like, strict=True):
        groups.setdefault(_shard_groups(param), []).append(piece)
    total = torch.zeros((), dtype=torch.float64)
    for process_groups, pieces in groups.items():
        squares = torch.stack(torch._foreach_norm(pieces)).double().pow(2).sum()
        for group in process_groups:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
        total = total + squares.cpu()  # host sync
    return total.sqrt()


class ShardedRadiusProbe(RadiusProbe):
    """:class:`~hf_ghosts.probe.RadiusProbe` for an FSDP2 (``fully_shard``) model: central finite differences in place.

    Each forward writes ``old +- h v`` (``v`` the unit direction, its norm taken over all shards)
    into this rank's shards, runs the model's own forward (FSDP2 all-gathers what was written),
    and reshards every FSDP module before and after, so no forward reuses unsharded parameters
    gathered earlier (``reshard_after_forward=False`` would keep them). Each measurement saves the
    shards first, moves from those copies and copies them back afterwards: the model is left
    bit-identical. All ranks must call :meth:`measure` (or :meth:`logit_slopes`) together
    (collectives inside); its report is this rank's, to be reduced with :func:`all_reduce_report`.

    Args: as :class:`~hf_ghosts.probe.RadiusProbe`; ``estimator="jvp"`` is replaced by ``"fd"``
    (logged once), and the (sharded) parameters must be ``dtype`` (fp32). A bf16/fp16 ``MixedPrecisionPolicy``
    is fine: the probe's forwards all-gather in fp32 (:func:`hf_ghosts.compat.fsdp_full_precision`), training's
    in the policy's dtype. ``direction``
    and ``params`` of :meth:`measure` hold DTensors or this rank's local shards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        radii: tuple[str, ...] | list[str] = ("output", "attention"),
        estimator: str = "fd",
        **kwargs: Any,
    ) -> None:
        if estimator == "jvp":
            if is_main_process():
                logger.warning(
                    "hf_ghosts: forward-mode AD does not pass through FSDP2's all-gathers; measuring with the "
                    "central finite-difference estimator ('fd', fd_step=%s) instead",
                    kwargs.get("fd_step", 1e-2),
                )
            estimator = "fd"
        super().__init__(model, radii, estimator, **kwargs)
        self._saved: dict[str, torch.Tensor] = {}
        self._fsdp_modules = [m for m in model.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
        wrong = sorted({str(p.dtype) for p in self.trainable.values() if p.dtype != self.dtype})
        if wrong:
            raise ValueError(
                f"ShardedRadiusProbe: the trainable parameters are {wrong}, the probe's dtype is {self.dtype}; the "
                "in-place finite-difference probe needs them equal (load the model in fp32 for FSDP2 training)"
            )

    def _locals(self) -> dict[str, torch.Tensor]:
        return {name: local_tensor(p.detach()) for name, p in self.trainable.items()}

    def _reshard(self) -> None:
        for module in self._fsdp_modules:
            module.reshard()

    def _direction_and_norm(self, direction: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's shards of the direction (probe dtype) and its norm over all shards."""
        self._check_direction(direction)
        pieces = {name: local_tensor(d.detach()).to(self.dtype) for name, d in direction.items()}
        norm = global_norm(list(pieces.values()), [self.trainable[name] for name in pieces])
        return pieces, self._checked_norm(float(norm))

    @contextlib.contextmanager
    def _intact(self) -> Iterator[None]:
        """This rank's shards saved for the measurement (no grad) and copied back afterwards, bit for bit.

        In between, every FSDP module all-gathers in the shards' own dtype (fp32) whatever its mixed-precision
        ``param_dtype`` (bf16/fp16 would round ``old +- h v`` back towards ``old``); the policy is restored on exit.
        """
        shards = self._locals()
        self._saved = {name: t.clone() for name, t in shards.items()}
        self._reshard()  # no unsharded (16-bit) parameter alive while the all-gather dtype switches
        with torch.no_grad(), compat.fsdp_full_precision(self._fsdp_modules):
            try:
                yield
            finally:
                torch._foreach_copy_(list(shards.values()), list(self._saved.values()))
                self._saved = {}
                self._reshard()

    def _weights(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The saved shards (not the live ones, which each forward overwrites), ``params`` where given."""
        weights = dict(self._saved)
        if params is not None:
            weights.update({name: local_tensor(t.detach()) for name, t in params.items()})
        return weights

    def _forward(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shards = self._locals()
        names = [name for name in weights if name in shards]
        self._reshard()
        torch._foreach_copy_([shards[name] for name in names], [weights[name] for name in names])
        kwargs = forward_kwargs(self.model, inputs)
        try:
            output = self.model(**kwargs)
        finally:
            self._reshard()
        return _logits_of(output, self.model)
