"""The FFN hooks: which pre-activation modules the FFN radii are taken over, and what one measurement records there.

:class:`FfnTargets` resolves, once per probe, the FFN radii asked for and their modules
(:data:`~hf_ghosts.architectures.ARCHITECTURES` or an ``ffn_spec``); :class:`FfnRecorder` is one measurement's
forward hooks on them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from hf_ghosts.architectures import FfnSpec, find_ffn_modules, resolve_ffn_activation, resolve_ffn_spec
from hf_ghosts.probe.attention import Pass
from hf_ghosts.radii import activation_radius
from hf_ghosts.settings import RhoSettings

__all__ = ["FfnRecorder", "FfnTargets"]


class FfnRecorder:
    """One measurement's forward hooks on the FFN pre-activation modules: what the FFN radius is taken over.

    Per module output ``z`` (real tokens only) with slope ``z'``, for each form in ``forms``: ``"kink"`` keeps
    every ``|z| / |z'|`` (inf where ``z' = 0``) and ``radius("kink")`` is their ``quantile``; ``"activation"``
    keeps each module's minimum of :func:`~hf_ghosts.radii.activation_radius` and ``radius("activation")`` is
    the smallest. Both forms come from the same ``z`` and ``z'`` (one probe).
    ``Pass.JVP`` reads ``z'`` from the output's tangent; ``Pass.FD_PLUS`` stores ``z+``, and ``Pass.FD_MINUS``
    forms ``z' = (z+ - z-) / 2h`` and ``z = (z+ + z-) / 2``. :meth:`tokens` counts the positions recorded: with
    none (no unmasked token) the radii are inf, and the report calls them not measured.
    """

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        forms: Sequence[str],
        quantile: float,
        activation: str | None,
        fd_step: float | None,
    ) -> None:
        self.modules, self.forms, self.quantile, self.activation = modules, tuple(forms), quantile, activation
        self.fd_step = fd_step
        self.token_mask: torch.Tensor | None = None
        self.current = Pass.JVP
        self.values: dict[str, list[torch.Tensor]] = {form: [] for form in self.forms}
        self._plus: dict[str, torch.Tensor] = {}
        self.positions = 0  # the most real-token positions one module's output had

    @contextlib.contextmanager
    def attached(self, token_mask: torch.Tensor | None, current: Pass) -> Iterator[FfnRecorder]:
        """The hooks, for the block: ``token_mask`` marks real tokens, ``current`` is the first forward."""
        self.token_mask, self.current = token_mask, current
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[[torch.nn.Module, tuple, torch.Tensor], None]:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            primal, tangent = fwAD.unpack_dual(output)
            if self.current == Pass.FD_PLUS:
                self._plus[name] = primal.detach()
                return
            if self.current == Pass.FD_MINUS:
                plus = self._plus.pop(name)
                primal, tangent = (plus + primal) / 2, (plus - primal) / (2 * self.fd_step)
            self._add(primal, torch.zeros_like(primal) if tangent is None else tangent)

        return hook

    def _add(self, primal: torch.Tensor, tangent: torch.Tensor) -> None:
        primal, tangent = primal.float(), tangent.float()
        if self.token_mask is not None and self.token_mask.shape == primal.shape[:2]:
            keep = self.token_mask.bool()
            primal, tangent = primal[keep], tangent[keep]
        self.positions = max(self.positions, primal.shape[:-1].numel())
        if "activation" in self.values:
            least = activation_radius(primal, tangent, self.activation).amin() if primal.numel() else primal.new_full((), math.inf)
            self.values["activation"].append(least.reshape(1))
        if "kink" in self.values:
            magnitude = tangent.abs()
            ratio = torch.where(magnitude > 0, primal.abs() / magnitude, torch.full_like(magnitude, math.inf))
            self.values["kink"].append(ratio.reshape(-1))

    def tokens(self, device: torch.device | None = None) -> torch.Tensor:
        """The number of real-token positions the radii were taken over (0: not measured)."""
        return torch.tensor(self.positions, device=device)

    def radius(self, form: str) -> torch.Tensor:
        """``activation``: the least radius; ``kink``: the ``ceil(quantile n)``-th smallest ratio, inf if none (see
        :meth:`tokens`)."""
        if not self.values[form]:  # no module ran
            return torch.tensor(math.inf)
        values = torch.cat(self.values[form])
        if form == "activation":
            return values.amin()
        if values.numel() == 0:
            return torch.tensor(math.inf, device=values.device)
        return values.kthvalue(max(1, math.ceil(self.quantile * values.numel()))).values


@dataclass(frozen=True)
class FfnTargets:
    """The FFN radii to record, ``{"ffn": ffn_mode's form, "ffn_activation": "activation"}`` (those in ``radii``),
    the pre-activation modules they are taken over and the activation (for the ``"activation"`` form)."""

    forms: dict[str, str]
    modules: dict[str, torch.nn.Module]
    activation: str | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, settings: RhoSettings, ffn_spec: FfnSpec | None) -> FfnTargets:
        """Resolved for ``model`` (``ffn_spec``, else :data:`~hf_ghosts.architectures.ARCHITECTURES`); an error says
        how ``settings``' caller passes ``ffn_spec`` (:meth:`~hf_ghosts.settings.RhoSettings.probe_keyword`)."""
        measured = settings.measured
        forms = {name: form for name, form in (("ffn", settings.ffn_mode), ("ffn_activation", "activation"))
                 if name in measured}
        if not forms:
            return cls(forms, {})
        spelled, taker = settings.probe_keyword("ffn_spec")
        route = f"`{spelled}=...` to {taker}"
        held = [settings.name(key) for key in ("radii", "watch_radii") if set(forms) & set(getattr(settings, key))]
        drop = f"{', '.join(map(repr, forms))} from {' and '.join(held)}"
        spec = resolve_ffn_spec(model, ffn_spec, route=route, drop=drop)
        modules = find_ffn_modules(model, spec, route)
        activation = resolve_ffn_activation(model, spec) if "activation" in forms.values() else None
        return cls(forms, modules, activation)

    def recorder(self, quantile: float, fd_step: float | None) -> FfnRecorder:
        """A fresh :class:`FfnRecorder` over the modules, each distinct form once (``fd_step``: the step of central
        differences; ``None``: a jvp)."""
        return FfnRecorder(self.modules, tuple(dict.fromkeys(self.forms.values())), quantile, self.activation, fd_step)
