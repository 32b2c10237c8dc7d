"""`ShardedRadiusProbe`: the probe of an FSDP2 (``fully_shard``) model, central finite differences in place.

Why ``fd`` under FSDP2: FSDP2 all-gathers the shards in module hooks and swaps the parameters
it registers, so neither ``functional_call`` with dual tensors (``NotImplementedError: Operator
aten._has_same_storage_numel.default does not have a sharding strategy registered``) nor with
plain ones (``aten.embedding.default got mixed torch.Tensor and DTensor``) reaches the forward.
:class:`ShardedRadiusProbe` writes ``old +- h v`` into the local shards in place, runs the
sharded model's own forward (which all-gathers what was written), and copies the saved shards
back, bit for bit. The backends and the reductions across ranks are :mod:`hf_ghosts.distributed`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from hf_ghosts import compat
from hf_ghosts.distributed import FSDPModule, global_norm, local_tensor, max_over_ranks
from hf_ghosts.probe.inputs import forward_kwargs, logits_of
from hf_ghosts.probe.radius_probe import RadiusProbe, check_direction, checked_norm, probe_settings
from hf_ghosts.settings import DEFAULT_RADII, RhoSettings

__all__ = ["ShardedRadiusProbe"]



class ShardedRadiusProbe(RadiusProbe):
    """:class:`~hf_ghosts.probe.RadiusProbe` for an FSDP2 (``fully_shard``) model: central finite differences in place.

    Each forward writes ``old +- h v`` (``v`` the unit direction, its norm taken over all shards)
    into this rank's shards, runs the model's own forward (FSDP2 all-gathers what was written),
    and reshards every FSDP module before and after, so no forward reuses unsharded parameters
    gathered earlier (``reshard_after_forward=False`` would keep them). Each measurement saves the
    shards first, moves from those copies and copies them back afterwards: the model is left
    bit-identical. All ranks must call :meth:`measure` (or :meth:`measure_with`, :meth:`logit_slopes`) together
    (collectives inside); its report is this rank's, to be reduced with
    :func:`~hf_ghosts.distributed.all_reduce_report`.

    Args: as :class:`~hf_ghosts.probe.RadiusProbe`; ``estimator="jvp"`` is replaced by ``"fd"``
    (logged once), and the (sharded) parameters must be ``dtype`` (fp32). A bf16/fp16 ``MixedPrecisionPolicy``
    is fine: the probe's forwards all-gather in fp32 (:func:`hf_ghosts.compat.fsdp_full_precision`), training's
    in the policy's dtype. ``direction``
    and ``params`` of :meth:`measure` hold DTensors or this rank's local shards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        radii: tuple[str, ...] | list[str] | str = DEFAULT_RADII,
        estimator: str = "fd",
        *,
        dtype: torch.dtype | str = torch.float32,
        settings: RhoSettings | None = None,
        **keywords: Any,
    ) -> None:
        settings, model_keywords = probe_settings(type(self).__name__, settings, radii, estimator, dtype, keywords)
        # FSDP2 means the fp32 fd probe: decided by RhoSettings.resolved, as for the controller ("jvp" is logged)
        super().__init__(model, settings=settings.resolved(torch.float32, "cpu", sharded=True), **model_keywords)
        self._saved: dict[str, torch.Tensor] = {}
        self._fsdp_modules = [m for m in model.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
        wrong = sorted({str(p.dtype) for p in self.trainable.values() if p.dtype != self.dtype})
        if wrong:
            raise ValueError(
                f"ShardedRadiusProbe: the trainable parameters are {wrong}, the probe's dtype is {self.dtype}; the "
                "in-place finite-difference probe needs them equal (load the model in fp32 for FSDP2 training)"
            )

    forward_ad = False  # fd only: where its error exceeds the limit, the report says so (hf_ghosts.probe.fd)

    def _agree(self, value: float) -> float:
        """The step control's numbers, the same on every rank (its forwards are collective): MAX over ranks."""
        return max_over_ranks(value)

    def _locals(self) -> dict[str, torch.Tensor]:
        return {name: local_tensor(p.detach()) for name, p in self.trainable.items()}

    def _reshard(self) -> None:
        for module in self._fsdp_modules:
            module.reshard()

    def _direction_and_norm(
        self, direction: Mapping[str, torch.Tensor], norm: float | torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's shards of the direction (probe dtype) and its norm over all shards (``norm``: as given)."""
        check_direction(type(self).__name__, direction, self.trainable)
        pieces = {name: local_tensor(d.detach()).to(self.dtype) for name, d in direction.items()}
        if norm is None:
            norm = global_norm(list(pieces.values()), [self.trainable[name] for name in pieces])
        return pieces, checked_norm(type(self).__name__, float(norm))

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
        return logits_of(output, self.model)
