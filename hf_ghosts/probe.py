"""`RadiusProbe`: measure the convergence radii of a model along a parameter-space direction.

One forward-mode JVP (or two forwards for central finite differences) at given weights along a
unit direction ``v`` yields the slopes of the logits, of every head's attention scores and of the
FFN pre-activations; :mod:`hf_ghosts.radii` turns them into radii. The model is left exactly as
found: same weights, same train/eval flags, same attention implementation, no gradients touched.

For a causal LM whose logits are ``lm_head(x)`` of a plain linear head
(:data:`~hf_ghosts.architectures.LINEAR_HEAD_MODELS`) the forward stops at the head's input ``x`` and
:mod:`hf_ghosts.head` computes the logit slopes from ``x`` block by block over the vocabulary, so the
``[batch, seq, vocab]`` logits and their tangent never exist (see ``chunked_head``).

Pieces: :func:`output_positions` (which logits are softmax samples), :class:`FfnRecorder` (the FFN
hooks), the attention capture of :mod:`hf_ghosts.attention`, and :class:`RadiusProbe`'s two measuring
paths (``jvp``, ``fd``) that run them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

from hf_ghosts import attention, compat, head
from hf_ghosts.architectures import (
    LINEAR_HEAD_MODELS,
    LOGIT_RESCALING_ATTRS,
    FfnSpec,
    attention_blocker,
    base_model_of,
    chunked_head_blocker,
    find_ffn_modules,
    original_module,
    resolve_ffn_activation,
    resolve_ffn_spec,
)
from hf_ghosts.attention import Pass
from hf_ghosts.radii import TOPK_POOL, activation_radius, rho_bound, spread, topk_radius, widest_tokens
from hf_ghosts.settings import (
    DEFAULT_RADIUS,
    DEFAULT_TOPK,
    ESTIMATORS,
    FFN_MODES,
    PROBE_DTYPES,
    RADII,
    check_probe_dtype,
    parse_radii,
    spelled,
    validate,
)

__all__ = [
    "ESTIMATORS",
    "FFN_MODES",
    "IGNORE_INDEX",
    "LINEAR_HEAD_MODELS",
    "LOGIT_RESCALING_ATTRS",
    "RADII",
    "FfnRecorder",
    "RadiusProbe",
    "RadiusReport",
    "forward_kwargs",
    "model_inputs",
    "output_positions",
]

IGNORE_INDEX = -100
# fd's rounding guard (_fd_wider_step): rounding of the logits in units of eps |z|, the share of the
# largest spread it may take, and the widest step as a share of the radius measured.
FD_ROUNDING = 4.0
FD_ROUNDING_TOLERANCE = 1e-3
FD_MAX_STEP_RADII = 0.1
Tensors = Mapping[str, torch.Tensor]  # a batch, weights or a direction, by name


class _HeadReached(BaseException):  # a control-flow signal, not an error
    """Raised by the head's pre-hook: the forward stops where the full-vocabulary head would run.

    A ``BaseException``, so that no ``except Exception`` in model code swallows it.
    """


@dataclass(frozen=True)
class RadiusReport:
    """Spreads measured along a unit direction, and the radii they imply.

    The raw fields reduce across processes: ``out_spread`` and ``attn_spread`` with MAX,
    ``ffn_radius``, ``ffn_activation_radius`` and ``out_radius`` with MIN, ``output_tokens`` with SUM.

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

    def radii(self) -> dict[str, torch.Tensor]:
        """Each measured radius as a scalar tensor, by name (:data:`~hf_ghosts.settings.RADII`):
        ``{"output": ..., "attention": min over heads, "ffn": ..., "ffn_activation": ...}``."""
        found: dict[str, torch.Tensor] = {}
        if self.out_spread is not None:
            found["output"] = self.rho_out
        if self.attn_spread is not None:
            found["attention"] = self.rho_attn.amin() if self.attn_spread.numel() else torch.tensor(math.inf)
        if self.ffn_radius is not None:
            found["ffn"] = self.ffn_radius
        if self.ffn_activation_radius is not None:
            found["ffn_activation"] = self.ffn_activation_radius
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

    def map(self, fn_max, fn_min, fn_sum) -> RadiusReport:
        """Apply reductions field-wise (MAX to spreads, MIN to the FFN radius, SUM to counts)."""
        return replace(
            self,
            out_spread=None if self.out_spread is None else fn_max(self.out_spread),
            attn_spread=None if self.attn_spread is None else fn_max(self.attn_spread),
            ffn_radius=None if self.ffn_radius is None else fn_min(self.ffn_radius),
            output_tokens=None if self.output_tokens is None else fn_sum(self.output_tokens),
            ffn_activation_radius=None if self.ffn_activation_radius is None else fn_min(self.ffn_activation_radius),
            out_radius=None if self.out_radius is None else fn_min(self.out_radius),
        )


def output_positions(
    inputs: Mapping[str, torch.Tensor],
    shape: Sequence[int],
    *,
    shift_labels: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask over ``shape`` (the logits' shape without the class dim) of the positions that are softmax samples.

    With ``labels`` of that shape and ``shift_labels=False``: ``labels != -100``. Causal
    (``shift_labels=True``), logits at ``t`` predict ``labels[t + 1]``: ``valid[:, t] = labels[:, t + 1] != -100``
    and the last position never counts; a ``shift_labels`` entry in ``inputs`` (already shifted) is
    used as it is. Without labels, ``t`` counts where the ``attention_mask`` is 1 at ``t`` and ``t + 1``.
    A 1-d ``shape`` (one output per sample) takes 1-d labels, else every sample.

    Example: labels ``[[5, -100, 7, 8]]``, shifted: ``[[False, True, True, False]]``.
    """
    shape = torch.Size(shape)
    labels = inputs.get("labels")
    if labels is not None and labels.shape[: len(shape)] == shape and not shift_labels:
        return labels != IGNORE_INDEX
    if len(shape) == 1:
        if labels is not None and labels.dim() == 1:
            return labels != IGNORE_INDEX
        return torch.ones(shape, dtype=torch.bool, device=device)
    batch, length = shape[:2]
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"] != IGNORE_INDEX
    valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if labels is not None:
        valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    else:
        mask = inputs.get("attention_mask")
        real = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.bool()
        valid[:, :-1] = real[:, :-1] & real[:, 1:]
    return valid


class FfnRecorder:
    """One measurement's forward hooks on the FFN pre-activation modules: what the FFN radius is taken over.

    Per module output ``z`` (real tokens only) with slope ``z'``, for each form in ``forms``: ``"kink"`` keeps
    every ``|z| / |z'|`` (inf where ``z' = 0``) and ``radius("kink")`` is their ``quantile``; ``"activation"``
    keeps each module's minimum of :func:`~hf_ghosts.radii.activation_radius` and ``radius("activation")`` is
    the smallest. Both forms come from the same ``z`` and ``z'`` (one probe).
    ``Pass.JVP`` reads ``z'`` from the output's tangent; ``Pass.FD_PLUS`` stores ``z+``, and ``Pass.FD_MINUS``
    forms ``z' = (z+ - z-) / 2h`` and ``z = (z+ + z-) / 2``.
    """

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        forms: Sequence[str],
        quantile: float,
        activation: str | None,
        fd_step: float,
    ) -> None:
        self.modules, self.forms, self.quantile, self.activation = modules, tuple(forms), quantile, activation
        self.fd_step = fd_step
        self.token_mask: torch.Tensor | None = None
        self.current = Pass.JVP
        self.values: dict[str, list[torch.Tensor]] = {form: [] for form in self.forms}
        self._plus: dict[str, torch.Tensor] = {}

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
        if "activation" in self.values:
            least = activation_radius(primal, tangent, self.activation).amin() if primal.numel() else torch.tensor(math.inf)
            self.values["activation"].append(least.reshape(1))
        if "kink" in self.values:
            magnitude = tangent.abs()
            ratio = torch.where(magnitude > 0, primal.abs() / magnitude, torch.full_like(magnitude, math.inf))
            self.values["kink"].append(ratio.reshape(-1))

    def radius(self, form: str) -> torch.Tensor:
        """``activation``: the least radius; ``kink``: the ``ceil(quantile n)``-th smallest ratio, inf if none."""
        values = torch.cat(self.values[form])
        if form == "activation":
            return values.amin()
        if values.numel() == 0:
            return torch.tensor(math.inf, device=values.device)
        return values.kthvalue(max(1, math.ceil(self.quantile * values.numel()))).values


@dataclass
class _Session:
    """What one measurement records: the attention capture, the FFN recorder, the inputs the head was reached with."""

    capture: attention.ScoreCapture
    ffn: FfnRecorder | None = None
    head_inputs: list[torch.Tensor] = field(default_factory=list)
    # flat position indices -> (logits, slopes) rows ``[k, classes]`` at those positions, kept only when wanted
    # (radius="topk_exact"): otherwise nothing holds on to the logits past the spreads
    wants_rows: bool = False
    rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def start(cls, first: Pass, token_mask: torch.Tensor | None, fd_step: float, *, record: bool) -> _Session:
        """A session whose first forward is ``first``; the attention capture reads real queries off ``token_mask``."""
        query_mask = None if token_mask is None else token_mask.bool()
        return cls(attention.ScoreCapture(first, query_mask, fd_step, record=record))

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
def _stopping_at(module: torch.nn.Module, captured: list[torch.Tensor]) -> Iterator[None]:
    """A pre-hook on ``module`` (the head) for the block: append its input ``x`` to ``captured``, stop the forward."""

    def hook(module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _HeadReached

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _probe_mode(model: torch.nn.Module, ghosts: bool, eager_experts: bool = False) -> Iterator[None]:
    """Eval mode, fp32 forward without Accelerate's autocast wrapper, not through ``model.compile()``'s compiled
    call, ghosts attention (if ``ghosts``), eager MoE experts (if ``eager_experts``); all restored."""
    training = {module: module.training for module in model.modules()}
    wrapped_forward = model.__dict__.get("forward")
    original_forward = getattr(model, "_original_forward", None)
    compiled_call = model.__dict__.get("_compiled_call_impl")
    model.eval()
    if wrapped_forward is not None and original_forward is not None:
        model.forward = original_forward
    if compiled_call is not None:  # model.compile() in place: forward AD fails in inductor's out= kernels
        model._compiled_call_impl = None
    try:
        device_type = next(model.parameters()).device.type
        base = base_model_of(model)
        name = attention.ATTENTION_NAME
        switch = compat.attention_implementation(base, name) if ghosts else contextlib.nullcontext()
        experts = compat.experts_implementation(base, "eager") if eager_experts else contextlib.nullcontext()
        with switch, experts, torch.no_grad(), torch.autocast(device_type, enabled=False):
            yield
    finally:
        if wrapped_forward is not None:
            model.forward = wrapped_forward
        if compiled_call is not None:
            model._compiled_call_impl = compiled_call
        for module, flag in training.items():
            module.training = flag


def _model_type(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _asks(model: torch.nn.Module, method: str) -> bool:
    """``model.<method>()`` as a bool (``can_generate``, ``_can_set_attn_implementation``); False without it."""
    answer = getattr(model, method, None)
    return bool(answer()) if callable(answer) else False


# Never passed to the probe's forward: loss targets, caches, output switches, a trainer's private flags.
NOT_MODEL_INPUTS = frozenset({
    "labels", "shift_labels", "num_items_in_batch", "use_cache", "past_key_values", "cache_position", "return_dict",
    "output_attentions", "output_hidden_states", "output_router_logits", "logits_to_keep", "return_loss",
})
# Model inputs that travel in ``**kwargs`` (TransformersKwargs): the packed sequences of padding-free batches.
KWARGS_MODEL_INPUTS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


@functools.cache
def _forward_inputs(forward: Callable) -> frozenset[str] | None:
    """The named inputs of a ``forward`` (``None``: it takes only ``**kwargs``, or has no readable signature)."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = frozenset(name for name, p in parameters.items() if p.kind in kinds and name != "self")
    return names or None


def model_inputs(model: torch.nn.Module, inputs: Mapping[str, object]) -> dict[str, object]:
    """The entries of ``inputs`` that are inputs of the model's forward (``input_ids``, ``attention_mask``,
    ``position_ids``, ``pixel_values``, ...), read from the signature of the base model's class ``forward``
    (inside ``torch.compile`` and PEFT wrappers; TRL's patched forward keeps that signature too), without
    :data:`NOT_MODEL_INPUTS`. A trainer's private flags (TRL's ``fused_lm_head``, ``return_token_accuracy``) go.
    """
    named = _forward_inputs(type(base_model_of(model)).forward)
    keep = None if named is None else named | KWARGS_MODEL_INPUTS
    return {key: value for key, value in inputs.items() if key not in NOT_MODEL_INPUTS and (keep is None or key in keep)}


def forward_kwargs(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The batch's model inputs (:func:`model_inputs`: no labels, no trainer flags), with ``use_cache=False``."""
    kwargs = model_inputs(model, inputs)
    config = getattr(base_model_of(model), "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


@dataclass(frozen=True)
class _LinearHead:
    """The output head the chunked head reads ``W`` and ``b`` of, and their names in the weights and the direction."""

    module: torch.nn.Linear
    weight_name: str
    bias_name: str | None

    @classmethod
    def of(cls, model: torch.nn.Module, chunked_head: bool | None) -> _LinearHead | None:
        """The head if the chunked head applies (``chunked_head`` not False; True: an error saying why it cannot)."""
        blocker = None if chunked_head is False else chunked_head_blocker(model)
        if chunked_head is False or blocker is not None:
            if chunked_head:
                raise ValueError(
                    f"RadiusProbe: chunked_head=True, but {blocker}. Pass chunked_head=None to fall back to the "
                    "full logits automatically (or chunked_head=False)"
                )
            return None
        module = base_model_of(model).get_output_embeddings()
        # named_parameters() names a tied weight once: the name the direction and weights use
        names = {id(p): name for name, p in model.named_parameters()}
        return cls(module, names[id(module.weight)], names.get(id(module.bias)))

    def tensors(
        self, weights: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``W, W', b, b'``: weights as the forward sees them, ``W'``/``b'`` the direction's entries for them
        (the unit direction's for jvp, the raw one's for fd); ``None`` where it has none."""
        weight = weights.get(self.weight_name, self.module.weight.detach())  # absent: frozen, the module's own
        if self.bias_name is None:
            return weight, direction.get(self.weight_name), None, None
        bias = weights.get(self.bias_name, self.module.bias.detach())
        return weight, direction.get(self.weight_name), bias, direction.get(self.bias_name)


def _logits_of(output: object, model: torch.nn.Module) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} returned {type(output).__name__} without `logits`; the output radius needs a model "
            "with a head that produces logits (for example AutoModelForCausalLM, not AutoModel)"
        )
    return logits


def _tangent(dual: torch.Tensor) -> torch.Tensor:
    primal, tangent = fwAD.unpack_dual(dual)
    return torch.zeros_like(primal) if tangent is None else tangent


def _dual(weights: Tensors, unit: Tensors) -> dict[str, torch.Tensor]:
    """``theta + v eps``: dual tensors where ``unit`` has a tangent (inside ``fwAD.dual_level()``)."""
    return {name: fwAD.make_dual(w, unit[name]) if name in unit else w for name, w in weights.items()}


def _shifted(weights: Tensors, direction: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """``theta + scale * d`` (``theta +- h v`` with ``scale = +- h / |d|``: no copy of ``v``)."""
    return {name: torch.add(w, direction[name], alpha=scale) if name in direction else w for name, w in weights.items()}


def _checked_settings(caller: str, settings: dict[str, object], dtype: torch.dtype | str, arguments: bool) -> torch.dtype:
    """:class:`RadiusProbe`'s settings validated (``estimator`` first: ``"auto"`` is the controller's to resolve);
    returns the probe's dtype, a name in :data:`~hf_ghosts.settings.PROBE_DTYPES` resolved."""
    estimator = settings["estimator"]
    if estimator not in ESTIMATORS:
        hint = " (resolve 'auto' with hf_ghosts.settings.resolve_estimator)" if estimator == "auto" else ""
        raise ValueError(f"RadiusProbe.estimator: got {estimator!r}; expected one of {list(ESTIMATORS)}{hint}")
    validate(caller, settings, arguments=arguments)
    if isinstance(dtype, str):
        if PROBE_DTYPES.get(dtype) is None:
            raise ValueError(f"RadiusProbe.dtype: got {dtype!r}; expected a torch dtype or one of "
                             f"{[name for name, value in PROBE_DTYPES.items() if value is not None]}")
        dtype = PROBE_DTYPES[dtype]
    check_probe_dtype("RadiusProbe", estimator, dtype, name="dtype")
    return dtype


def _check_attention_routed(model: torch.nn.Module, radii: tuple[str, ...], caller: str, arguments: bool) -> None:
    """Refuse ``"attention"`` in ``radii`` for a model whose attention bypasses ``AttentionInterface``."""
    if "attention" in radii and (blocker := attention_blocker(model)) is not None:
        rest = tuple(r for r in radii if r != "attention") or ("output",)
        shown = list(rest) if arguments else rest
        raise ValueError(
            f"{caller}: the attention radius needs attention routed through transformers' AttentionInterface; "
            f"{blocker}. Set {spelled('radii', arguments)}={shown!r}."
        )


def _needs_eager_experts(model: torch.nn.Module, estimator: str) -> bool:
    """MoE experts dispatched to ``_grouped_mm`` (no forward-mode AD): a JVP runs them eagerly (same math)."""
    return estimator == "jvp" and compat.experts_implementation_of(base_model_of(model)) not in (None, "eager")


def _routes_through_ghosts(model: torch.nn.Module, radii: tuple[str, ...], estimator: str) -> bool:
    """Whether the forward runs the ghosts attention: to measure attention, and for a JVP through sdpa or flash
    (no forward-mode AD). Ghosts, not plain eager: it outputs 0 for a query with no allowed key (left padding)
    as sdpa does, so the probe's logits equal the training forward's."""
    if "attention" in radii:
        return True
    no_forward_ad = compat.attention_implementation_of(base_model_of(model)) not in (None, "eager")
    return estimator == "jvp" and no_forward_ad and attention_blocker(model) is None


@dataclass(frozen=True)
class _FfnTargets:
    """The FFN radii to record, ``{"ffn": ffn_mode's form, "ffn_activation": "activation"}`` (those in ``radii``),
    the pre-activation modules they are taken over and the activation (for the ``"activation"`` form)."""

    forms: dict[str, str]
    modules: dict[str, torch.nn.Module]
    activation: str | None = None

    @classmethod
    def of(
        cls, model: torch.nn.Module, radii: tuple[str, ...], ffn_mode: str, ffn_spec: FfnSpec | None, radii_name: str
    ) -> _FfnTargets:
        """Resolved for ``model`` (``ffn_spec``, else :data:`~hf_ghosts.architectures.ARCHITECTURES`)."""
        forms = {name: form for name, form in (("ffn", ffn_mode), ("ffn_activation", "activation")) if name in radii}
        if not forms:
            return cls(forms, {})
        spec = resolve_ffn_spec(model, ffn_spec, radii_name)
        modules = find_ffn_modules(model, spec)
        activation = resolve_ffn_activation(model, spec) if "activation" in forms.values() else None
        return cls(forms, modules, activation)

    def recorder(self, quantile: float, fd_step: float) -> FfnRecorder:
        """A fresh :class:`FfnRecorder` over the modules, each distinct form once."""
        return FfnRecorder(self.modules, tuple(dict.fromkeys(self.forms.values())), quantile, self.activation, fd_step)


def _fd_wider_step(plus: torch.Tensor, minus: torch.Tensor, per_position: torch.Tensor, fd_step: float) -> float | None:
    """A wider fd step ``h`` (``fd_step``) when rounding dominates the full head's logit differences; ``None``: keep it.

    The logits carry rounding of ~``FD_ROUNDING eps |z|`` (``eps`` of the forward's dtype), so a slope ``(z+ - z-) / 2h`` carries
    ``FD_ROUNDING eps max|z| / h``. Where that exceeds ``FD_ROUNDING_TOLERANCE`` of the largest spread (saturated
    softcapped logits: slopes tiny next to ``|z|``), ``h`` grows to bring it there, at most to
    ``FD_MAX_STEP_RADII`` of the radius just measured (the truncation error grows as ``(h / rho)^2``). One host
    sync; two more forwards only when it fires.
    """
    eps = torch.finfo(plus.dtype).eps
    largest = float(per_position.amax()) if per_position.numel() else 0.0  # host sync
    if not largest > 0:
        return None
    magnitude = float(torch.maximum(plus.abs().amax(), minus.abs().amax()))
    noise = FD_ROUNDING * eps * magnitude / fd_step
    if noise <= FD_ROUNDING_TOLERANCE * largest:
        return None
    wider = min(fd_step * noise / (FD_ROUNDING_TOLERANCE * largest), FD_MAX_STEP_RADII * math.pi / largest)
    return wider if wider > 2 * fd_step else None


def _full_rows(slopes: torch.Tensor, *logits: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Rows of the full head's ``[..., classes]`` slopes and logits (the mean of ``logits``: ``z``, or fd's ``z+``
    and ``z-``, ``z(theta)`` to ``O(h^2)``), by flat position index; only the chosen rows are ever averaged."""
    classes = slopes.shape[-1]

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [part.reshape(-1, classes)[index] for part in logits]
        return sum(picked) / len(picked), slopes.reshape(-1, classes)[index]

    return rows


def _jvp_head_rows(
    hidden: torch.Tensor, hidden_slope: torch.Tensor | None, weight: torch.Tensor, weight_slope: torch.Tensor | None,
    bias: torch.Tensor | None, bias_slope: torch.Tensor | None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Chunked head, jvp: ``z = x W^T + b`` and ``a = x' W^T + x W'^T + b'`` at the chosen positions only."""
    width = hidden.shape[-1]

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.reshape(-1, width)[index]
        x_slope = None if hidden_slope is None else hidden_slope.reshape(-1, width)[index]
        return torch.nn.functional.linear(x, weight, bias), head.jvp_slopes(x, x_slope, weight, weight_slope, bias_slope)

    return rows


def _fd_head_rows(
    hidden_plus: torch.Tensor, hidden_minus: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    weight_step: torch.Tensor | None, bias_step: torch.Tensor | None, scale: float, fd_step: float,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Chunked head, fd: ``z = ((x+ + x-) / 2) W^T + b`` (``z(theta)`` to ``O(h^2)``) and :func:`head.fd_slopes`
    at the chosen positions only."""
    width = hidden_plus.shape[-1]

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plus, minus = hidden_plus.reshape(-1, width)[index], hidden_minus.reshape(-1, width)[index]
        slopes = head.fd_slopes(plus, minus, weight, bias, weight_step, bias_step, scale, fd_step)
        return torch.nn.functional.linear((plus + minus) / 2, weight, bias), slopes

    return rows


def _topk_output_radius(
    per_position: torch.Tensor, positions: torch.Tensor, rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    topk: int,
) -> torch.Tensor:
    """:func:`~hf_ghosts.radii.topk_radius` over the ``topk`` distinct valid positions of largest spread (float32);
    ``rows`` gives the chosen positions' logits and slopes."""
    chosen, following = widest_tokens(per_position, positions, TOPK_POOL * topk)
    logits, slopes = rows(chosen)
    return topk_radius(logits, slopes, following, topk).to(per_position.device, torch.float32)


def _output_spread(per_position: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_t spread_t`` over the ``positions`` that count (0 if none), and their number."""
    masked = torch.where(positions, per_position, torch.zeros_like(per_position))
    return (masked.amax() if per_position.numel() else per_position.new_zeros(())), positions.sum()


def _attention_spread(capture: attention.ScoreCapture, model: torch.nn.Module) -> torch.Tensor:
    """The captured per-head score spreads, ``[layers, heads]`` in layer order; an error if none were captured."""
    if not capture.spreads:
        raise ValueError(
            f"No attention call of model_type {_model_type(model)!r} went through the ghosts attention; "
            "its attention cannot be measured. Pass radii=('output',)"
        )
    return torch.stack([capture.spreads[layer] for layer in sorted(capture.spreads)])


def _shifts(model: torch.nn.Module, shift_labels: bool | None) -> bool:
    """``shift_labels``; ``None``: whether the model generates (causal: logits at ``t`` predict ``labels[t + 1]``)."""
    return _asks(base_model_of(model), "can_generate") if shift_labels is None else shift_labels


def _check_direction(owner: str, direction: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor]) -> None:
    """Refuse an empty direction, or one naming parameters not in ``trainable``."""
    unknown = sorted(set(direction) - set(trainable))
    if unknown:
        raise KeyError(f"{owner}.measure: direction names parameters the model does not train: {unknown[:5]}")
    if not direction:
        raise ValueError(f"{owner}.measure: the direction is empty")


def _checked_norm(owner: str, norm: float) -> float:
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
            ``(z(theta + h v) - z(theta - h v)) / 2h``, no forward AD needed; error ``O(h^2)``).
        fd_step: ``h`` for ``"fd"``, a length in parameter space along the unit direction.
        ffn_mode: ``"kink"`` (the paper's proxy, the ``ffn_quantile`` quantile of ``|z| / |z'|``)
            or ``"activation"`` (min over neurons of :func:`~hf_ghosts.radii.activation_radius`
            with the model's configured activation).
        ffn_quantile: quantile of the kink proxy (paper: 1%).
        ffn_spec: where the FFN pre-activations live, for a ``model_type`` not in
            :data:`~hf_ghosts.architectures.ARCHITECTURES`.
        shift_labels: whether logits at position ``t`` predict ``labels[t + 1]`` (causal LM).
            ``None``: True for generative models, False otherwise.
        dtype: dtype of the probe's forward (default float32; or ``"float32"``, ``"bfloat16"``, ``"float16"``). A
            16-bit dtype needs ``estimator="jvp"`` (bf16 JVP: within 0.4% of fp32; bf16 central differences are
            8-12% off, so ``"fd"`` with a 16-bit dtype raises ``ValueError``).
        chunked_head: stop the forward at the output head's input ``x`` and compute the logit slopes
            ``a = x' W^T + x W'^T + b'`` (``"fd"``: ``(x+ (W + hW')^T - x- (W - hW')^T) / 2h``, biases
            likewise) over ``vocab_chunk`` rows of the head at a time (:mod:`hf_ghosts.head`): the
            ``[batch, seq, vocab]`` logits are never built. ``None``: whenever that is provably the same
            computation (:func:`~hf_ghosts.architectures.chunked_head_blocker` finds nothing against it);
            ``True``: require it (ValueError saying why not); ``False``: always run the full head.
        vocab_chunk: head rows (vocabulary entries) per block of the chunked head.
        radius: the output radius: ``"bound"`` (``pi / max Delta``, Theorem 4.6) or ``"topk_exact"``
            (:func:`~hf_ghosts.radii.topk_radius`: the certified exact radii of the ``topk`` valid positions of
            largest spread, capped by ``pi / Delta`` of the next; a lower bound on the batch radius, never below
            the bound). Only those ``topk`` rows of logits and slopes are built (the chunked head included).
        topk: positions given an exact radius with ``radius="topk_exact"``.
        arguments: name settings in errors as the Trainer's arguments spell them (``rho_radii``, not ``radii``).

    The model may be wrapped by ``torch.compile`` (its ``_orig_mod`` is measured) or PEFT; it is called with its
    forward's inputs only (:func:`model_inputs`). A model whose attention is not routed through
    ``AttentionInterface`` (Mamba, Falcon) with ``"attention"`` in ``radii``, or an unknown FFN with ``"ffn"``, is
    refused here. MoE experts on ``_grouped_mm`` run eagerly inside a jvp probe (forward AD), then are restored.

    Settings are checked by :func:`hf_ghosts.settings.validate` (``RadiusProbe.<name>: got ...; expected ...``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        radii: tuple[str, ...] | list[str] | str = ("output", "attention"),
        estimator: str = "jvp",
        *,
        fd_step: float = 1e-2,
        ffn_mode: str = "kink",
        ffn_quantile: float = 0.01,
        ffn_spec: FfnSpec | None = None,
        shift_labels: bool | None = None,
        dtype: torch.dtype | str = torch.float32,
        chunked_head: bool | None = None,
        vocab_chunk: int = 8192,
        radius: str = DEFAULT_RADIUS,
        topk: int = DEFAULT_TOPK,
        arguments: bool = False,
    ) -> None:
        radii = parse_radii(radii)
        caller = "RhoTrainingArguments" if arguments else "RadiusProbe"
        settings = dict(radii=radii, estimator=estimator, fd_step=fd_step, ffn_mode=ffn_mode, ffn_quantile=ffn_quantile,
                        vocab_chunk=vocab_chunk, radius=radius, topk=topk)
        dtype = _checked_settings(caller, settings, dtype, arguments)
        model = original_module(model)  # torch.compile(model): measure the eager module (same parameters)
        self.model, self.radii, self.estimator, self.fd_step = model, radii, estimator, fd_step
        self.ffn_mode, self.ffn_quantile, self.dtype = ffn_mode, ffn_quantile, dtype
        self.shift_labels, self.vocab_chunk, self.radius, self.topk = shift_labels, vocab_chunk, radius, topk
        _check_attention_routed(model, radii, caller, arguments)
        self._ffn = _FfnTargets.of(model, radii, ffn_mode, ffn_spec, spelled("radii", arguments))
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._head = _LinearHead.of(model, chunked_head)
        self._eager_experts = _needs_eager_experts(model, estimator)

    # ----------------------------------------------------------------------------------- direction and weights
    def _check_direction(self, direction: Mapping[str, torch.Tensor]) -> None:
        _check_direction(type(self).__name__, direction, self.trainable)

    def _direction_and_norm(self, direction: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """The direction's tensors in the probe's dtype (no copy if they are in it already) and ``|d|``.

        ``|d| = sqrt(sum_i |d_i|^2)``, per-tensor norms by ``torch._foreach_norm``, summed in float64.
        """
        self._check_direction(direction)
        pieces = {name: d.detach().to(self.dtype) for name, d in direction.items()}
        norms = torch.stack(torch._foreach_norm(list(pieces.values()))).double()
        return pieces, self._checked_norm(float(torch.linalg.vector_norm(norms)))  # host sync

    def _checked_norm(self, norm: float) -> float:
        return _checked_norm(type(self).__name__, norm)

    def _weights(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        base = dict(self.trainable) if params is None else {**self.trainable, **params}
        return {name: t.detach().to(self.dtype) if t.is_floating_point() else t.detach() for name, t in base.items()}

    def _intact(self) -> contextlib.AbstractContextManager:
        """Around a whole measurement: what keeps the model's weights as found (nothing: forwards are functional)."""
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------- forwards
    def _forward(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        kwargs = forward_kwargs(self.model, inputs)
        output = functional_call(self.model, weights, args=(), kwargs=kwargs, strict=False, tie_weights=True)
        return _logits_of(output, self.model)

    def _run(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The forward's logits; ``None`` where the chunked head's pre-hook stopped it at the head."""
        try:
            return self._forward(weights, inputs)
        except _HeadReached:
            return None

    @contextlib.contextmanager
    def _measuring(self, inputs: Mapping[str, torch.Tensor], *, record: bool) -> Iterator[_Session]:
        """Probe mode and ghosts attention; with ``record``, the attention capture, FFN hooks and the head's stop."""
        token_mask = inputs.get("attention_mask")
        first = Pass.JVP if self.estimator == "jvp" else Pass.FD_PLUS
        session = _Session.start(first, token_mask, self.fd_step, record=record and "attention" in self.radii)
        session.wants_rows = record and self.radius == "topk_exact"
        ghosts = _routes_through_ghosts(self.model, self.radii, self.estimator)
        with contextlib.ExitStack() as stack:
            if record and self._ffn.modules:
                session.ffn = self._ffn.recorder(self.ffn_quantile, self.fd_step)
                stack.enter_context(session.ffn.attached(token_mask, first))
            if record and self._head is not None:
                stack.enter_context(_stopping_at(self._head.module, session.head_inputs))
            stack.enter_context(_probe_mode(self.model, ghosts, self._eager_experts))
            if ghosts:
                stack.enter_context(attention.capture_scores(session.capture))
            yield session

    # ----------------------------------------------------------------------------------- measure
    def measure(
        self,
        inputs: Mapping[str, torch.Tensor],
        direction: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> RadiusReport:
        """Radii of the loss along ``direction / |direction|`` at ``params`` (default: the model's weights).

        Args:
            inputs: a batch as the Trainer passes it (``input_ids``, ``attention_mask``, ``labels``, ...).
            direction: ``{parameter name: tensor}`` over trainable parameters; missing names are 0.
            params: weights to linearize at, ``{name: tensor}``; names not given use the model's own.

        Returns:
            A :class:`RadiusReport` (tensors on the model's device, no host sync).
        """
        with self._intact():
            pieces, norm = self._direction_and_norm(direction)
            weights = self._weights(params)
            self._wider_step = None
            report = self._measure_once(inputs, weights, pieces, norm)
            if self._wider_step is not None:  # fd: the differences were mostly rounding; once more at a wider step
                step, self.fd_step = self.fd_step, self._wider_step
                try:
                    report = self._measure_once(inputs, weights, pieces, norm)
                finally:
                    self.fd_step = step
            return report

    def _measure_once(self, inputs: Tensors, weights: Tensors, pieces: Tensors, norm: float) -> RadiusReport:
        with self._measuring(inputs, record=True) as session:
            path = self._jvp_spreads if self.estimator == "jvp" else self._fd_spreads
            per_position = path(session, weights, pieces, norm, inputs)
        return self._report(per_position, inputs, session)

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
            with self._measuring(inputs, record=False):
                if self.estimator == "jvp":
                    with fwAD.dual_level():
                        logits = self._forward(_dual(weights, {n: d / norm for n, d in pieces.items()}), inputs)
                        return fwAD.unpack_dual(logits).primal, _tangent(logits)
                logits = self._forward(weights, inputs)
                plus = self._forward(_shifted(weights, pieces, self.fd_step / norm), inputs)
                minus = self._forward(_shifted(weights, pieces, -self.fd_step / norm), inputs)
                return logits, (plus - minus) / (2 * self.fd_step)

    def _jvp_spreads(
        self, session: _Session, weights: Tensors, pieces: Tensors, norm: float, inputs: Tensors
    ) -> torch.Tensor | None:
        """Per position, the spread of the logit slopes along ``v = d / |d|``: one forward-mode pass."""
        unit = {name: d / norm for name, d in pieces.items()}  # the tangent v = d / |d|
        with fwAD.dual_level():
            logits = self._run(_dual(weights, unit), inputs)
            if "output" not in self.radii:
                return None
            if self._head is None:
                primal, slopes = fwAD.unpack_dual(logits).primal, _tangent(logits)
                session.offer_rows(_full_rows(slopes, primal))
                return spread(slopes.float(), dim=-1)
            hidden, hidden_slope = fwAD.unpack_dual(session.head_inputs[0])
            weight, weight_slope, bias, bias_slope = self._head.tensors(weights, unit)
            session.offer_rows(_jvp_head_rows(hidden, hidden_slope, weight, weight_slope, bias, bias_slope))
            return head.jvp_spread(hidden, hidden_slope, weight, weight_slope, bias_slope, chunk=self.vocab_chunk)

    def _fd_spreads(
        self, session: _Session, weights: Tensors, pieces: Tensors, norm: float, inputs: Tensors
    ) -> torch.Tensor | None:
        """Per position, the spread of ``(z(theta + h v) - z(theta - h v)) / 2h`` (None: no output radius)."""
        scale = self.fd_step / norm  # theta +- h v = theta +- (h / |d|) d; one copy of the weights alive at a time
        plus = self._run(_shifted(weights, pieces, scale), inputs)
        session.begin(Pass.FD_MINUS)
        minus = self._run(_shifted(weights, pieces, -scale), inputs)
        if "output" not in self.radii:
            return None
        if self._head is None:  # difference in the forward's dtype: rounding to fp32 first costs eps / h
            slopes = (plus - minus) / (2 * self.fd_step)
            session.offer_rows(_full_rows(slopes, plus, minus))
            per_position = spread(slopes.float(), dim=-1)
            self._wider_step = _fd_wider_step(plus, minus, per_position, self.fd_step)
            return per_position
        weight, weight_step, bias, bias_step = self._head.tensors(weights, pieces)
        session.offer_rows(_fd_head_rows(*session.head_inputs, weight, bias, weight_step, bias_step, scale, self.fd_step))
        return head.fd_spread(
            *session.head_inputs, weight, bias, weight_step, bias_step, scale=scale, fd_step=self.fd_step,
            chunk=self.vocab_chunk,
        )

    def _report(self, per_position: torch.Tensor | None, inputs: Tensors, session: _Session) -> RadiusReport:
        """The report from the per-position logit-slope spreads (``None``: no output radius) and the recorders."""
        out_spread = output_tokens = attn = out_radius = None
        if per_position is not None:
            shape, device = per_position.shape, per_position.device
            positions = output_positions(inputs, shape, shift_labels=_shifts(self.model, self.shift_labels), device=device)
            out_spread, output_tokens = _output_spread(per_position, positions)
            if self.radius == "topk_exact":
                out_radius = _topk_output_radius(per_position, positions, session.rows, self.topk)
        if "attention" in self.radii:
            attn = _attention_spread(session.capture, self.model)
        ffn = {name: session.ffn.radius(form) for name, form in self._ffn.forms.items()}
        return RadiusReport(
            out_spread=out_spread, attn_spread=attn, ffn_radius=ffn.get("ffn"), output_tokens=output_tokens,
            ffn_activation_radius=ffn.get("ffn_activation"), out_radius=out_radius,
        )
