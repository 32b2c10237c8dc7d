"""`RadiusReport`: the spreads one probe measured along a unit direction, and the radii they imply."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from hf_ghosts.radii import rho_bound
from hf_ghosts.settings import RADIUS_TABLE, REDUCTIONS, Radius

__all__ = ["RadiusReport"]



@dataclass(frozen=True)
class RadiusReport:
    """Spreads measured along a unit direction, and the radii they imply.

    The raw fields reduce across processes as :data:`~hf_ghosts.settings.REDUCTIONS` says: spreads (``out_spread``, ``attn_spread``) with
    MAX, radii (``ffn_radius``, ``ffn_activation_radius``, ``out_radius``) with MIN, ``output_tokens`` with SUM.

    Attributes:
        out_spread: scalar, max over valid positions of the logit-slope spread (0 if none).
        attn_spread: ``[layers, heads]``, max over batch and query rows of the score-slope spread.
        ffn_radius: scalar, the ``"ffn"`` radius (kink proxy quantile or activation-aware minimum, per ``ffn_mode``).
        output_tokens: scalar count of positions that entered ``out_spread``.
        ffn_activation_radius: scalar, the ``"ffn_activation"`` radius (Appendix B, always activation-aware).
        out_radius: scalar, the ``radius="topk_exact"`` output radius (:func:`~hf_ghosts.radii.topk_radius`; at
            least ``pi / out_spread``); ``None`` with ``radius="bound"``.
    """

    out_spread: torch.Tensor | None = None
    attn_spread: torch.Tensor | None = None
    ffn_radius: torch.Tensor | None = None
    output_tokens: torch.Tensor | None = None
    ffn_activation_radius: torch.Tensor | None = None
    out_radius: torch.Tensor | None = None

    @property
    def rho_out(self) -> torch.Tensor | None:
        """The output softmax radius: ``out_radius`` where measured, else ``pi / out_spread`` (eq. 14); inf without
        valid positions."""
        return self.out_radius if self.out_radius is not None else self.rho_out_bound

    @property
    def rho_out_bound(self) -> torch.Tensor | None:
        """``pi / out_spread`` (Theorem 4.6), whatever ``radius`` the probe used."""
        return None if self.out_spread is None else rho_bound(self.out_spread)

    @property
    def rho_attn(self) -> torch.Tensor | None:
        """``pi / attn_spread``, a ``[layers, heads]`` tensor of per-head attention radii."""
        return None if self.attn_spread is None else rho_bound(self.attn_spread)

    @property
    def rho_ffn(self) -> torch.Tensor | None:
        """The FFN radius (kink proxy or activation-aware), as measured."""
        return self.ffn_radius

    def radius(self, radius: Radius) -> torch.Tensor | None:
        """The radius ``radius`` (a row of :data:`~hf_ghosts.settings.RADIUS_TABLE`) as measured: its exact field
        where set, else ``pi / spread`` or the radius itself, per element (``[layers, heads]`` for attention)."""
        raw = getattr(self, radius.raw)
        if raw is None:
            return None
        exact = None if radius.exact is None else getattr(self, radius.exact)
        if exact is not None:
            return exact
        return rho_bound(raw) if radius.spread else raw

    @property
    def rho_ffn_activation(self) -> torch.Tensor | None:
        """The FFN activation radius (Appendix B), as measured."""
        return self.ffn_activation_radius

    def radii(self) -> dict[str, torch.Tensor]:
        """Each measured radius as a scalar tensor (min over its elements; inf over none), by name
        (:data:`~hf_ghosts.settings.RADII`): ``{"output": ..., "attention": min over heads, "ffn": ..., ...}``."""
        found: dict[str, torch.Tensor] = {}
        for radius in RADIUS_TABLE:
            value = self.radius(radius)
            if value is not None:
                found[radius.name] = value.amin() if value.numel() else torch.tensor(math.inf)
        return found

    def rho_of(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """The minimum of the radii ``names`` (default: all measured); inf for an empty ``names``."""
        radii = self.radii()
        if not radii:
            raise ValueError("RadiusReport: no radius was measured")
        values = [radii[name] for name in (radii if names is None else names)]
        if not values:
            return torch.tensor(math.inf)
        return torch.stack([v.to(values[0].device, torch.float32) for v in values]).amin()

    def bottleneck_of(self, names: Sequence[str] | None = None) -> str:
        """Name of the least of the radii ``names`` (default: all measured); ``"none"`` if all are inf."""
        radii = self.radii()
        chosen = [(name, float(radii[name])) for name in (radii if names is None else names)]
        if not chosen:
            return "none"
        name, value = min(chosen, key=lambda item: item[1])
        return name if math.isfinite(value) else "none"

    @property
    def rho(self) -> torch.Tensor:
        """The least of the radii measured (the binding one when all of them limit)."""
        return self.rho_of()

    @property
    def bottleneck(self) -> str:
        """Name of the least radius measured (``"output"``, ``"attention"``, ...); ``"none"`` if all are inf."""
        return self.bottleneck_of()

    def along_unit(self, length: float | torch.Tensor) -> RadiusReport:
        """The report along ``v = d / |d|`` from one measured along ``d`` itself, ``length = |d|``.

        The slopes are linear in the direction (``J d = |d| J v``): spreads divide by ``|d|``, radii (lengths along
        the direction) multiply by it, counts stay. On the device, no host sync.
        """

        def scaled(value: torch.Tensor, power: int) -> torch.Tensor:
            factor = length.to(value.device, value.dtype) if isinstance(length, torch.Tensor) else length
            return value / factor if power < 0 else value * factor

        return self.map(lambda s: scaled(s, -1), lambda r: scaled(r, 1), lambda n: n)

    def map(self, fn_max, fn_min, fn_sum) -> RadiusReport:
        """Apply reductions field-wise as :data:`~hf_ghosts.settings.REDUCTIONS` says (MAX to spreads, MIN to radii, SUM to counts)."""
        reduce = {"max": fn_max, "min": fn_min, "sum": fn_sum}
        return replace(self, **{
            name: None if getattr(self, name) is None else reduce[how](getattr(self, name)) for name, how in REDUCTIONS.items()
        })
