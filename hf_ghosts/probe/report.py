"""`RadiusReport`: the spreads one probe measured along a unit direction, and the radii they imply."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from hf_ghosts.radii import rho_bound
from hf_ghosts.settings import RADIUS_BY_NAME, RADIUS_TABLE, REPORT_FIELDS, Radius

__all__ = ["RadiusReport"]


@dataclass(frozen=True)
class RadiusReport:
    """Spreads measured along a unit direction, and the radii they imply.

    Each field has a kind (:data:`~hf_ghosts.settings.REPORT_FIELDS`) that says how it reduces across processes
    (:data:`~hf_ghosts.settings.REDUCTIONS`) and scales with the direction's length (:meth:`along_unit`): spreads
    (``out_spread``, ``attn_spread``) MAX, radii (``ffn_radius``, ``ffn_activation_radius``, ``out_radius``) MIN,
    ``output_tokens``, ``ffn_tokens`` and ``attention_tokens`` SUM, ``fd_step`` MIN, ``fd_error`` and ``fd_fallback`` MAX.

    Attributes:
        out_spread: scalar, max over valid positions of the logit-slope spread (0 if none).
        attn_spread: ``[layers, heads]``, max over batch and query rows of the score-slope spread.
        ffn_radius: scalar, the ``"ffn"`` radius (kink proxy quantile or activation-aware minimum, per ``ffn_mode``).
        output_tokens: scalar count of positions that entered ``out_spread``; with none, the output radius is NaN
            (:meth:`radius`): not measured, and not limiting.
        ffn_activation_radius: scalar, the ``"ffn_activation"`` radius (Appendix B, always activation-aware).
        out_radius: scalar, the ``radius="topk_exact"`` output radius (:func:`~hf_ghosts.radii.topk_radius`; at
            least ``pi / out_spread``); ``None`` with ``radius="bound"``.
        ffn_tokens: scalar count of positions the FFN radii were taken over; with none, ``ffn_radius`` and
            ``ffn_activation_radius`` hold inf (so that MIN across ranks ignores them) and :meth:`radius` gives NaN:
            not measured, and not limiting (:meth:`rho_of`).
        fd_step: scalar, the step ``h`` of fd's central differences (``None``: jvp).
        fd_error: scalar, the estimated relative error of fd's spreads at ``fd_step`` (from the last step check,
            :class:`~hf_ghosts.probe.fd.FdStepControl`).
        fd_fallback: scalar, 1 where fd could not reach 1% and the spreads were measured by JVP instead, else 0.
        attention_tokens: scalar count of the query positions ``attn_spread`` was taken over (the unmasked ones); with
            none, ``attn_spread`` holds 0 and the attention radii are NaN: not measured, and not limiting.
    """

    out_spread: torch.Tensor | None = None
    attn_spread: torch.Tensor | None = None
    ffn_radius: torch.Tensor | None = None
    output_tokens: torch.Tensor | None = None
    ffn_activation_radius: torch.Tensor | None = None
    out_radius: torch.Tensor | None = None
    ffn_tokens: torch.Tensor | None = None
    fd_step: torch.Tensor | None = None
    fd_error: torch.Tensor | None = None
    fd_fallback: torch.Tensor | None = None
    attention_tokens: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        """The device of the measured fields (cpu where none is set)."""
        value = next((getattr(self, name) for name in REPORT_FIELDS if getattr(self, name) is not None), None)
        return torch.device("cpu") if value is None else value.device

    @property
    def rho_out(self) -> torch.Tensor | None:
        """The output softmax radius: ``out_radius`` where measured, else ``pi / out_spread`` (eq. 14); NaN without
        valid positions (not measured)."""
        return self.radius(RADIUS_BY_NAME["output"])

    @property
    def rho_out_bound(self) -> torch.Tensor | None:
        """``pi / out_spread`` (Theorem 4.6), whatever ``radius`` the probe used."""
        return None if self.out_spread is None else rho_bound(self.out_spread)

    @property
    def rho_attn(self) -> torch.Tensor | None:
        """``pi / attn_spread``, a ``[layers, heads]`` tensor of per-head attention radii (NaN without a query
        position: not measured)."""
        return self.radius(RADIUS_BY_NAME["attention"])

    @property
    def rho_ffn(self) -> torch.Tensor | None:
        """The FFN radius (kink proxy or activation-aware), as measured (NaN: no position to measure it on)."""
        return self.radius(RADIUS_BY_NAME["ffn"])

    def radius(self, radius: Radius, unmeasured: float = math.nan) -> torch.Tensor | None:
        """The radius ``radius`` (a row of :data:`~hf_ghosts.settings.RADIUS_TABLE`) as measured: its exact field
        where set, else ``pi / spread`` or the radius itself, per element (``[layers, heads]`` for attention);
        ``unmeasured`` (NaN) where its ``tokens`` count is 0."""
        raw = getattr(self, radius.raw)
        if raw is None:
            return None
        exact = None if radius.exact is None else getattr(self, radius.exact)
        value = exact if exact is not None else rho_bound(raw) if radius.spread else raw
        tokens = None if radius.tokens is None else getattr(self, radius.tokens)
        return value if tokens is None else torch.where(tokens > 0, value, torch.full_like(value, unmeasured))

    @property
    def rho_ffn_activation(self) -> torch.Tensor | None:
        """The FFN activation radius (Appendix B), as measured (NaN: no position to measure it on)."""
        return self.radius(RADIUS_BY_NAME["ffn_activation"])

    def radii(self, unmeasured: float = math.nan) -> dict[str, torch.Tensor]:
        """Each measured radius as a scalar tensor (min over its elements; inf over none), by name
        (:data:`~hf_ghosts.settings.RADII`): ``{"output": ..., "attention": min over heads, "ffn": ..., ...}``;
        ``unmeasured`` (NaN) for a radius over no position (:meth:`unmeasured`)."""
        found: dict[str, torch.Tensor] = {}
        for radius in RADIUS_TABLE:
            value = self.radius(radius, unmeasured)
            if value is not None:
                found[radius.name] = value.amin() if value.numel() else torch.tensor(math.inf)
        return found

    def unmeasured(self) -> tuple[str, ...]:
        """The radii taken over no position (the output radius of a batch whose labels are all ``-100``, the
        attention and FFN radii of one without an unmasked token). Host syncs."""
        return tuple(
            radius.name for radius in RADIUS_TABLE
            if radius.tokens is not None and getattr(self, radius.raw) is not None
            and getattr(self, radius.tokens) is not None and int(getattr(self, radius.tokens)) == 0
        )

    def rho_of(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """The minimum of the radii ``names`` (default: all measured; one over no position counts as inf: it does
        not limit); inf for an empty ``names``."""
        radii = self.radii(unmeasured=math.inf)
        if not radii:
            raise ValueError("RadiusReport: no radius was measured")
        values = [radii[name] for name in (radii if names is None else names)]
        if not values:
            return torch.tensor(math.inf)
        return torch.stack([v.to(values[0].device, torch.float32) for v in values]).amin()

    def bottleneck_of(self, names: Sequence[str] | None = None) -> str:
        """Name of the least of the radii ``names`` (default: all measured); ``"none"`` if all are inf."""
        radii = self.radii(unmeasured=math.inf)
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

        The slopes are linear in the direction (``J d = |d| J v``): each field is multiplied by
        ``|d| ** length_power`` of its kind (:data:`~hf_ghosts.settings.REPORT_FIELDS`): spreads divide by ``|d|``,
        radii (lengths along the direction) multiply by it, counts and fd's numbers stay. On the device, no host sync.
        """

        def scaled(value: torch.Tensor, power: int) -> torch.Tensor:
            if power == 0:
                return value
            factor = length.to(value.device, value.dtype) if isinstance(length, torch.Tensor) else length
            return value / factor if power < 0 else value * factor

        return replace(self, **{
            name: None if getattr(self, name) is None else scaled(getattr(self, name), kind.length_power)
            for name, kind in REPORT_FIELDS.items()
        })
