"""The probe's two measuring paths, ``jvp`` and ``fd``, and what one measurement holds while they run.

A measurement runs in :func:`probe_mode` (eval, fp32 eager forward, ghosts attention, eager MoE experts) with a
:class:`Session` (the attention capture, the FFN recorder, the head's inputs). :func:`jvp_spreads` takes the
logit slopes ``a = J v`` from one forward-mode pass at ``theta + v eps``; the ``fd`` path (central differences, its rounding
guard and its step control) is :mod:`hf_ghosts.probe.fd`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD

from hf_ghosts import compat
from hf_ghosts.architectures import _model_type, attention_blocker, base_model_of
from hf_ghosts.probe.attention import ATTENTION_NAME, Pass, ScoreCapture
from hf_ghosts.probe.ffn import FfnRecorder
from hf_ghosts.probe.head import LinearHead, full_rows, jvp_head_rows, jvp_spread
from hf_ghosts.probe.norm_jvp import fused_norm_jvps
from hf_ghosts.radii import spread

__all__ = [
    "Session",
    "Tensors",
    "attention_spread",
    "dual_weights",
    "full_logit_slopes",
    "jvp_spreads",
    "needs_eager_experts",
    "probe_mode",
    "routes_through_ghosts",
    "shifted_weights",
    "tangent_of",
]

Tensors = Mapping[str, torch.Tensor]  # a batch, weights or a direction, by name


@dataclass
class Session:
    """What one measurement records: the attention capture, the FFN recorder, the inputs the head was reached with."""

    capture: ScoreCapture
    ffn: FfnRecorder | None = None
    head_inputs: list[torch.Tensor] = field(default_factory=list)
    # flat position indices -> (logits, slopes) rows ``[k, classes]`` at those positions, kept only when wanted
    # (radius="topk_exact"): otherwise nothing holds on to the logits past the spreads
    wants_rows: bool = False
    rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    wider_step: float | None = None  # fd: a wider h to measure once more at (fd_wider_step)

    @classmethod
    def start(cls, first: Pass, token_mask: torch.Tensor | None, fd_step: float | None, *, record: bool) -> Session:
        """A session whose first forward is ``first`` (central differences: at the step ``fd_step``; ``None``: a
        jvp); the attention capture reads real queries off ``token_mask``."""
        query_mask = None if token_mask is None else token_mask.bool()
        return cls(ScoreCapture(first, query_mask, fd_step, record=record))

    def offer_rows(self, rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep ``rows`` (lazy: nothing is computed until called) where the top-k radius wants them."""
        if self.wants_rows:
            self.rows = rows

    def begin(self, current: Pass) -> None:
        """Start the forward ``current`` in every recorder."""
        self.capture.begin(current)
        if self.ffn is not None:
            self.ffn.current = current


@contextlib.contextmanager
def probe_mode(
    model: torch.nn.Module, ghosts: bool, eager_experts: bool = False, fused_norms: bool = False
) -> Iterator[None]:
    """Eval mode, fp32 forward without Accelerate's autocast wrapper, not through ``model.compile()``'s compiled
    call, ghosts attention (if ``ghosts``), eager MoE experts (if ``eager_experts``), norm tangents in closed form
    (if ``fused_norms``: :func:`~hf_ghosts.probe.norm_jvp.fused_norm_jvps`); all restored."""
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        device_type = next(model.parameters()).device.type
        base = base_model_of(model)
        switch = compat.attention_implementation(base, ATTENTION_NAME) if ghosts else contextlib.nullcontext()
        experts = compat.experts_implementation(base, "eager") if eager_experts else contextlib.nullcontext()
        norms = fused_norm_jvps(model) if fused_norms else contextlib.nullcontext()
        # model.compile() in place: forward AD fails in inductor's out= kernels
        with compat.without_autocast_wrapper(model), compat.without_compiled_call(model):
            with switch, experts, norms, torch.no_grad(), torch.autocast(device_type, enabled=False):
                yield
    finally:
        for module, flag in training.items():
            module.training = flag


def routes_through_ghosts(model: torch.nn.Module, radii: tuple[str, ...], estimator: str) -> bool:
    """Whether the forward runs the ghosts attention: to measure attention, and for a JVP through sdpa or flash
    (no forward-mode AD). Ghosts, not plain eager: it outputs 0 for a query with no allowed key (left padding)
    as sdpa does, so the probe's logits equal the training forward's."""
    if "attention" in radii:
        return True
    no_forward_ad = compat.attention_implementation_of(base_model_of(model)) not in (None, "eager")
    return estimator == "jvp" and no_forward_ad and attention_blocker(model) is None


def needs_eager_experts(model: torch.nn.Module, estimator: str) -> bool:
    """MoE experts dispatched to ``_grouped_mm`` (no forward-mode AD): a JVP runs them eagerly (same math)."""
    return estimator == "jvp" and compat.experts_implementation_of(base_model_of(model)) not in (None, "eager")


def tangent_of(dual: torch.Tensor) -> torch.Tensor:
    primal, tangent = fwAD.unpack_dual(dual)
    return torch.zeros_like(primal) if tangent is None else tangent


def dual_weights(weights: Tensors, unit: Tensors) -> dict[str, torch.Tensor]:
    """``theta + v eps``: dual tensors where ``unit`` has a tangent (inside ``fwAD.dual_level()``)."""
    return {name: fwAD.make_dual(w, unit[name]) if name in unit else w for name, w in weights.items()}


def shifted_weights(weights: Tensors, direction: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """``theta + scale * d`` (``theta +- h v`` with ``scale = +- h / |d|``: no copy of ``v``)."""
    return {name: torch.add(w, direction[name], alpha=scale) if name in direction else w for name, w in weights.items()}


def attention_spread(capture: ScoreCapture, model: torch.nn.Module) -> torch.Tensor:
    """The captured per-head score spreads, ``[layers, heads]`` in layer order; an error if none were captured."""
    if not capture.spreads:
        model_type = _model_type(model) or type(model).__name__
        raise ValueError(
            f"No attention call of model_type {model_type!r} went through the ghosts attention; "
            "its attention cannot be measured. Pass radii=('output',)"
        )
    return torch.stack([capture.spreads[layer] for layer in sorted(capture.spreads)])


def jvp_spreads(
    run: Callable[[Tensors], torch.Tensor | None], session: Session, weights: Tensors, tangent: Tensors,
    *, output: bool, linear_head: LinearHead | None, chunk: int,
) -> torch.Tensor | None:
    """Per position, the spread of the logit slopes ``J d`` along ``d`` (``tangent``, not normalized: ``J`` is
    linear, the caller divides by ``|d|``): one forward-mode pass.

    Args:
        run: ``weights -> logits`` of the batch (``None``: stopped at the head, whose input is in ``session``).
        session: the measurement's recorders; tangent: the direction ``d`` the weights move along.
        output: whether the output radius is measured (``False``: the forward only records; ``None`` returned).
        linear_head: the chunked head (``None``: the full head ran); chunk: its classes per block.
    """
    with fwAD.dual_level():
        logits = run(dual_weights(weights, tangent))
        if not output:
            return None
        if linear_head is None:
            primal, slopes = fwAD.unpack_dual(logits).primal, tangent_of(logits)
            session.offer_rows(full_rows(slopes, primal))
            return spread(slopes.float(), dim=-1)
        hidden, hidden_slope = fwAD.unpack_dual(session.head_inputs[0])
        weight, weight_slope, bias, bias_slope = linear_head.tensors(weights, tangent)
        session.offer_rows(jvp_head_rows(hidden, hidden_slope, weight, weight_slope, bias, bias_slope))
        return jvp_spread(hidden, hidden_slope, weight, weight_slope, bias_slope, chunk=chunk)


def full_logit_slopes(
    forward: Callable[[Tensors], torch.Tensor], weights: Tensors, pieces: Tensors, norm: float, *, estimator: str,
    fd_step: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full head's logits ``z`` and slopes ``a`` along ``v = d / |d|``: ``jvp``: ``a = J v`` (one forward-mode
    pass); ``fd``: ``a = (z(theta + h v) - z(theta - h v)) / 2h`` and a third forward for ``z``.

    Args:
        forward: ``weights -> logits`` of the batch; pieces: the direction ``d``; norm: ``|d|``; fd_step: ``h``.
    """
    if estimator == "jvp":
        with fwAD.dual_level():
            logits = forward(dual_weights(weights, {n: d / norm for n, d in pieces.items()}))
            return fwAD.unpack_dual(logits).primal, tangent_of(logits)
    logits = forward(weights)
    plus = forward(shifted_weights(weights, pieces, fd_step / norm))
    minus = forward(shifted_weights(weights, pieces, -fd_step / norm))
    return logits, (plus - minus) / (2 * fd_step)
