"""Independent references the tests compare against, never calling ``hf_ghosts.probe`` or ``hf_ghosts.radii``:
weights moved in place and central differences in float64, pre-softmax scores recorded by an attention function of
our own, masks rebuilt from the batch, the softmax sums and their zeros in numpy, ``torch.func.jvp`` radii of a
plain classifier, a plain ``torch.optim.AdamW`` replay, and a float64 eager attention with its JVP.

Importing this module registers the recording attention (``RECORDING_ATTENTION``) with transformers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tests.helpers import flat_norm

# ----------------------------------------------------------------------------- probe references
# Independent of hf_ghosts.probe: weights moved in place, central differences in float64, the
# pre-softmax scores recorded by an attention function of our own, masks rebuilt from the batch.

RECORDING_ATTENTION = "hf_ghosts_test_recording"


def unit_direction(direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``direction / |direction|`` in float64 (the norm over all tensors together)."""
    norm = torch.sqrt(sum(d.double().pow(2).sum() for d in direction.values()))
    return {name: d.double() / norm for name, d in direction.items()}


@contextlib.contextmanager
def moved(model: torch.nn.Module, direction: Mapping[str, torch.Tensor], step: float) -> Iterator[None]:
    """The model's weights at ``theta + step * v / |v|`` (in place); restored bit for bit on exit."""
    unit = unit_direction(direction)
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in unit}
    try:
        with torch.no_grad():
            for name, d in unit.items():
                params[name].add_((step * d).to(params[name].dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def central_difference(
    model: torch.nn.Module,
    direction: Mapping[str, torch.Tensor],
    measure: Callable[[], list[torch.Tensor]],
    step: float = 1e-4,
) -> list[torch.Tensor]:
    """``(m(theta + h v) - m(theta - h v)) / 2h`` for each tensor ``measure()`` returns."""
    with moved(model, direction, step):
        plus = measure()
    with moved(model, direction, -step):
        minus = measure()
    return [(p - m) / (2 * step) for p, m in zip(plus, minus, strict=True)]


def _rms_norm_float64(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy in eval mode, for tight comparisons (probe and reference both run on it).

    Llama-style RMSNorm upcasts to float32 inside ``forward`` whatever the weights' dtype; here it
    computes in float64 so that central differences at a small step are not drowned in fp32 rounding.
    """
    model = copy.deepcopy(model).double().eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    return model


def forward_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` (labels dropped, no cache, no grad)."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        output = model(**kwargs, use_cache=False) if hasattr(model, "config") else model(**kwargs)
    return output if torch.is_tensor(output) else output.logits


def reference_logit_slopes(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], step: float = 1e-4
) -> torch.Tensor:
    """Directional derivatives of the logits along ``direction / |direction|`` by central differences."""
    (slopes,) = central_difference(model, direction, lambda: [forward_logits(model, batch).double()], step)
    return slopes


def reference_output_spreads(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], step: float = 1e-4
) -> torch.Tensor:
    """Per position (or sample), max - min over classes of the logit slopes (central differences, float64)."""
    slopes = reference_logit_slopes(model, batch, direction, step)
    return slopes.amax(-1) - slopes.amin(-1)


def causal_output_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, length]`` positions whose logits predict a label: position p predicts ``labels[p + 1]``."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    return valid


def hide_widest_label(spreads: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` with the label that the widest-spread counted position predicts set to -100, and the positions
    that still count; asserts that they are all narrower, so that a test can tell whether it was left out."""
    valid = causal_output_positions(labels)
    row, position = divmod(int(spreads.masked_fill(~valid, -1).argmax()), spreads.shape[1])
    hidden = labels.clone()
    hidden[row, position + 1] = -100
    others = causal_output_positions(hidden)
    assert spreads[others].max() < spreads[row, position]  # the test can tell the difference
    return hidden, others


def _recording_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Plain eager attention that appends ``(layer, pre-softmax scores)`` to ``_RECORDED``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scaling
    _RECORDED.append((int(module.layer_idx), scores.detach().clone()))
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


_RECORDED: list[tuple[int, torch.Tensor]] = []
AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
AttentionMaskInterface.register(RECORDING_ATTENTION, eager_mask)


def recorded_scores(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the ``[batch, heads, queries, keys]`` pre-softmax scores of one forward (no mask applied)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = RECORDING_ATTENTION
    _RECORDED.clear()
    try:
        forward_logits(model, batch)
    finally:
        model.config._attn_implementation = previous
    layers = dict(_RECORDED)
    _RECORDED.clear()
    return [layers[index] for index in sorted(layers)]


def allowed_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, queries, keys]``: key ``k <= q``, both real tokens (causal AND padding, built by hand)."""
    real = attention_mask.bool()
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal[None] & real[:, None, :] & real[:, :, None]


def reference_attention_spreads(
    model: PreTrainedModel, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], step: float = 1e-4
) -> torch.Tensor:
    """``[layers, heads]``: max over (batch, real query) of max - min over allowed keys of the score slopes."""
    slopes = central_difference(model, direction, lambda: recorded_scores(model, batch), step)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch["input_ids"].shape, dtype=torch.long)
    allowed = allowed_keys(mask)[:, None]  # [batch, 1, q, k]
    result = []
    for layer in slopes:
        high = layer.masked_fill(~allowed, -math.inf).amax(-1)
        low = layer.masked_fill(~allowed, math.inf).amin(-1)
        row_spread = torch.where(allowed.any(-1), high - low, torch.zeros_like(high))  # [batch, heads, q]
        result.append(row_spread.amax(dim=(0, 2)))
    return torch.stack(result)


def module_outputs(model: torch.nn.Module, suffix: str, run: Callable[[], object]) -> list[torch.Tensor]:
    """Outputs of every module whose name ends with ``suffix`` during ``run()``, in module order."""
    found = [(name, module) for name, module in model.named_modules() if name.endswith(suffix)]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out.detach().clone()))
        for name, module in found
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[name] for name, _ in found]


# ----------------------------------------------------------------------------- softmax sums in numpy
# Independent of hf_ghosts.radii: F(t) = sum_k softmax(z)_k e^{a_k t} and its zeros, for radius references.


def softmax_weights(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def exp_sum(logits: np.ndarray, slopes: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``F(t) = sum_k w_k e^{a_k t}``, ``F'(t)`` and ``sum_k |w_k e^{a_k t}|`` at complex points ``t`` (numpy)."""
    terms = softmax_weights(logits)[:, None] * np.exp(slopes[:, None] * np.asarray(t, dtype=complex).reshape(1, -1))
    return terms.sum(0), (slopes[:, None] * terms).sum(0), np.abs(terms).sum(0)


def turns(logits: np.ndarray, slopes: np.ndarray, radius: float, points: int) -> float:
    """Winding number of ``F`` around ``|t| = radius``: the number of zeros inside (argument principle)."""
    values, _, _ = exp_sum(logits, slopes, radius * np.exp(2j * np.pi * np.arange(points) / points))
    return float(np.angle(np.roll(values, -1) / values).sum() / (2 * np.pi))


def polynomial_radius(logits: np.ndarray, powers: np.ndarray) -> float:
    """Exact radius for integer slopes: with ``x = e^t``, ``F`` is a polynomial; its roots give every zero.

    A root ``x`` gives ``t = log|x| + i (arg x + 2 pi n)``; the nearest is ``n = 0`` (``arg`` in ``(-pi, pi]``).
    """
    degree = int(powers.max())
    coefficients = np.zeros(degree + 1)
    np.add.at(coefficients, degree - powers, softmax_weights(logits))
    return min(abs(complex(math.log(abs(x)), np.angle(x))) for x in np.roots(coefficients))


# ----------------------------------------------------------------------------- optimizer and plain-loop references
class AdamWReplay:
    """A plain ``torch.optim.AdamW`` on copies of ``model``'s parameters, with ``optimizer``'s groups and options.

    :meth:`propose`, called with the model at its old weights and gradients, copies them and the groups'
    current learning rates, steps, and returns ``u`` (name -> tensor): the update AdamW proposes. Called once
    per real step, its moments follow the real optimizer's (``optimizer`` may be Accelerate's wrapper).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.real = getattr(optimizer, "optimizer", optimizer)
        names = {p: name for name, p in model.named_parameters()}
        self.copies = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
        groups = [
            {**{key: value for key, value in group.items() if key != "params"}, "params": [self.copies[names[p]] for p in group["params"]]}
            for group in self.real.param_groups
        ]
        self.reference = torch.optim.AdamW(groups)

    def propose(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self.copies[name].copy_(p)
                self.copies[name].grad = None if p.grad is None else p.grad.clone()
            for mine, theirs in zip(self.reference.param_groups, self.real.param_groups, strict=True):
                mine["lr"] = theirs["lr"]
        old = {name: c.detach().clone() for name, c in self.copies.items()}
        self.reference.step()
        return {name: self.copies[name].detach() - old[name] for name in old}


def reference_rho(model: nn.Module, at: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """``pi / max_i (max_k a_ik - min_k a_ik)`` with ``a = J v``, ``v = direction / |direction|`` (eq. 11, 14), float64."""
    model64 = copy.deepcopy(model).double()
    norm = flat_norm(direction)
    primal = {name: t.double() for name, t in at.items()}
    tangent = {name: t.double() / norm for name, t in direction.items()}
    _, slopes = jvp(lambda params: functional_call(model64, params, (x.double(),)), (primal,), (tangent,))
    return math.pi / float((slopes.amax(-1) - slopes.amin(-1)).amax())


# ------------------------------------------------------------------------------------------ attention JVP references
def reference_allowed(batch, heads, q_len, k_len, *, causal=True, window=None, key_padding=None, query_rows=None):
    """``[B, H, Tq, Tk]`` bool, from the definition: query i sits at i + Tk - Tq."""
    allowed = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        pos = i + k_len - q_len
        for j in range(k_len):
            if causal and (j > pos or (window is not None and j <= pos - window)):
                allowed[:, :, i, j] = False
    if key_padding is not None:
        allowed &= key_padding[:, None, None, :]
    return allowed


def attention_reference(q, k, v, tq, tk, tv, allowed, *, scaling, softcap=None, query_mask=None, bias=None):
    """float64 eager attention (repeat_interleave for GQA) and torch.func.jvp; spread [B, H, Tq] (-inf: empty).
    ``bias``: added to the scores after the cap (an additive mask's values, e.g. ALiBi), as sdpa adds it."""
    q, k, v, tq, tk, tv = (t.double() for t in (q, k, v, tq, tk, tv))
    groups = q.shape[1] // k.shape[1]

    def forward(q, k, v):
        kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = q @ kr.transpose(-1, -2) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        biased = scores if bias is None else scores + bias.double()
        weights = torch.softmax(biased.masked_fill(~allowed, -math.inf), dim=-1)
        weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros_like(weights))
        return (weights @ vr).transpose(1, 2), scores

    (out, _), (tangent, slopes) = torch.func.jvp(forward, (q, k, v), (tq, tk, tv))
    high = slopes.masked_fill(~allowed, -math.inf).amax(-1)
    low = slopes.masked_fill(~allowed, math.inf).amin(-1)
    rows = torch.where(allowed.any(-1), high - low, -math.inf)
    if query_mask is not None:
        rows = rows.masked_fill(~query_mask[:, None, :], -math.inf)
    return out, tangent, rows


def attention_inputs(batch=2, heads=4, kv_heads=4, q_len=9, k_len=None, dim=8, dtype=torch.float64, seed=0):
    """q, k, v and their tangents (GQA when ``kv_heads < heads``; v one wider than q and k), float64 draws in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    k_len = q_len if k_len is None else k_len
    shapes = [(batch, heads, q_len, dim), (batch, kv_heads, k_len, dim), (batch, kv_heads, k_len, dim + 2)]
    primals = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    tangents = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    # [B, H, T, D] as transformers hands it over: a transposed view of [B, T, H, D]
    primals[0] = primals[0].transpose(1, 2).contiguous().transpose(1, 2)
    return [t.to(dtype) for t in primals + tangents]
