"""`RadiusProbe`: measure the convergence radii of a model along a parameter-space direction.

One forward-mode JVP (or two forwards for central finite differences) at given weights along a
unit direction ``v`` yields the slopes of the logits, of every head's attention scores and of the
FFN pre-activations; :mod:`hf_ghosts.radii` turns them into radii. The model is left exactly as
found: same weights, same train/eval flags, same attention implementation, no gradients touched.

For a causal LM whose logits are ``lm_head(x)`` of a plain linear head (:data:`LINEAR_HEAD_MODELS`)
the forward stops at the head's input ``x`` and the logit slopes are computed from ``x`` block by
block over the vocabulary, so the ``[batch, seq, vocab]`` logits and their tangent never exist
(see ``chunked_head``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call

from hf_ghosts import attention
from hf_ghosts.architectures import FfnSpec, find_ffn_modules, resolve_ffn_spec
from hf_ghosts.radii import activation_radius, rho_bound, spread

try:  # torch >= 2.6
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ESTIMATORS", "FFN_MODES", "LINEAR_HEAD_MODELS", "LOGIT_RESCALING_ATTRS", "RADII", "RadiusProbe", "RadiusReport"]

RADII = ("output", "attention", "ffn")
ESTIMATORS = ("jvp", "fd")
FFN_MODES = ("kink", "activation")
IGNORE_INDEX = -100

# model_type -> the causal-LM class whose forward (transformers 5.23) returns ``logits = self.lm_head(x)``
# unchanged (``x`` the last hidden state, sliced by ``logits_to_keep``): no softcapping, scaling or bias after it.
# Not gemma2/gemma3 (final_logit_softcapping), cohere (logit_scale), granite (logits_scaling).
LINEAR_HEAD_MODELS = {
    "gemma": "GemmaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gptj": "GPTJForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "opt": "OPTForCausalLM",
    "phi": "PhiForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Config attributes with which other transformers models rescale or cap the logits after the head.
LOGIT_RESCALING_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "logits_soft_cap",
    "output_logit_soft_cap",
    "output_multiplier",
    "logits_mup_width_multiplier",
    "lm_head_multiplier",
)


class _HeadReached(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by the head's pre-hook: the forward stops where the full-vocabulary head would run."""


@dataclass(frozen=True)
class RadiusReport:
    """Spreads measured along a unit direction, and the radii they imply.

    The raw fields reduce across processes: ``out_spread`` and ``attn_spread`` with MAX,
    ``ffn_radius`` with MIN, ``output_tokens`` with SUM.

    Attributes:
        out_spread: scalar, max over valid positions of the logit-slope spread (0 if none).
        attn_spread: ``[layers, heads]``, max over batch and query rows of the score-slope spread.
        ffn_radius: scalar, FFN radius (kink proxy quantile or activation-aware minimum).
        output_tokens: scalar count of positions that entered ``out_spread``.
    """

    out_spread: torch.Tensor | None = None
    attn_spread: torch.Tensor | None = None
    ffn_radius: torch.Tensor | None = None
    output_tokens: torch.Tensor | None = None

    @property
    def rho_out(self) -> torch.Tensor | None:
        """``pi / out_spread``: the output softmax radius (eq. 14); inf without valid positions."""
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
        """Each measured radius as a scalar tensor: ``{"output": ..., "attention": min over heads, "ffn": ...}``."""
        found: dict[str, torch.Tensor] = {}
        if self.out_spread is not None:
            found["output"] = self.rho_out
        if self.attn_spread is not None:
            found["attention"] = self.rho_attn.amin() if self.attn_spread.numel() else torch.tensor(math.inf)
        if self.ffn_radius is not None:
            found["ffn"] = self.ffn_radius
        return found

    @property
    def rho(self) -> torch.Tensor:
        """The binding radius: the minimum of the radii measured."""
        values = list(self.radii().values())
        if not values:
            raise ValueError("RadiusReport: no radius was measured")
        return torch.stack([v.to(values[0].device, torch.float32) for v in values]).amin()

    @property
    def bottleneck(self) -> str:
        """Name of the binding radius (``"output"``, ``"attention"`` or ``"ffn"``); ``"none"`` if all are inf."""
        radii = self.radii()
        name, value = min(radii.items(), key=lambda item: float(item[1]))
        return name if math.isfinite(float(value)) else "none"

    def map(self, fn_max, fn_min, fn_sum) -> RadiusReport:
        """Apply reductions field-wise (MAX to spreads, MIN to the FFN radius, SUM to counts)."""
        return replace(
            self,
            out_spread=None if self.out_spread is None else fn_max(self.out_spread),
            attn_spread=None if self.attn_spread is None else fn_max(self.attn_spread),
            ffn_radius=None if self.ffn_radius is None else fn_min(self.ffn_radius),
            output_tokens=None if self.output_tokens is None else fn_sum(self.output_tokens),
        )


def _stop_at_head(captured: list[torch.Tensor]) -> Callable[[torch.nn.Module, tuple], None]:
    """A forward pre-hook for the output head: append its input ``x`` to ``captured`` and stop the forward."""

    def hook(module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _HeadReached

    return hook


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


class RadiusProbe:
    """Measure output, per-head attention and FFN radii of ``model`` along a direction.

    Args:
        model: a ``transformers`` model (or any module returning logits, for the output radius).
        radii: which radii to measure, a subset of ``("output", "attention", "ffn")``.
        estimator: ``"jvp"`` (forward-mode AD, exact) or ``"fd"`` (central difference
            ``(z(theta + h v) - z(theta - h v)) / 2h``, no forward AD needed; error ``O(h^2)``).
        fd_step: ``h`` for ``"fd"``, a length in parameter space along the unit direction.
        ffn_mode: ``"kink"`` (the paper's proxy, the ``ffn_quantile`` quantile of ``|z| / |z'|``)
            or ``"activation"`` (min over neurons of :func:`~hf_ghosts.radii.activation_radius`
            with the model's configured activation).
        ffn_quantile: quantile of the kink proxy (paper: 1%).
        ffn_spec: where the FFN pre-activations live, for a ``model_type`` not in
            :data:`~hf_ghosts.architectures.FFN_PREACTIVATIONS`.
        shift_labels: whether logits at position ``t`` predict ``labels[t + 1]`` (causal LM).
            ``None``: True for generative models, False otherwise.
        dtype: dtype of the probe's forward (float32: the radius of a bf16 run is measured in fp32).
        chunked_head: stop the forward at the output head's input ``x`` and compute the logit slopes
            ``a = x' W^T + x W'^T + b'`` (``"fd"``: ``(x+ (W + hW')^T - x- (W - hW')^T) / 2h``, biases
            likewise) over ``vocab_chunk`` rows of the head at a time, keeping only each position's
            running max and min: the ``[batch, seq, vocab]`` logits are never built. ``None``: whenever that is provably
            the same computation (a :data:`LINEAR_HEAD_MODELS` class, no :data:`LOGIT_RESCALING_ATTRS`
            set, a plain ``nn.Linear`` head without hooks, not sharded); ``True``: require it (ValueError
            saying why not); ``False``: always run the full head.
        vocab_chunk: head rows (vocabulary entries) per block of the chunked head.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        radii: tuple[str, ...] | list[str] = ("output", "attention"),
        estimator: str = "jvp",
        *,
        fd_step: float = 1e-2,
        ffn_mode: str = "kink",
        ffn_quantile: float = 0.01,
        ffn_spec: FfnSpec | None = None,
        shift_labels: bool | None = None,
        dtype: torch.dtype = torch.float32,
        chunked_head: bool | None = None,
        vocab_chunk: int = 8192,
    ) -> None:
        radii = tuple(radii)
        unknown = [name for name in radii if name not in RADII]
        if not radii or unknown:
            raise ValueError(f"RadiusProbe: radii must be a non-empty subset of {RADII}; got {radii}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"RadiusProbe: estimator must be one of {ESTIMATORS}; got {estimator!r}")
        if ffn_mode not in FFN_MODES:
            raise ValueError(f"RadiusProbe: ffn_mode must be one of {FFN_MODES}; got {ffn_mode!r}")
        if not 0 < ffn_quantile < 1:
            raise ValueError(f"RadiusProbe: ffn_quantile must lie in (0, 1); got {ffn_quantile}")
        if not fd_step > 0:
            raise ValueError(f"RadiusProbe: fd_step must be > 0; got {fd_step}")
        if isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int) or vocab_chunk < 1:
            raise ValueError(f"RadiusProbe: vocab_chunk must be a positive int; got {vocab_chunk!r}")
        self.model = model
        self.radii = radii
        self.estimator = estimator
        self.fd_step = fd_step
        self.ffn_mode = ffn_mode
        self.ffn_quantile = ffn_quantile
        self.dtype = dtype
        self.shift_labels = shift_labels
        self.vocab_chunk = vocab_chunk
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if "attention" in radii:
            if not self._can_set_attention():
                raise ValueError(
                    f"The attention radius needs attention routed through transformers' AttentionInterface; "
                    f"model_type {model_type!r} ({type(model).__name__}) does not. Pass radii=('output',) "
                    "(or ('output', 'ffn'))."
                )
        self._ffn_modules: dict[str, torch.nn.Module] = {}
        self._activation = None
        if "ffn" in radii:
            spec = resolve_ffn_spec(model, ffn_spec)
            self._ffn_modules = find_ffn_modules(model, spec)
            if ffn_mode == "activation":
                self._activation = getattr(model.config, spec.activation_attr, None)
                if not isinstance(self._activation, str):
                    raise ValueError(
                        f"RadiusProbe: config.{spec.activation_attr} of {model_type!r} is {self._activation!r}, not an "
                        "activation name; use ffn_mode='kink'"
                    )
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._head: torch.nn.Linear | None = None
        if chunked_head is not False:
            blocker = self._chunked_head_blocker()
            if blocker is None:
                self._head = model.get_output_embeddings()
                # named_parameters() names a tied weight once: the name the direction and weights use
                names = {id(p): name for name, p in model.named_parameters()}
                self._head_names = (names[id(self._head.weight)], names.get(id(self._head.bias)))
            elif chunked_head:
                raise ValueError(
                    f"RadiusProbe: chunked_head=True, but {blocker}. Pass chunked_head=None to fall back to the "
                    "full logits automatically (or chunked_head=False)"
                )

    def _chunked_head_blocker(self) -> str | None:
        """Why the logits are not provably ``lm_head(x)`` of a plain linear head; ``None`` if they are."""
        model = self.model
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        expected = LINEAR_HEAD_MODELS.get(model_type)
        cls = type(model)
        if expected is None or (cls.__module__, cls.__name__) != (
            f"transformers.models.{model_type}.modeling_{model_type}",
            expected,
        ):
            return (
                f"{cls.__name__} (model_type {model_type!r}) is not one of the causal LMs whose logits are known to be "
                f"their linear head's output unchanged ({', '.join(sorted(LINEAR_HEAD_MODELS.values()))})"
            )
        for attr in LOGIT_RESCALING_ATTRS:
            if getattr(config, attr, None) is not None:
                return f"config.{attr}={getattr(config, attr)!r} may rescale or cap the logits after the head"
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear:
            return f"its output embedding is a {type(head).__name__}, not a plain torch.nn.Linear"
        if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
            return "its output head has forward hooks or a replaced forward, which may change the logits"
        if DTensor is not None and any(isinstance(p, DTensor) for p in head.parameters()):
            return "its output head is sharded (DTensor); the chunked head needs the full weight matrix"
        return None

    def _can_set_attention(self) -> bool:
        can_set = getattr(self.model, "_can_set_attn_implementation", None)
        return bool(can_set()) if callable(can_set) else False

    # ----------------------------------------------------------------------------------- masks
    def _shifts(self) -> bool:
        if self.shift_labels is not None:
            return self.shift_labels
        can_generate = getattr(self.model, "can_generate", None)
        return bool(can_generate()) if callable(can_generate) else False

    def _output_positions(
        self, shape: torch.Size, device: torch.device, inputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Boolean mask over ``shape`` (the logits' shape without the class dim) of the positions that are softmax samples."""
        labels = inputs.get("labels")
        if labels is not None and labels.shape[: len(shape)] == shape and not self._shifts():
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

    # ----------------------------------------------------------------------------------- model state
    def _routes_through_ghosts(self) -> bool:
        """Whether the probe's forward runs the ghosts attention (eager inside a probe).

        Always to measure attention; and for a JVP through a model set to sdpa or flash, which have
        no forward-mode AD. Ghosts, not plain eager: it outputs 0 for a query with no allowed key
        (left padding) as sdpa does, so the probe's logits equal the training forward's.
        """
        if "attention" in self.radii:
            return True
        implementation = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        return self.estimator == "jvp" and implementation not in (None, "eager") and self._can_set_attention()

    @contextlib.contextmanager
    def _probe_mode(self, ghosts: bool) -> Iterator[None]:
        """Eval mode, fp32 forward without Accelerate's autocast wrapper, ghosts attention; all restored."""
        model = self.model
        training = {module: module.training for module in model.modules()}
        wrapped_forward = model.__dict__.get("forward")
        original_forward = getattr(model, "_original_forward", None)
        config = getattr(model, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        model.eval()
        if wrapped_forward is not None and original_forward is not None:
            model.forward = original_forward
        if ghosts:
            config._attn_implementation = attention.ATTENTION_NAME
        try:
            device_type = next(model.parameters()).device.type
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                yield
        finally:
            if ghosts:
                config._attn_implementation = implementation
            if wrapped_forward is not None:
                model.forward = wrapped_forward
            for module, flag in training.items():
                module.training = flag

    # ----------------------------------------------------------------------------------- measure
    def _check_direction(self, direction: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(direction) - set(self.trainable))
        if unknown:
            raise KeyError(f"{type(self).__name__}.measure: direction names parameters the model does not train: {unknown[:5]}")
        if not direction:
            raise ValueError(f"{type(self).__name__}.measure: the direction is empty")

    def _direction_and_norm(self, direction: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """The direction's tensors in the probe's dtype (no copy if they are in it already) and ``|d|``.

        ``|d| = sqrt(sum_i |d_i|^2)``, per-tensor norms by ``torch._foreach_norm``, summed in float64.
        """
        self._check_direction(direction)
        pieces = {name: d.detach().to(self.dtype) for name, d in direction.items()}
        norms = torch.stack(torch._foreach_norm(list(pieces.values()))).double()
        return pieces, self._checked_norm(float(torch.linalg.vector_norm(norms)))  # host sync

    def _checked_norm(self, norm: float) -> float:
        if not math.isfinite(norm) or norm == 0:
            raise ValueError(
                f"{type(self).__name__}.measure: the direction's norm is {norm}; a radius needs a finite, non-zero "
                "direction (a zero update has nothing to measure; a NaN update must be rejected before probing)"
            )
        return norm

    def _weights(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        base = dict(self.trainable) if params is None else {**self.trainable, **params}
        return {name: t.detach().to(self.dtype) if t.is_floating_point() else t.detach() for name, t in base.items()}

    def _forward_kwargs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The batch without what would make the model compute a loss, and without a KV cache."""
        kwargs: dict[str, object] = {
            key: value for key, value in inputs.items() if key not in ("labels", "shift_labels", "num_items_in_batch")
        }
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            kwargs["use_cache"] = False
        return kwargs

    def _forward(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        kwargs = self._forward_kwargs(inputs)
        output = functional_call(self.model, weights, args=(), kwargs=kwargs, strict=False, tie_weights=True)
        return _logits_of(output, self.model)

    def _run(self, weights: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The forward's logits; ``None`` where the chunked head's pre-hook stopped it at the head."""
        try:
            return self._forward(weights, inputs)
        except _HeadReached:
            return None

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
        pieces, norm = self._direction_and_norm(direction)
        weights = self._weights(params)
        token_mask = inputs.get("attention_mask")
        capture = attention.ScoreCapture(
            mode="jvp" if self.estimator == "jvp" else "fd_plus",
            query_mask=None if token_mask is None else token_mask.bool(),
            fd_step=self.fd_step,
            record="attention" in self.radii,
        )
        ghosts = self._routes_through_ghosts()
        ffn_state: dict[str, object] = {"plus": {}, "values": [], "phase": capture.mode}
        hooks = [
            module.register_forward_hook(self._ffn_hook(name, ffn_state, token_mask))
            for name, module in self._ffn_modules.items()
        ]
        head_inputs: list[torch.Tensor] = []
        if self._head is not None:
            hooks.append(self._head.register_forward_pre_hook(_stop_at_head(head_inputs)))
        per_position = None
        try:
            with self._probe_mode(ghosts), attention.capture_scores(capture) if ghosts else contextlib.nullcontext():
                if self.estimator == "jvp":
                    unit = {name: d / norm for name, d in pieces.items()}  # the tangent v = d / |d|
                    with fwAD.dual_level():
                        dual = {
                            name: fwAD.make_dual(weights[name], unit[name]) if name in unit else value
                            for name, value in weights.items()
                        }
                        logits = self._run(dual, inputs)
                        if "output" in self.radii and self._head is not None:
                            per_position = self._chunked_jvp_spread(head_inputs[0], weights, unit)
                        elif "output" in self.radii:
                            primal, slopes = fwAD.unpack_dual(logits)
                            if slopes is None:
                                slopes = torch.zeros_like(primal)
                            per_position = spread(slopes.float(), dim=-1)
                else:
                    step = self.fd_step / norm  # theta +- h v = theta +- (h / |d|) d: no copy of v

                    def shifted(sign: float) -> dict[str, torch.Tensor]:  # one copy of the weights alive at a time
                        alpha = sign * step
                        return {n: torch.add(w, pieces[n], alpha=alpha) if n in pieces else w for n, w in weights.items()}

                    logits_plus = self._run(shifted(1.0), inputs)
                    capture.mode = ffn_state["phase"] = "fd_minus"
                    capture.calls = 0
                    logits_minus = self._run(shifted(-1.0), inputs)
                    if "output" in self.radii and self._head is not None:
                        per_position = self._chunked_fd_spread(head_inputs[0], head_inputs[1], weights, pieces, step)
                    elif "output" in self.radii:
                        # difference in the forward's dtype: rounding to fp32 first costs eps / h
                        per_position = spread(((logits_plus - logits_minus) / (2 * self.fd_step)).float(), dim=-1)
        finally:
            for hook in hooks:
                hook.remove()
        return self._report(per_position, inputs, capture, ffn_state)

    # ----------------------------------------------------------------------------------- chunked head
    def _head_tensors(
        self, weights: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``W, W', b, b'`` of the head: weights as the forward sees them, ``W'``/``b'`` the direction's
        entries for them (the unit direction's for jvp, the raw one's for fd); ``None`` where it has none."""
        weight_name, bias_name = self._head_names
        weight = weights.get(weight_name, self._head.weight.detach())  # absent: frozen, the module's own
        bias = None if bias_name is None else weights.get(bias_name, self._head.bias.detach())
        return weight, direction.get(weight_name), bias, None if bias_name is None else direction.get(bias_name)

    def _blockwise_spread(self, rows: int, block: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Per position ``max_k a_k - min_k a_k`` over ``rows`` classes, ``a`` built ``vocab_chunk`` rows at a time."""
        high = low = None
        for start in range(0, rows, self.vocab_chunk):
            block_low, block_high = torch.aminmax(block(slice(start, start + self.vocab_chunk)), dim=-1)
            high = block_high if high is None else torch.maximum(high, block_high)
            low = block_low if low is None else torch.minimum(low, block_low)
        # the spread of the two extremes is high - low, with spread's check for NaN and inf
        return spread(torch.stack((high.float(), low.float()), dim=-1), dim=-1)

    def _chunked_jvp_spread(
        self, hidden: torch.Tensor, weights: Mapping[str, torch.Tensor], unit: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Spread of ``a = x' W^T + x W'^T + b'`` (``hidden`` the head's dual input ``x + x' eps``), per position."""
        primal, tangent = fwAD.unpack_dual(hidden)
        if tangent is None:
            tangent = torch.zeros_like(primal)
        weight, weight_slope, _, bias_slope = self._head_tensors(weights, unit)

        def block(rows: slice) -> torch.Tensor:
            slopes = F.linear(tangent, weight[rows], None if bias_slope is None else bias_slope[rows])
            return slopes if weight_slope is None else slopes + F.linear(primal, weight_slope[rows])

        return self._blockwise_spread(weight.shape[0], block)

    def _chunked_fd_spread(
        self,
        hidden_plus: torch.Tensor,
        hidden_minus: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
        direction: Mapping[str, torch.Tensor],
        step: float,
    ) -> torch.Tensor:
        """Spread of ``a = (z+ - z-) / 2h``, ``z+- = x+- (W +- hW')^T + b +- hb'``, per position (difference in the forward dtype).

        ``W' = d_W / |d|``: the head's rows are moved by ``+- step * d_W`` with ``step = h / |d|``.
        """
        weight, weight_slope, bias, bias_slope = self._head_tensors(weights, direction)

        def moved(value: torch.Tensor | None, slope: torch.Tensor | None, rows: slice, sign: float) -> torch.Tensor | None:
            if value is None or slope is None:
                return None if value is None else value[rows]
            return torch.add(value[rows], slope[rows], alpha=sign * step)

        def block(rows: slice) -> torch.Tensor:
            plus = F.linear(hidden_plus, moved(weight, weight_slope, rows, 1.0), moved(bias, bias_slope, rows, 1.0))
            minus = F.linear(hidden_minus, moved(weight, weight_slope, rows, -1.0), moved(bias, bias_slope, rows, -1.0))
            return (plus - minus) / (2 * self.fd_step)

        return self._blockwise_spread(weight.shape[0], block)

    def _ffn_hook(self, name: str, state: dict, token_mask: torch.Tensor | None):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            primal, tangent = fwAD.unpack_dual(output)
            if state["phase"] == "fd_plus":
                state["plus"][name] = primal.detach()
                return
            if state["phase"] == "fd_minus":
                plus = state["plus"].pop(name)
                tangent = (plus - primal) / (2 * self.fd_step)
                primal = (plus + primal) / 2
            elif tangent is None:
                tangent = torch.zeros_like(primal)
            primal, tangent = primal.float(), tangent.float()
            if token_mask is not None and token_mask.shape == primal.shape[:2]:
                keep = token_mask.bool()
                primal, tangent = primal[keep], tangent[keep]
            if self.ffn_mode == "activation":
                state["values"].append(activation_radius(primal, tangent, self._activation).amin().reshape(1))
            else:
                magnitude = tangent.abs()
                ratio = torch.where(magnitude > 0, primal.abs() / magnitude, torch.full_like(magnitude, math.inf))
                state["values"].append(ratio.reshape(-1))

        return hook

    def _report(
        self,
        per_position: torch.Tensor | None,
        inputs: Mapping[str, torch.Tensor],
        capture: attention.ScoreCapture,
        ffn_state: dict,
    ) -> RadiusReport:
        """The report from the per-position logit-slope spreads (``None`` without the output radius) and the hooks' records."""
        out_spread = output_tokens = attn = ffn = None
        if "output" in self.radii:
            positions = self._output_positions(per_position.shape, per_position.device, inputs)
            output_tokens = positions.sum()
            out_spread = torch.where(positions, per_position, torch.zeros_like(per_position)).amax() if per_position.numel() else per_position.new_zeros(())
        if "attention" in self.radii:
            if not capture.spreads:
                model_type = getattr(getattr(self.model, "config", None), "model_type", type(self.model).__name__)
                raise ValueError(
                    f"No attention call of model_type {model_type!r} went through the ghosts attention; its attention "
                    "cannot be measured. Pass radii=('output',)"
                )
            attn = torch.stack([capture.spreads[layer] for layer in sorted(capture.spreads)])
        if "ffn" in self.radii:
            values = torch.cat(ffn_state["values"])
            if self.ffn_mode == "activation":
                ffn = values.amin()
            elif values.numel() == 0:
                ffn = torch.tensor(math.inf, device=values.device)
            else:
                rank = max(1, math.ceil(self.ffn_quantile * values.numel()))
                ffn = values.kthvalue(rank).values
        return RadiusReport(out_spread=out_spread, attn_spread=attn, ffn_radius=ffn, output_tokens=output_tokens)
