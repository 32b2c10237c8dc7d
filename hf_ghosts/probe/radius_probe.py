"""`RadiusProbe`: measure the convergence radii of a model along a parameter-space direction.

One forward-mode JVP (or two forwards for central finite differences) at given weights along a
unit direction ``v`` yields the slopes of the logits, of every head's attention scores and of the
FFN pre-activations; :mod:`hf_ghosts.radii` turns them into radii. The model is left exactly as
found: same weights, same train/eval flags, same attention implementation, no gradients touched.

For a causal LM whose logits are ``lm_head(x)`` of a plain linear head
(:data:`~hf_ghosts.architectures.LINEAR_HEAD_MODELS`) the forward stops at the head's input ``x`` and
:mod:`hf_ghosts.probe.head` computes the logit slopes from ``x`` block by block over the vocabulary, so the
``[batch, seq, vocab]`` logits and their tangent never exist (see ``chunked_head``).

Pieces: :mod:`~hf_ghosts.probe.inputs` (what the forward is given, which logits are softmax samples),
:mod:`~hf_ghosts.probe.ffn` (the FFN hooks), :mod:`~hf_ghosts.probe.attention` (the score capture), and the
two measuring paths (``jvp``, ``fd``) of :mod:`~hf_ghosts.probe.core` that run them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping

import torch
from torch.func import functional_call

from hf_ghosts.architectures import FfnSpec, attention_blocker, original_module
from hf_ghosts.probe.attention import Pass, capture_scores
from hf_ghosts.probe.buffers import FlatBuffer
from hf_ghosts.probe.core import (
    Session,
    Tensors,
    attention_spread,
    full_logit_slopes,
    jvp_spreads,
    needs_eager_experts,
    probe_mode,
    routes_through_ghosts,
)
from hf_ghosts.probe.fd import FdStepControl, fd_spreads
from hf_ghosts.probe.ffn import FfnTargets
from hf_ghosts.probe.head import HeadReached, LinearHead, output_spread, stopping_at, topk_output_radius
from hf_ghosts.probe.inputs import forward_kwargs, logits_of, output_positions, query_positions, shifts_labels
from hf_ghosts.probe.report import RadiusReport
from hf_ghosts.settings import DEFAULT_RADII, ESTIMATORS, PROBE_DTYPES, RhoSettings

__all__ = ["RadiusProbe"]


def probe_settings(
    caller: str, settings: RhoSettings | None, radii: tuple[str, ...] | list[str] | str, estimator: str,
    dtype: torch.dtype | str, keywords: dict[str, object],
) -> RhoSettings:
    """The probe's settings: ``settings`` as the controller resolved them (:meth:`RhoSettings.resolved`), or built
    here, once, from the probe's own keywords (``radii``, ``estimator``, ``dtype``, ``fd_step``, ...). Either way the
    estimator and the dtype must be resolved: ``"auto"`` is the controller's to decide."""
    if settings is None:
        if estimator not in ESTIMATORS:  # "auto" is the controller's to resolve
            hint = " (resolve 'auto' with hf_ghosts.settings.RhoSettings.resolved)" if estimator == "auto" else ""
            raise ValueError(f"{caller}.estimator: got {estimator!r}; expected one of {list(ESTIMATORS)}{hint}")
        name = dtype if isinstance(dtype, str) else next((k for k, v in PROBE_DTYPES.items() if v == dtype), str(dtype))
        settings = RhoSettings.of(caller, "probe", radii=radii, estimator=estimator, probe_dtype=name, **keywords)
    elif keywords:
        raise TypeError(f"{caller}: pass the settings either as settings= or as keywords, not both ({sorted(keywords)})")
    if settings.estimator not in ESTIMATORS:
        raise settings.error("estimator", f"got {settings.estimator!r}; resolve it first (RhoSettings.resolved)")
    if settings.dtype is None:
        raise settings.error("probe_dtype", f"got {settings.probe_dtype!r}; expected a torch dtype or one of "
                             f"{[name for name, value in PROBE_DTYPES.items() if value is not None]}")
    return settings


def _check_attention_routed(model: torch.nn.Module, settings: RhoSettings) -> None:
    """Refuse ``"attention"`` among the measured radii for a model whose attention bypasses ``AttentionInterface``."""
    radii = settings.measured
    if "attention" in radii and (blocker := attention_blocker(model)) is not None:
        rest = tuple(r for r in radii if r != "attention") or ("output",)
        shown = list(rest) if settings.spelling == "argument" else rest
        raise ValueError(
            f"{settings.caller}: the attention radius needs attention routed through transformers' AttentionInterface; "
            f"{blocker}. Set {settings.name('radii')}={shown!r}."
        )


def check_direction(owner: str, direction: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor]) -> None:
    """Refuse an empty direction, or one naming parameters not in ``trainable``."""
    unknown = sorted(set(direction) - set(trainable))
    if unknown:
        raise KeyError(f"{owner}.measure: direction names parameters the model does not train: {unknown[:5]}")
    if not direction:
        raise ValueError(f"{owner}.measure: the direction is empty")


def checked_norm(owner: str, norm: float) -> float:
    """``|d|`` itself if finite and non-zero (a radius is taken along ``d / |d|``), else a ValueError."""
    if not math.isfinite(norm) or norm == 0:
        raise ValueError(
            f"{owner}.measure: the direction's norm is {norm}; a radius needs a finite, non-zero "
            "direction (a zero update has nothing to measure; a NaN update must be rejected before probing)"
        )
    return norm


class RadiusProbe:
    """Measure output, per-head attention and FFN radii of ``model`` along a direction.

    Args:
        model: a ``transformers`` model (or any module returning logits, for the output radius).
        radii: which radii to measure, a subset of :data:`~hf_ghosts.settings.RADII` ``("output", "attention",
            "ffn", "ffn_activation")`` (or ``"output,ffn"``). ``"ffn"`` is the FFN radius in the ``ffn_mode`` form;
            ``"ffn_activation"`` is always Appendix B's activation radius (both from one FFN recording).
        estimator: ``"jvp"`` (forward-mode AD, exact) or ``"fd"`` (central difference
            ``(z(theta + h v) - z(theta - h v)) / 2h``, no forward AD needed; error ``O(h^2)``, estimated and kept
            under 0.3% by :class:`~hf_ghosts.probe.fd.FdStepControl`, jvp where 1% is out of reach).
        settings: a :class:`~hf_ghosts.settings.RhoSettings` with ``estimator`` and ``probe_dtype`` resolved (what
            the controller passes); or leave it out and pass ``radii``, ``estimator``, ``dtype`` and the other settings
            as keywords (``fd_step``: the widest ``h`` for ``"fd"``, a length along the unit direction; ``ffn_mode``: ``"kink"``,
            the ``ffn_quantile`` quantile of ``|z| / |z'|``, or ``"activation"``, Appendix B; ``vocab_chunk``: head
            rows per block of the chunked head; ``radius``: ``"bound"``, ``pi / max Delta``, or ``"topk_exact"``,
            the certified exact radii of the ``topk`` widest positions capped by ``pi / Delta`` of the next, a lower
            bound never below the bound). Defaults and allowed values: :mod:`hf_ghosts.settings`.
        ffn_spec: where the FFN pre-activations live, for a ``model_type`` not in
            :data:`~hf_ghosts.architectures.ARCHITECTURES`.
        shift_labels: whether logits at position ``t`` predict ``labels[t + 1]`` (causal LM).
            ``None``: True for generative models, False otherwise.
        dtype: dtype of the probe's forward (default float32; or ``"float32"``, ``"bfloat16"``, ``"float16"``,
            ``"float64"``). A 16-bit dtype needs ``estimator="jvp"`` (bf16 JVP: within 0.4% of fp32; bf16 central
            differences are 8-12% off, so ``"fd"`` with a 16-bit dtype raises ``ValueError``).
        chunked_head: stop the forward at the output head's input ``x`` and compute the logit slopes
            ``a = x' W^T + x W'^T + b'`` (``"fd"``: ``(x+ (W + hW')^T - x- (W - hW')^T) / 2h``, biases
            likewise) over ``vocab_chunk`` rows of the head at a time (:mod:`hf_ghosts.probe.head`): the
            ``[batch, seq, vocab]`` logits are never built. ``None``: whenever that is provably the same
            computation (:func:`~hf_ghosts.architectures.chunked_head_blocker` finds nothing against it);
            ``True``: require it (ValueError saying why not); ``False``: always run the full head.

    The model may be wrapped by ``torch.compile`` (its ``_orig_mod`` is measured) or PEFT; it is called with its
    forward's inputs only (:func:`~hf_ghosts.probe.inputs.model_inputs`). A model whose attention is not routed through
    ``AttentionInterface`` (Mamba, Bloom, Falcon before transformers 5.25) with ``"attention"`` in ``radii``, or an unknown FFN with ``"ffn"``, is
    refused here. MoE experts on ``_grouped_mm`` run eagerly inside a jvp probe (forward AD), then are restored.

    Settings are checked once, by :class:`~hf_ghosts.settings.RhoSettings` (``RadiusProbe.<name>: got ...; expected ...``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        radii: tuple[str, ...] | list[str] | str = DEFAULT_RADII,
        estimator: str = "jvp",
        *,
        dtype: torch.dtype | str = torch.float32,
        settings: RhoSettings | None = None,
        ffn_spec: FfnSpec | None = None,
        shift_labels: bool | None = None,
        chunked_head: bool | None = None,
        **keywords: object,
    ) -> None:
        settings = probe_settings(type(self).__name__, settings, radii, estimator, dtype, keywords)
        model = original_module(model)  # torch.compile(model): measure the eager module (same parameters)
        self.settings, self.model, self.radii, self.estimator = settings, model, settings.measured, settings.estimator
        self.fd_step, self.ffn_mode, self.ffn_quantile, self.dtype = (
            settings.fd_step, settings.ffn_mode, settings.ffn_quantile, settings.dtype
        )
        self.shift_labels, self.vocab_chunk, self.radius, self.topk = (
            shift_labels, settings.vocab_chunk, settings.radius, settings.topk
        )
        _check_attention_routed(model, settings)
        self._ffn = FfnTargets.of(model, self.radii, self.ffn_mode, ffn_spec, settings.name("radii"))
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._head = LinearHead.of(model, chunked_head)
        self._eager_experts = needs_eager_experts(model, self.estimator)
        self._weight_buffer, self._direction_buffer = FlatBuffer(self.dtype), FlatBuffer(self.dtype)
        # the attention JVPs the last measurement ran ("triton", "blocked"; empty: none ran, e.g. fd)
        self.attention_kernels: tuple[str, ...] = ()
        # fd: the step that keeps its estimated error small, and a fallback to jvp where none does (hf_ghosts.probe.fd)
        self.fd_control = FdStepControl(self.fd_step, self.forward_ad, self._agree) if self.estimator == "fd" else None

    forward_ad = True  # whether a jvp can stand in where fd cannot reach its error limit (not under FSDP2)

    def _agree(self, value: float) -> float:
        """``value`` made the same on every process that measures together (one process: itself)."""
        return value

    # ----------------------------------------------------------------------------------- direction and weights
    def _direction_and_norm(
        self, direction: Mapping[str, torch.Tensor], norm: float | torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], float | torch.Tensor]:
        """The direction's tensors in the probe's dtype (no copy if they are in it already) and ``|d|``.

        ``norm``: ``|d|`` as the caller has it (the controller: no host sync here); ``None``: ``|d| = sqrt(sum_i
        |d_i|^2)``, per-tensor norms by ``torch._foreach_norm`` summed in float64, checked finite and non-zero.
        """
        check_direction(type(self).__name__, direction, self.trainable)
        if self.dtype == torch.float16:  # fp16 is subnormal below 6e-5 (an update's entries): cast the unit direction
            norm = self._norm_of(direction) if norm is None else norm
            return {name: (d.detach() / norm).to(self.dtype) for name, d in direction.items()}, 1.0
        pieces = self._in_dtype(direction, self._direction_buffer)
        return pieces, self._norm_of(pieces) if norm is None else norm

    def _norm_of(self, pieces: Mapping[str, torch.Tensor]) -> float:
        norms = torch.stack(torch._foreach_norm([d.detach() for d in pieces.values()])).double()
        return checked_norm(type(self).__name__, float(torch.linalg.vector_norm(norms)))  # host sync

    def _weights(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        base = dict(self.trainable) if params is None else {**self.trainable, **params}
        return self._in_dtype(base, self._weight_buffer)

    def _in_dtype(self, tensors: Mapping[str, torch.Tensor], buffer: FlatBuffer) -> dict[str, torch.Tensor]:
        """Floating tensors in the probe's dtype: as they are where they are in it (no copy), else cast into the
        persistent flat ``buffer`` by one foreach copy (a bf16 probe of fp32 weights)."""
        kept = {name: t.detach() for name, t in tensors.items()}
        return {**kept, **buffer.fill({n: t for n, t in kept.items() if t.is_floating_point() and t.dtype != self.dtype})}

    def _intact(self) -> contextlib.AbstractContextManager:
        """Around a whole measurement: what keeps the model's weights as found (nothing: forwards are functional)."""
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------- forwards
    def _forward(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        kwargs = forward_kwargs(self.model, inputs)
        output = functional_call(self.model, weights, args=(), kwargs=kwargs, strict=False, tie_weights=True)
        return logits_of(output, self.model)

    def _run(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The forward's logits; ``None`` where the chunked head's pre-hook stopped it at the head."""
        try:
            return self._forward(weights, inputs)
        except HeadReached:
            return None

    @contextlib.contextmanager
    def _measuring(self, inputs: Mapping[str, torch.Tensor], *, record: bool) -> Iterator[Session]:
        """Probe mode and ghosts attention; with ``record``, the attention capture, FFN hooks and the head's stop."""
        token_mask = inputs.get("attention_mask")
        first = Pass.JVP if self.estimator == "jvp" else Pass.FD_PLUS
        session = Session.start(first, token_mask, self.fd_step, record=record and "attention" in self.radii)
        session.wants_rows = record and self.radius == "topk_exact"
        ghosts = routes_through_ghosts(self.model, self.radii, self.estimator)
        with contextlib.ExitStack() as stack:
            if record and self._ffn.modules:
                session.ffn = self._ffn.recorder(self.ffn_quantile, self.fd_step)
                stack.enter_context(session.ffn.attached(token_mask, first))
            if record and self._head is not None:
                stack.enter_context(stopping_at(self._head.module, session.head_inputs))
            stack.enter_context(probe_mode(self.model, ghosts, self._eager_experts, self.estimator == "jvp"))
            if ghosts:
                stack.enter_context(capture_scores(session.capture))
            yield session

    # ----------------------------------------------------------------------------------- measure
    def measure(
        self,
        inputs: Mapping[str, torch.Tensor],
        direction: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
        *,
        norm: float | torch.Tensor | None = None,
    ) -> RadiusReport:
        """Radii of the loss along ``direction / |direction|`` at ``params`` (default: the model's weights).

        Args:
            inputs: a batch as the Trainer passes it (``input_ids``, ``attention_mask``, ``labels``, ...).
            direction: ``{parameter name: tensor}`` over trainable parameters; missing names are 0.
            params: weights to linearize at, ``{name: tensor}``; names not given use the model's own.
            norm: ``|direction|`` where the caller has it (finite, non-zero; a float or a 0-dim tensor): then a
                ``"jvp"`` probe makes no host sync. ``None``: computed and checked here (one host sync).

        Returns:
            A :class:`RadiusReport` (on the model's device). ``"jvp"`` measures along ``direction`` itself (``J`` is
            linear) and rescales the report by ``|direction|`` (:meth:`RadiusReport.along_unit`).
        """
        with self._intact():
            pieces, norm = self._direction_and_norm(direction, norm)
            weights = self._weights(params)
            if self.fd_control is None:
                return self._measure_once(inputs, weights, pieces, norm)[0]
            at = functools.partial(self._fd_at, inputs, weights, pieces, norm)
            return self.fd_control.measure(at, functools.partial(self._jvp_instead, inputs, weights, pieces, norm), pieces)

    def _fd_at(self, inputs: Tensors, weights: Tensors, pieces: Tensors, norm: float, step: float):
        """fd's report at the step ``step``, and the rounding guard's wider step (``None``: none needed)."""
        saved, self.fd_step = self.fd_step, step
        try:
            return self._measure_once(inputs, weights, pieces, norm)
        finally:
            self.fd_step = saved

    def _jvp_instead(self, inputs: Tensors, weights: Tensors, pieces: Tensors, norm: float) -> RadiusReport:
        """The report measured by jvp, where fd cannot reach its error limit (:class:`~hf_ghosts.probe.fd.FdStepControl`)."""
        saved = self.estimator, self._eager_experts
        self.estimator, self._eager_experts = "jvp", needs_eager_experts(self.model, "jvp")
        try:
            return self._measure_once(inputs, weights, pieces, norm)[0]
        finally:
            self.estimator, self._eager_experts = saved

    def _measure_once(
        self, inputs: Tensors, weights: Tensors, pieces: Tensors, norm: float | torch.Tensor
    ) -> tuple[RadiusReport, float | None]:
        """The report, and fd's wider step where rounding swamped the differences (``None``: none needed)."""
        run = functools.partial(self._run, inputs=inputs)
        path = dict(output="output" in self.radii, linear_head=self._head, chunk=self.vocab_chunk)
        with self._measuring(inputs, record=True) as session:
            if self.estimator == "jvp":  # along d itself: J d = |d| J v
                per_position = jvp_spreads(run, session, weights, pieces, **path)
                self.attention_kernels = tuple(sorted(kernel.value for kernel in session.capture.kernels))
                return self._report(per_position, inputs, session).along_unit(norm), None
            per_position = fd_spreads(run, session, weights, pieces, float(norm), fd_step=self.fd_step, **path)
        return self._report(per_position, inputs, session), session.wider_step

    def logit_slopes(
        self,
        inputs: Mapping[str, torch.Tensor],
        direction: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``z`` at ``params`` and their slopes ``a = dz/dt`` along ``v = direction / |direction|``.

        The full head runs (``[..., classes]`` each, the probe's dtype), for work on every slope, e.g. an
        exact radius (:func:`~hf_ghosts.radii.exact_radius`). ``jvp``: ``a = J v`` by one forward-mode pass;
        ``fd``: ``a = (z(theta + h v) - z(theta - h v)) / 2h`` and a third forward for ``z``. Nothing is
        recorded and the model is left as found. Arguments as :meth:`measure`.
        """
        with self._intact():
            pieces, norm = self._direction_and_norm(direction)
            weights = self._weights(params)
            forward = functools.partial(self._forward, inputs=inputs)
            with self._measuring(inputs, record=False):
                return full_logit_slopes(forward, weights, pieces, norm, estimator=self.estimator, fd_step=self.fd_step)

    def _report(self, per_position: torch.Tensor | None, inputs: Tensors, session: Session) -> RadiusReport:
        """The report from the per-position logit-slope spreads (``None``: no output radius) and the recorders."""
        out_spread = output_tokens = attn = out_radius = None
        if per_position is not None:
            shape, device = per_position.shape, per_position.device
            shift = shifts_labels(self.model, self.shift_labels)
            positions = output_positions(inputs, shape, shift_labels=shift, device=device)
            out_spread, output_tokens = output_spread(per_position, positions)
            if self.radius == "topk_exact":
                out_radius = topk_output_radius(per_position, positions, session.rows, self.topk)
        attention_tokens = None
        if "attention" in self.radii:
            attn = attention_spread(session.capture, self.model)
            attention_tokens = query_positions(inputs, attn.device)
        ffn = {name: session.ffn.radius(form) for name, form in self._ffn.forms.items()}
        return RadiusReport(
            out_spread=out_spread, attn_spread=attn, ffn_radius=ffn.get("ffn"), output_tokens=output_tokens,
            ffn_activation_radius=ffn.get("ffn_activation"), out_radius=out_radius,
            ffn_tokens=session.ffn.tokens(next(iter(ffn.values())).device) if ffn else None,
            attention_tokens=attention_tokens,
        )
