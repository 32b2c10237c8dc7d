"""The block-wise step (``granularity="blocks"``, the clip's default): a clipped step keeps the part of the update
that is safe to take.

One global scale shortens the whole update ``u`` when any part of it bends a softmax; on a Llama at a too-high
learning rate the embeddings' part collapses the attention radius and the whole step shrinks 400x while the head,
where the progress is, sits well inside its radius (issue 30). The block step splits ``u = sum_b u_b`` by the kinds of
:data:`~hf_ghosts.architectures.BLOCK_KINDS` (embeddings; q/k; v/o; MLP; the layers' norms; the final norm; the head;
other) and, on a probed step whose proposed ``r(u)`` exceeds ``r*``:

1. ``decrease_b = -g . u_b`` with ``g`` the gradient the optimizer used (after the Trainer's gradient clipping;
   accumulated over micro-batches): the first-order loss decrease of each block's update;
2. the unit spreads of each moving block per softmax instance (:func:`~hf_ghosts.probe.blocks.block_spreads`),
   measured on every ``block_refresh``-th block step and reused in between (``D_bj = unit_bj * |u_b|``, ``|u_b|`` of
   this step);
3. scales ``s = block_allocation(decrease, max_j D_bj, pi r*)`` (blocks with ``decrease_b <= 0`` get 0), so that
   ``spread_bound(s, D) <= pi r*``;
4. ``w = sum_b s_b u_b`` is measured once more (the certificate) and ``old + c w`` applied with
   ``c = block_scale_up(r*, r(w), max_b s_b) = min(r* / r(w), 1 / max_b s_b)``: ``r(c w) <= r*`` as measured, and no
   block moves further than the optimizer proposed.

Where no block lowers the loss to first order, the step is the global clip's. Under FSDP2 each rank holds a piece of
every parameter: the blocks' sums are reduced over the shards (:func:`~hf_ghosts.distributed.shard_sum`) and each rank
scales its pieces. Pure math: :mod:`hf_ghosts.radii.step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from hf_ghosts.architectures import BLOCK_KINDS, parameter_block
from hf_ghosts.distributed import full_norm, local_offset, local_tensor, shard_sum
from hf_ghosts.metrics import StepRecord
from hf_ghosts.optimizers import scale_first_moments
from hf_ghosts.probe import RadiusProbe, RadiusReport
from hf_ghosts.probe.blocks import block_estimate, block_spreads
from hf_ghosts.radii import block_allocation, block_scale_up, normalized_step

__all__ = ["BlockOutcome", "BlockStep", "ParameterBlocks"]


@dataclass(frozen=True, eq=False)
class _Split:
    """A fused q/k/v parameter: the block of each slice along ``dim``, and the blocks it has a part in."""

    dim: int
    index: torch.Tensor
    members: tuple[int, ...]

    def along(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """``values`` per slice, shaped to broadcast against the parameter (``ndim`` dims)."""
        return values.reshape([-1 if d == self.dim else 1 for d in range(ndim)])


@dataclass(frozen=True, eq=False)
class ParameterBlocks:
    """The blocks of an update over the parameters ``names``: ``kinds`` (those with a parameter, in
    :data:`~hf_ghosts.architectures.BLOCK_KINDS` order) and per parameter its block (an index into ``kinds``, or for a
    fused q/k/v projection the block of each slice, :func:`~hf_ghosts.architectures.fused_qkv_split`). Every element
    of every parameter is in exactly one block: the pieces of ``u`` sum to ``u``. Under FSDP2 (DTensor parameters)
    the tensors it is handed are this rank's local pieces, and a fused projection's slices are those of its piece
    (:func:`~hf_ghosts.distributed.local_offset`)."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    where: tuple[int | _Split, ...]

    @classmethod
    def of(cls, model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> ParameterBlocks:
        """The blocks of ``model``'s parameters ``names`` (``params``, the tensors) by the table of its family."""
        placed = [parameter_block(name, tuple(p.shape), model) for name, p in zip(names, params, strict=True)]
        present = {kind for at in placed for kind in ((at,) if isinstance(at, str) else ("qk", "vo"))}
        kinds = tuple(kind for kind in BLOCK_KINDS if kind in present)
        index = {kind: i for i, kind in enumerate(kinds)}
        where: list[int | _Split] = []
        for at, p in zip(placed, params, strict=True):
            if isinstance(at, str):
                where.append(index[at])
            else:
                dim, is_qk = at
                start = local_offset(p)[dim]
                is_qk = is_qk[start : start + local_tensor(p).shape[dim]]  # this rank's slices (all of them unsharded)
                slices = torch.where(is_qk, index["qk"], index["vo"]).to(p.device)
                where.append(_Split(dim, slices, (index["qk"], index["vo"])))
        return cls(tuple(names), kinds, tuple(where))

    def pieces(self, update: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """``u_b`` per block, ``{name: tensor}`` (a whole parameter's tensor itself; a fused one's part, masked)."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in self.kinds]
        for name, u, at in zip(self.names, update, self.where, strict=True):
            if isinstance(at, int):
                out[at][name] = u
            else:
                for b in at.members:
                    out[b][name] = u * at.along(at.index == b, u.dim()).to(u.dtype)
        return out

    def sums(self, products: Sequence[torch.Tensor], only: Sequence[int] | None = None) -> torch.Tensor:
        """``[blocks]`` float64: the sum of each block's elements of ``products`` (one tensor per parameter, e.g.
        ``g * u`` for ``g . u_b``), over the parameters ``only`` (indices; default all). On the device, no host sync."""
        indices = range(len(products)) if only is None else only
        device = products[0].device if products else None
        total = torch.zeros(len(self.kinds), dtype=torch.float64, device=device)
        for i in indices:
            product, at = products[i], self.where[i]
            if isinstance(at, int):
                total[at] += product.sum(dtype=torch.float64)
            else:
                others = [d for d in range(product.dim()) if d != at.dim]
                per_slice = product.sum(dim=others, dtype=torch.float64) if others else product.double()
                total.index_add_(0, at.index, per_slice)
        return total

    def coefficients(self, scales: torch.Tensor, update: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per parameter, the scale ``s_b`` of each of its elements, in the dtype and on the device of ``update``'s
        tensor (0-dim for a whole parameter, broadcastable for a fused one): ``w = sum_b s_b u_b = u * coefficient``."""
        out = []
        for u, at in zip(update, self.where, strict=True):
            if isinstance(at, int):
                out.append(scales[at].to(u.device, u.dtype))
            else:
                out.append(at.along(scales.to(at.index.device)[at.index], u.dim()).to(u.device, u.dtype))
        return out

    def combine(self, update: Sequence[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor]:
        """``w = sum_b s_b u_b``, one tensor per parameter."""
        return torch._foreach_mul(list(update), self.coefficients(scales, update))


@dataclass(frozen=True)
class BlockOutcome:
    """A block step: ``kept = |applied| / |u|``, ``r_applied = c r(w)`` (measured), the probes it took (blocks and
    ``w``), the applied scale ``c s_b`` per block kind; ``skipped``: what was non-finite (nothing applied)."""

    kept: float = 1.0
    r_applied: float = 0.0
    probes: int = 0
    scales: Mapping[str, float] | None = None
    skipped: str | None = None

    def record(self, record: StepRecord) -> StepRecord:
        """``record`` (the step as the global clip would have taken it) as taken block-wise."""
        return replace(record, scale=self.kept, r_applied=self.r_applied, block_probes=self.probes, block_scales=self.scales)


class BlockStep:
    """The block step of one model's trainable parameters (module docstring); its state: the cached unit spreads per
    block and the count of block steps since they were measured (saved with the controller).

    Args:
        model: the model the probe measures (its family's :data:`~hf_ghosts.architectures.BLOCK_NAMES`).
        names, params: the trainable parameters, in the controller's order.
        refresh: measure the block spreads on every ``refresh``-th block step (``block_refresh``).
        rescale_moments: scale Adam's first moment by each element's applied scale (``rescale_moments``).
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor], refresh: int,
                 rescale_moments: bool = False) -> None:
        self.blocks = ParameterBlocks.of(model, names, params)
        self.params, self.refresh, self.rescale_moments = list(params), refresh, rescale_moments
        self.reset()

    def reset(self) -> None:
        """No unit spreads cached: the next block step measures every moving block."""
        self.unit: torch.Tensor | None = None  # [blocks, instances], float64
        self.measured: list[bool] = [False] * len(self.blocks.kinds)
        self.since_refresh = 0

    @torch.no_grad()
    def step(
        self, probe: RadiusProbe, batch: Mapping[str, torch.Tensor], old: Sequence[torch.Tensor],
        current: Sequence[torch.Tensor], update: Sequence[torch.Tensor], norm: float, target: float,
        radii: Sequence[str], *, reduce: Callable[[RadiusReport], RadiusReport], optimizer: Any = None,
    ) -> BlockOutcome | None:
        """Take the clipped step ``update = current - old`` (``|u| = norm``, proposed ``r(u) > r* = target``) block-wise
        into ``current``; ``None`` where no block lowers the loss to first order (the caller applies its global scale).
        ``reduce`` agrees each report across processes, ``radii`` are the limiting ones."""
        grads = [torch.zeros_like(u) if p.grad is None else local_tensor(p.grad.detach())
                 for p, u in zip(self.params, update, strict=True)]
        products = torch._foreach_mul(update, update), torch._foreach_mul(grads, update)
        local = lambda only: torch.stack([self.blocks.sums(p, only) for p in products])  # noqa: E731
        squares, dots = shard_sum(local, self.params)  # host sync: |u_b|^2 and g . u_b, over all shards
        norms, decrease = squares.sqrt(), -dots
        if not bool(torch.isfinite(decrease).all() and torch.isfinite(norms).all()):
            return BlockOutcome(skipped="update")
        if not bool((decrease > 0).any()):
            return None
        estimator, fd_step = block_estimate(probe)
        at = dict(zip(self.blocks.names, old, strict=True))
        probes = self._refresh(probe, batch, update, norms, at, radii, estimator, fd_step, reduce)
        if not bool(torch.isfinite(self.unit).all()):
            return BlockOutcome(skipped="radius")
        scales = self.allocate(decrease, self.unit.cpu() * norms[:, None], math.pi * target)
        w, w_norm, rho = self._measure_combined(probe, batch, at, update, scales, radii, estimator, fd_step, reduce)
        if math.isnan(rho):
            return BlockOutcome(skipped="radius")
        r_w = float(normalized_step(w_norm, rho))
        c = block_scale_up(target, r_w, float(scales.max()))
        for now, before, step in zip(current, old, w, strict=True):
            torch.add(before, step, alpha=c, out=now)
        if self.rescale_moments and optimizer is not None:
            scale_first_moments(optimizer, self.params, torch._foreach_mul(self.blocks.coefficients(scales, update), c))
        kept = c * w_norm / norm
        return BlockOutcome(kept, c * r_w, probes + 1, {k: c * float(s) for k, s in zip(self.blocks.kinds, scales, strict=True)})

    def allocate(self, decrease: torch.Tensor, spreads: torch.Tensor, budget: float) -> torch.Tensor:
        """The scales ``s`` (``[blocks]``, float64) of a block step from each block's ``decrease_b = -g . u_b`` and
        spreads ``D_bj`` (``[blocks, instances]``) at ``budget = pi r*``: :func:`~hf_ghosts.radii.block_allocation` on
        each block's largest spread ``max_j D_bj``, so that ``spread_bound(s, D) <= budget``. The one place the rule is
        chosen (``benchmarks/block_study.py`` overrides it to compare rules)."""
        cost = spreads.amax(1) if spreads.shape[1] else torch.zeros_like(decrease)
        return block_allocation(decrease, cost, budget)

    def _measure_combined(
        self, probe: RadiusProbe, batch: Mapping[str, torch.Tensor], at: Mapping[str, torch.Tensor],
        update: Sequence[torch.Tensor], scales: torch.Tensor, radii: Sequence[str], estimator: str,
        fd_step: float | None, reduce: Callable[[RadiusReport], RadiusReport],
    ) -> tuple[list[torch.Tensor], float, float]:
        """``w = sum_b s_b u_b``, ``|w|`` and the binding radius along ``w`` at the old weights ``at``: one probe, its
        report agreed across processes by ``reduce``."""
        w = self.blocks.combine(update, scales)
        w_norm = float(full_norm(w, self.params))  # host sync; over all shards under FSDP2
        report = reduce(probe.measure_with(batch, dict(zip(self.blocks.names, w, strict=True)), at, estimator=estimator,
                                           fd_step=fd_step, norm=w_norm))
        return w, w_norm, float(report.rho_of(radii))  # host sync

    def _refresh(
        self, probe: RadiusProbe, batch: Mapping[str, torch.Tensor], update: Sequence[torch.Tensor], norms: torch.Tensor,
        at: Mapping[str, torch.Tensor], radii: Sequence[str], estimator: str, fd_step: float | None,
        reduce: Callable[[RadiusReport], RadiusReport],
    ) -> int:
        """Measure the blocks' unit spreads where due (every ``refresh``-th block step, or a moving block never
        measured); the number of probes taken."""
        moving = [n > 0 for n in norms.tolist()]
        unknown = any(m and not seen for m, seen in zip(moving, self.measured, strict=True))
        if self.unit is not None and self.since_refresh + 1 < self.refresh and not unknown:
            self.since_refresh += 1
            return 0
        pieces = self.blocks.pieces(update)
        self.unit, self.measured = block_spreads(probe, batch, pieces, norms.tolist(), at, radii=radii,
                                                 estimator=estimator, fd_step=fd_step, reduce=reduce)
        self.since_refresh = 0
        return sum(self.measured)

    def state_dict(self) -> dict[str, Any]:
        """The cached unit spreads and the refresh count, JSON-ready."""
        unit = None if self.unit is None else self.unit.cpu().tolist()
        return {"unit": unit, "measured": list(self.measured), "since_refresh": self.since_refresh}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.unit = None if state["unit"] is None else torch.tensor(state["unit"], dtype=torch.float64)
        self.measured, self.since_refresh = [bool(m) for m in state["measured"]], int(state["since_refresh"])
