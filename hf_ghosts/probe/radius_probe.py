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
from dataclasses import replace

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
from hf_ghosts.settings import DEFAULT_RADII, ESTIMATORS, MODEL_KEYWORDS, PROBE_DTYPES, RhoSettings

__all__ = ["RadiusProbe"]


def probe_settings(
    caller: str, settings: RhoSettings | None, radii: tuple[str, ...] | list[str] | str, estimator: str,
    dtype: torch.dtype | str, keywords: Mapping[str, object],
) -> tuple[RhoSettings, dict[str, object]]:
    """The probe's settings: ``settings`` as the controller resolved them (:meth:`RhoSettings.resolved`), or built
    here, once, from the probe's own keywords (``radii``, ``estimator``, ``dtype``, ``fd_step``, ...)
    (:meth:`RhoSettings.from_call`); and the keywords that are no setting (:data:`MODEL_KEYWORDS`). Either way the
    estimator and the dtype must be resolved: ``"auto"`` is the controller's to decide."""
    fixed = {}
    if settings is None:
        if estimator not in ESTIMATORS:  # "auto" is the controller's to resolve
            hint = " (resolve 'auto' with hf_ghosts.settings.RhoSettings.resolved)" if estimator == "auto" else ""
            raise ValueError(f"{caller}.estimator: got {estimator!r}; expected one of {list(ESTIMATORS)}{hint}")
        name = dtype if isinstance(dtype, str) else next((k for k, v in PROBE_DTYPES.items() if v == dtype), str(dtype))
        fixed = dict(radii=radii, estimator=estimator, probe_dtype=name)
    settings, rest = RhoSettings.from_call(caller, settings, keywords, allowed=MODEL_KEYWORDS, spelling="probe", **fixed)
    if settings.estimator not in ESTIMATORS:
        raise settings.error("estimator", f"got {settings.estimator!r}; resolve it first (RhoSettings.resolved)")
    if settings.dtype is None:
        raise settings.error("probe_dtype", f"got {settings.probe_dtype!r}; expected a torch dtype or one of "
                             f"{[name for name, value in PROBE_DTYPES.items() if value is not None]}")
    return settings, rest


def check_estimate(owner: str, settings: RhoSettings, estimator: str, fd_step: float | None, forward_ad: bool) -> None:
    """Refuse a measurement by ``estimator`` (``"fd"``: at the step ``fd_step``) that the probe cannot make: an
    unknown estimator, ``"jvp"`` without forward-mode AD (FSDP2), ``"fd"`` without a finite step > 0 or in 16 bits."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"{owner}: estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    if estimator == "jvp" and not forward_ad:
        raise ValueError(f"{owner}: this probe has no forward-mode AD (FSDP2); measure with estimator='fd'")
    if estimator == "fd":
        if isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not 0 < fd_step < math.inf:
            raise ValueError(f"{owner}: estimator 'fd' needs fd_step, a finite number > 0; got {fd_step!r}")
        settings.refuse_fd_in_16_bits(settings.dtype)


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


def norm_of(owner: str, pieces: Mapping[str, torch.Tensor]) -> float:
    """``|d| = sqrt(sum_i |d_i|^2)``: per-tensor norms by ``torch._foreach_norm``, summed in float64, checked."""
    norms = torch.stack(torch._foreach_norm([d.detach() for d in pieces.values()])).double()
    return checked_norm(owner, float(torch.linalg.vector_norm(norms)))  # host sync


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
        settings, _ = probe_settings(type(self).__name__, settings, radii, estimator, dtype, keywords)
        model = original_module(model)  # torch.compile(model): measure the eager module (same parameters)
        self.settings, self.model, self._shift_labels = settings, model, shift_labels
        _check_attention_routed(model, settings)
        self._ffn = FfnTargets.of(model, settings, ffn_spec)
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._head = LinearHead.of(model, chunked_head, settings)
        self._jvp_eager_experts = needs_eager_experts(model, "jvp")  # MoE experts a jvp runs eagerly
        self._weight_buffer, self._direction_buffer = FlatBuffer(settings.dtype), FlatBuffer(settings.dtype)
        # the attention JVPs the last measurement ran ("triton", "blocked"; empty: none ran, e.g. fd)
        self.attention_kernels: tuple[str, ...] = ()
        # fd: the step that keeps its estimated error small, and a fallback to jvp where none does (hf_ghosts.probe.fd)
        self.fd_control = FdStepControl(settings.fd_step, self.forward_ad, self._agree) if settings.estimator == "fd" else None

    forward_ad = True  # whether a jvp can stand in where fd cannot reach its error limit (not under FSDP2)

    @property
    def estimator(self) -> str:
        """How :meth:`measure` takes the slopes (``settings.estimator``; fd's step control may measure by jvp)."""
        return self.settings.estimator

    @property
    def radii(self) -> tuple[str, ...]:
        """The radii measured: the limiting ones, then the watched ones (``settings.measured``)."""
        return self.settings.measured

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the probe's forwards (``settings.dtype``)."""
        return self.settings.dtype

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
        owner = type(self).__name__
        check_direction(owner, direction, self.trainable)
        if self.dtype == torch.float16:  # fp16 is subnormal below 6e-5 (an update's entries): cast the unit direction
            norm = norm_of(owner, direction) if norm is None else norm
            return {name: (d.detach() / norm).to(self.dtype) for name, d in direction.items()}, 1.0
        pieces = self._direction_buffer.cast(direction)
        return pieces, norm_of(owner, pieces) if norm is None else norm

    def _weights(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The weights to measure at, in the probe's dtype: the trainable parameters, ``params`` where given."""
        return self._weight_buffer.cast(dict(self.trainable) if params is None else {**self.trainable, **params})

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
    def _measuring(
        self, inputs: Mapping[str, torch.Tensor], *, estimator: str, fd_step: float | None, record: bool
    ) -> Iterator[Session]:
        """Probe mode and ghosts attention for one measurement by ``estimator`` (``"fd"``: at the step ``fd_step``);
        with ``record``, the attention capture, FFN hooks and the head's stop."""
        radii, token_mask, jvp = self.settings.measured, inputs.get("attention_mask"), estimator == "jvp"
        first = Pass.JVP if jvp else Pass.FD_PLUS
        session = Session.start(first, token_mask, fd_step, record=record and "attention" in radii)
        session.wants_rows = record and self.settings.radius == "topk_exact"
        ghosts = routes_through_ghosts(self.model, radii, estimator)
        with contextlib.ExitStack() as stack:
            if record and self._ffn.modules:
                session.ffn = self._ffn.recorder(self.settings.ffn_quantile, fd_step)
                stack.enter_context(session.ffn.attached(token_mask, first))
            if record and self._head is not None:
                stack.enter_context(stopping_at(self._head.module, session.head_inputs))
            stack.enter_context(probe_mode(self.model, ghosts, jvp and self._jvp_eager_experts, jvp))
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
            linear) and rescales the report by ``|direction|`` (:meth:`RadiusReport.along_unit`). ``"fd"``: the step
            control (:attr:`fd_control`) chooses the step and may measure by jvp instead (:mod:`hf_ghosts.probe.fd`);
            :meth:`measure_with` measures with a given estimator and step.
        """
        with self._intact():
            pieces, norm = self._direction_and_norm(direction, norm)
            once = functools.partial(self._measure_once, inputs, self._weights(params), pieces, norm)
            if self.fd_control is None:
                return once("jvp")[0]
            return self.fd_control.measure(functools.partial(once, "fd"), lambda: once("jvp")[0], pieces)

    def measure_with(
        self, inputs: Tensors, direction: Tensors, params: Tensors | None = None, *, estimator: str,
        fd_step: float | None = None, norm: float | torch.Tensor | None = None,
    ) -> RadiusReport:
        """One measurement by ``estimator``, ``"jvp"`` or ``"fd"`` at exactly the step ``fd_step`` (e.g. one the step
        control chose, ``fd_control.step``): no step control, no rounding guard, and the probe's state (the
        control's included) neither read nor changed. The report's ``fd_step`` is the step (``None``: jvp);
        ``fd_error`` and ``fd_fallback`` are not set. Arguments and report otherwise as :meth:`measure`.

        ``probe.measure_with(batch, block, estimator="fd", fd_step=probe.fd_control.step)`` measures another
        direction (a block of the update) at the step the last :meth:`measure` chose.
        """
        check_estimate(f"{type(self).__name__}.measure_with", self.settings, estimator, fd_step, self.forward_ad)
        with self._intact():
            pieces, norm = self._direction_and_norm(direction, norm)
            return self._measure_once(inputs, self._weights(params), pieces, norm, estimator, fd_step)[0]

    def _measure_once(
        self, inputs: Tensors, weights: Tensors, pieces: Tensors, norm: float | torch.Tensor, estimator: str,
        fd_step: float | None = None,
    ) -> tuple[RadiusReport, float | None]:
        """The report by ``estimator`` (``"fd"``: at the step ``fd_step``), and fd's wider step where rounding swamped
        the differences (``None``: none needed)."""
        run = functools.partial(self._run, inputs=inputs)
        report_of = functools.partial(session_report, self.model, self.settings, self._shift_labels, self._ffn, inputs)
        path = dict(output="output" in self.settings.measured, linear_head=self._head, chunk=self.settings.vocab_chunk)
        with self._measuring(inputs, estimator=estimator, fd_step=fd_step, record=True) as session:
            if estimator == "jvp":  # along d itself: J d = |d| J v
                per_position = jvp_spreads(run, session, weights, pieces, **path)
                self.attention_kernels = tuple(sorted(kernel.value for kernel in session.capture.kernels))
                return report_of(per_position, session).along_unit(norm), None
            per_position = fd_spreads(run, session, weights, pieces, float(norm), fd_step=fd_step, **path)
        report = report_of(per_position, session)
        return replace(report, fd_step=torch.tensor(fd_step, dtype=torch.float64, device=report.device)), session.wider_step

    def logit_slopes(
        self, inputs: Tensors, direction: Tensors, params: Tensors | None = None, *, estimator: str | None = None,
        fd_step: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``z`` at ``params`` and their slopes ``a = dz/dt`` along ``v = direction / |direction|``.

        The full head runs (``[..., classes]`` each, the probe's dtype), for work on every slope, e.g. an
        exact radius (:func:`~hf_ghosts.radii.exact_radius`). ``jvp``: ``a = J v`` by one forward-mode pass;
        ``fd``: ``a = (z(theta + h v) - z(theta - h v)) / 2h`` and a third forward for ``z``. ``estimator`` and
        ``fd_step`` as :meth:`measure_with`; left out, the probe's own for this direction (:meth:`slope_estimator`).
        Nothing is recorded and the model is left as found. Arguments otherwise as :meth:`measure`.
        """
        if estimator is None:
            estimator, fd_step = self.slope_estimator(inputs, direction, params)
        check_estimate(f"{type(self).__name__}.logit_slopes", self.settings, estimator, fd_step, self.forward_ad)
        with self._intact():
            pieces, norm = self._direction_and_norm(direction)
            weights = self._weights(params)
            forward = functools.partial(self._forward, inputs=inputs)
            with self._measuring(inputs, estimator=estimator, fd_step=fd_step, record=False):
                return full_logit_slopes(forward, weights, pieces, norm, estimator=estimator, fd_step=fd_step)

    def slope_estimator(
        self, inputs: Tensors, direction: Tensors, params: Tensors | None = None
    ) -> tuple[str, float | None]:
        """``(estimator, fd_step)`` of a measurement along ``direction`` on ``inputs``: ``("jvp", None)`` for a jvp
        probe; an fd probe measures once (:meth:`measure`: its step control checks the step where a check is due) and
        gives the step it measured at, or ``("jvp", None)`` where the control fell back to jvp."""
        if self.fd_control is None:
            return "jvp", None
        report = self.measure(inputs, direction, params)
        return ("jvp", None) if float(report.fd_fallback) else ("fd", float(report.fd_step))  # host sync


def session_report(
    model: torch.nn.Module, settings: RhoSettings, shift_labels: bool | None, ffn: FfnTargets, inputs: Tensors,
    per_position: torch.Tensor | None, session: Session,
) -> RadiusReport:
    """The report of one measurement of ``model`` from the per-position logit-slope spreads (``None``: no output
    radius) and the session's recorders (``ffn``: the FFN radii recorded)."""
    out_spread = output_tokens = attn = out_radius = None
    if per_position is not None:
        shape, device = per_position.shape, per_position.device
        positions = output_positions(inputs, shape, shift_labels=shifts_labels(model, shift_labels), device=device)
        out_spread, output_tokens = output_spread(per_position, positions)
        if settings.radius == "topk_exact":
            out_radius = topk_output_radius(per_position, positions, session.rows, settings.topk)
    attention_tokens = None
    if "attention" in settings.measured:
        attn = attention_spread(session.capture, model)
        attention_tokens = query_positions(inputs, attn.device)
    radii = {name: session.ffn.radius(form) for name, form in ffn.forms.items()}
    return RadiusReport(
        out_spread=out_spread, attn_spread=attn, ffn_radius=radii.get("ffn"), output_tokens=output_tokens,
        ffn_activation_radius=radii.get("ffn_activation"), out_radius=out_radius,
        ffn_tokens=session.ffn.tokens(next(iter(radii.values())).device) if radii else None,
        attention_tokens=attention_tokens,
    )
