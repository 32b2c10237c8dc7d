"""RadiusProbe's chunked output head against the full head and independent float64 references.

``chunked_head=True`` stops the forward at the head's input and builds the logit slopes a block of
``vocab_chunk`` vocabulary rows at a time; ``chunked_head=False`` runs the model's own head. Tight
comparisons run on float64 copies with ``dtype=torch.float64`` and ``vocab_chunk=7`` (256 rows:
36 blocks of 7 and one of 4). References come from tests/references.py and never call hf_ghosts.probe.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoXForSequenceClassification,
    LlamaForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_ghosts import RadiusProbe, RadiusReport
from hf_ghosts.architectures import ARCHITECTURES, LINEAR_HEAD_MODELS, find_ffn_modules, resolve_ffn_activation
from hf_ghosts.probe import head
from tests.helpers import FAMILIES, VOCAB, random_direction, tiny_causal_lm, tiny_config, token_batch
from tests.references import (
    causal_output_positions,
    float64_copy,
    forward_logits,
    hide_widest_label,
    module_outputs,
    reference_logit_slopes,
    reference_output_spreads,
)

F64 = torch.float64
ESTIMATORS = ("jvp", "fd")
CHUNK = 7
FIELDS = ("out_spread", "attn_spread", "ffn_radius", "output_tokens")
# The report holds float32 spreads: float64 slopes computed in another order may round one ulp apart.
F32_ULP = 2.0**-23
pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
SHAPES = {
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gptj": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0,
                 eos_token_id=0),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "gemma": dict(SMALL, head_dim=8),
}


def tiny_linear_head_lm(model_type: str) -> torch.nn.Module:
    """A float64 2-layer causal LM of ``model_type`` built from its config (no hub)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SHAPES.get(model_type, SMALL))
    return float64_copy(AutoModelForCausalLM.from_config(config))


def measurable(model: torch.nn.Module) -> tuple[str, ...]:
    """Output and FFN radii, and the attention radius where the model routes attention through the interface."""
    return ("output", "ffn") + (("attention",) if model._can_set_attn_implementation() else ())


def f64_probe(model: torch.nn.Module, radii_: tuple[str, ...] = ("output",), estimator: str = "jvp", **kwargs) -> RadiusProbe:
    return RadiusProbe(model, radii_, estimator, dtype=F64, **kwargs)


def chunked_and_full(
    model: torch.nn.Module, batch: dict, direction: dict, radii_: tuple[str, ...], estimator: str, **kwargs
) -> tuple[RadiusReport, RadiusReport]:
    chunked = f64_probe(model, radii_, estimator, chunked_head=True, vocab_chunk=CHUNK, **kwargs).measure(batch, direction)
    full = f64_probe(model, radii_, estimator, chunked_head=False, **kwargs).measure(batch, direction)
    return chunked, full


def assert_same_report(chunked: RadiusReport, full: RadiusReport, rtol: float = F32_ULP) -> None:
    for field in FIELDS:
        mine, theirs = getattr(chunked, field), getattr(full, field)
        assert (mine is None) == (theirs is None), field
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=rtol, atol=0, msg=lambda text, field=field: f"{field}: {text}")


# ------------------------------------------------------------------------------------------ same as the full head
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunked_head_reports_what_the_full_head_reports(family: str, estimator: str, linear_calls) -> None:
    model = float64_copy(tiny_causal_lm(family))
    batch = token_batch(batch=3, pad_left=3, pad_right=2)
    direction = random_direction(model)
    head = model.get_output_embeddings()
    chunked = f64_probe(model, measurable(model), estimator, chunked_head=True, vocab_chunk=CHUNK).measure(batch, direction)
    assert linear_calls[head] == 0
    full = f64_probe(model, measurable(model), estimator, chunked_head=False).measure(batch, direction)
    assert linear_calls[head] == (1 if estimator == "jvp" else 4)  # fd's first probe checks its step: h and h/2
    assert_same_report(chunked, full)
    assert chunked.out_spread.dtype == full.out_spread.dtype == torch.float32


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float32_chunked_head_matches_the_full_head(family: str, estimator: str) -> None:
    model = tiny_causal_lm(family)
    batch = token_batch(batch=3, pad_right=4)
    direction = random_direction(model)
    radii_ = ("output", "attention", "ffn")
    chunked = RadiusProbe(model, radii_, estimator, chunked_head=True, vocab_chunk=CHUNK).measure(batch, direction)
    full = RadiusProbe(model, radii_, estimator, chunked_head=False).measure(batch, direction)
    # fd in float32 differences logits that agree to ~eps: a change in summation order shows at ~eps / h
    assert_same_report(chunked, full, rtol=1e-5 if estimator == "jvp" else 1e-4)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_entry_names_what_its_model_has(model_type: str) -> None:
    # The table against transformers: the causal-LM class, and per layer a module whose output is what the
    # configured activation's module receives.
    model = tiny_linear_head_lm(model_type)
    entry = ARCHITECTURES[model_type]
    assert type(model).__name__ == entry.linear_head
    preactivations = find_ffn_modules(model, entry.ffn)
    assert len(preactivations) == model.config.num_hidden_layers == 2
    activation = type(ACT2FN[resolve_ffn_activation(model, entry.ffn)])
    fed: list[torch.Tensor] = []
    activations = [m for m in model.modules() if type(m) is activation]
    hooks = [m.register_forward_pre_hook(lambda _m, args: fed.append(args[0])) for m in activations]
    batch = token_batch(batch=1, length=6)
    try:
        outputs = module_outputs(model, entry.ffn.module_suffix, lambda: forward_logits(model, batch))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs) == 2 and all(any(torch.equal(z, a) for a in fed) for z in outputs)


@pytest.mark.parametrize("model_type", sorted(LINEAR_HEAD_MODELS))
def test_every_listed_family_gets_the_same_report(model_type: str) -> None:
    # Each allowlisted class really is lm_head(x) unchanged: a family that post-processed its logits would differ here.
    model = tiny_linear_head_lm(model_type)
    assert type(model).__name__ == LINEAR_HEAD_MODELS[model_type]
    batch = token_batch(batch=2, length=10, pad_left=2)
    direction = random_direction(model)
    for estimator in ESTIMATORS:
        assert_same_report(*chunked_and_full(model, batch, direction, measurable(model), estimator))


@pytest.mark.parametrize("chunk", [1, 5, VOCAB - 1, VOCAB, 10**6])
def test_any_block_size_gives_the_same_spread(chunk: int) -> None:
    model = float64_copy(tiny_causal_lm("llama"))
    batch = token_batch(batch=2, pad_right=3)
    direction = random_direction(model)
    chunked = f64_probe(model, chunked_head=True, vocab_chunk=chunk).measure(batch, direction)
    assert_same_report(chunked, f64_probe(model, chunked_head=False).measure(batch, direction))


# ------------------------------------------------------------------------------------------ against references
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunked_head_matches_float64_central_differences(family: str, estimator: str) -> None:
    model = float64_copy(tiny_causal_lm(family))
    batch = token_batch(batch=3, pad_left=4)
    direction = random_direction(model)
    report = f64_probe(model, ("output",), estimator, chunked_head=True, vocab_chunk=CHUNK, fd_step=1e-4).measure(batch, direction)
    spreads = reference_output_spreads(model, batch, direction)
    valid = causal_output_positions(batch["labels"])
    torch.testing.assert_close(report.out_spread.double(), spreads[valid].max(), rtol=1e-6, atol=0)
    assert report.output_tokens.item() == valid.sum().item()


def test_each_position_by_isolating_its_label() -> None:
    # One label at a time: out_spread is then one position's spread, so every position of the tied GPT-2 is checked.
    model = float64_copy(tiny_causal_lm("gpt2"))
    batch = token_batch(batch=2, length=8, pad_left=3)
    direction = random_direction(model)
    spreads = reference_output_spreads(model, batch, direction)
    probe = f64_probe(model, chunked_head=True, vocab_chunk=CHUNK)
    valid = causal_output_positions(batch["labels"])
    measured = torch.zeros_like(spreads)
    for row, position in valid.nonzero().tolist():
        labels = torch.full_like(batch["labels"], -100)
        labels[row, position + 1] = batch["labels"][row, position + 1]
        report = probe.measure({**batch, "labels": labels}, direction)
        assert report.output_tokens.item() == 1
        measured[row, position] = report.out_spread.double()
    torch.testing.assert_close(measured[valid], spreads[valid], rtol=1e-6, atol=0)


def test_model_code_catching_exception_does_not_swallow_the_stop_at_the_head(monkeypatch, linear_calls) -> None:
    # A forward that wraps its head in `try/except Exception` (a fallback, say) must not see the probe's stop signal.
    fallbacks: list[type] = []

    def guarded(self, input_ids=None, attention_mask=None, **kwargs) -> CausalLMOutputWithPast:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        try:
            logits = self.lm_head(hidden)
        except Exception as error:
            fallbacks.append(type(error))
            logits = hidden.new_zeros(*hidden.shape[:-1], self.config.vocab_size)
        return CausalLMOutputWithPast(logits=logits)

    monkeypatch.setattr(LlamaForCausalLM, "forward", guarded)
    model = float64_copy(tiny_causal_lm("llama"))
    batch = token_batch(batch=2, pad_right=2)
    direction = random_direction(model)
    for estimator in ESTIMATORS:
        chunked, full = chunked_and_full(model, batch, direction, ("output", "attention"), estimator)
        assert fallbacks == []
        assert_same_report(chunked, full)
    assert linear_calls[model.lm_head] == 1 + 4  # the full head's forwards only (jvp: one, fd: two at h and at h/2)


# ------------------------------------------------------------------------------- hf_ghosts.probe.head, tensors only
def head_tensors(bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """``x, x'`` ``[2, 3, 5]``, ``W, W'`` ``[11, 5]``, ``b, b'`` ``[11]`` (or None), float64."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=F64)

    tensors = {"x": draw(2, 3, 5), "dx": draw(2, 3, 5), "W": draw(11, 5), "dW": draw(11, 5)}
    return {**tensors, "b": draw(11) if bias else None, "db": draw(11) if bias else None}


def full_logits(t: float, x, dx, W, dW, b, db) -> torch.Tensor:  # noqa: N803 (the formula's names)
    """``z(t) = (x + t x') (W + t W')^T + b + t b'``, all classes at once (None: zero)."""
    z = (x + t * dx) @ (W + t * dW).T
    return z if b is None else z + b + t * db


def exact_spread(tensors: dict) -> torch.Tensor:
    """Spread of ``dz/dt`` at 0: ``z(t)`` is quadratic in ``t``, so the central difference at ``t = +-1`` is exact."""
    slopes = (full_logits(1.0, **tensors) - full_logits(-1.0, **tensors)) / 2
    return (slopes.amax(-1) - slopes.amin(-1)).float()


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_head_jvp_spread_is_the_derivative_of_the_full_logits(chunk: int, bias: bool) -> None:
    t = head_tensors(bias)
    spread = head.jvp_spread(t["x"], t["dx"], t["W"], t["dW"], t["db"], chunk=chunk)
    assert spread.shape == (2, 3) and spread.dtype == torch.float32
    torch.testing.assert_close(spread, exact_spread(t), rtol=F32_ULP, atol=0)
    # nothing before the head moves (x' = 0), or the head does not (W' = b' = 0)
    still = {**t, "dx": torch.zeros_like(t["dx"])}
    spread = head.jvp_spread(t["x"], None, t["W"], t["dW"], t["db"], chunk=chunk)
    torch.testing.assert_close(spread, exact_spread(still), rtol=F32_ULP, atol=0)
    fixed = {**t, "dW": torch.zeros_like(t["dW"]), "db": None if t["db"] is None else torch.zeros_like(t["db"])}
    spread = head.jvp_spread(t["x"], t["dx"], t["W"], chunk=chunk)
    torch.testing.assert_close(spread, exact_spread(fixed), rtol=F32_ULP, atol=0)


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_head_fd_spread_is_exact_on_the_quadratic_logits(chunk: int, bias: bool) -> None:
    # The raw direction is 4 v: one step h along v moves the head by scale * D with scale = h / 4.
    t = head_tensors(bias)
    h = 0.3
    bias_step = None if t["db"] is None else 4 * t["db"]
    hidden_plus, hidden_minus = t["x"] + h * t["dx"], t["x"] - h * t["dx"]
    spread = head.fd_spread(
        hidden_plus, hidden_minus, t["W"], t["b"], 4 * t["dW"], bias_step, scale=h / 4, fd_step=h, chunk=chunk
    )
    torch.testing.assert_close(spread, exact_spread(t), rtol=1e-6, atol=0)


def test_blockwise_spread_example_and_non_finite_slopes() -> None:
    slopes = torch.tensor([[1.0, 4.0, -2.0], [0.5, 0.5, 0.5]])
    for chunk in (1, 2, 3, 5):
        assert head.blockwise_spread(3, lambda rows: slopes[:, rows], chunk).tolist() == [6.0, 0.0]
    for bad in (math.nan, math.inf):  # propagated as NaN, as radii.spread does (the caller checks once)
        nan_row = torch.tensor([[1.0, bad, 0.0], [1.0, 4.0, -2.0]])
        assert [math.isnan(v) for v in head.blockwise_spread(3, lambda rows, a=nan_row: a[:, rows], 2).tolist()] == [True, False]


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("padding", [{}, {"pad_left": 4}, {"pad_right": 5}, {"pad_left": 2, "pad_right": 3}])
def test_ignored_and_padded_positions_are_masked_alike(padding: dict, estimator: str) -> None:
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = token_batch(batch=3, **padding)
    direction = random_direction(model)
    valid = causal_output_positions(batch["labels"])
    spreads = reference_output_spreads(model, batch, direction)
    labels, others = hide_widest_label(spreads, batch["labels"])
    ignored = {**batch, "labels": labels}
    chunked, full = chunked_and_full(model, ignored, direction, ("output", "attention"), estimator, fd_step=1e-4)
    assert_same_report(chunked, full)
    torch.testing.assert_close(chunked.out_spread.double(), spreads[others].max(), rtol=1e-6, atol=0)
    assert chunked.output_tokens.item() == others.sum().item() == valid.sum().item() - 1


def test_without_labels_the_attention_mask_decides() -> None:
    model = float64_copy(tiny_causal_lm("llama"))
    batch = {k: v for k, v in token_batch(batch=3, pad_left=2, pad_right=3).items() if k != "labels"}
    direction = random_direction(model)
    chunked, full = chunked_and_full(model, batch, direction, ("output",), "jvp")
    assert_same_report(chunked, full)
    real = batch["attention_mask"].bool()
    assert chunked.output_tokens.item() == (real[:, :-1] & real[:, 1:]).sum().item()


def test_all_labels_ignored_leaves_the_output_radius_unmeasured() -> None:
    model = tiny_causal_lm("qwen2")
    batch = token_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    report = RadiusProbe(model, ("output",), chunked_head=True, vocab_chunk=CHUNK).measure(batch, random_direction(model))
    assert report.out_spread.item() == 0.0 and report.output_tokens.item() == 0
    assert math.isnan(report.rho_out.item()) and report.unmeasured() == ("output",)  # not inf: nothing was measured


# ------------------------------------------------------------------------------------------ directions and the head
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_frozen_head(estimator: str) -> None:
    model = float64_copy(tiny_causal_lm("llama"))
    model.lm_head.weight.requires_grad_(False)
    batch = token_batch(batch=3, pad_right=3)
    direction = random_direction(model)
    assert "lm_head.weight" not in direction
    chunked, full = chunked_and_full(model, batch, direction, ("output", "attention", "ffn"), estimator, fd_step=1e-4)
    assert_same_report(chunked, full)
    spreads = reference_output_spreads(model, batch, direction)
    torch.testing.assert_close(chunked.out_spread.double(), spreads[causal_output_positions(batch["labels"])].max(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_direction_with_a_zero_head_component(estimator: str) -> None:
    model = float64_copy(tiny_causal_lm("qwen2"))
    batch = token_batch(batch=3, pad_left=3)
    direction = random_direction(model)
    direction["lm_head.weight"] = torch.zeros_like(direction["lm_head.weight"])
    chunked, full = chunked_and_full(model, batch, direction, ("output", "attention"), estimator)
    assert_same_report(chunked, full)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_direction_on_the_head_only(estimator: str) -> None:
    # Nothing before the head moves: the head's input has no tangent, the slopes are x W'^T alone.
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = token_batch(batch=3, pad_right=3)
    direction = {"lm_head.weight": random_direction(model)["lm_head.weight"]}
    chunked, full = chunked_and_full(model, batch, direction, ("output", "attention"), estimator, fd_step=1e-4)
    assert_same_report(chunked, full)
    assert torch.equal(chunked.attn_spread, torch.zeros_like(chunked.attn_spread))
    spreads = reference_output_spreads(model, batch, direction)
    torch.testing.assert_close(chunked.out_spread.double(), spreads[causal_output_positions(batch["labels"])].max(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_tied_embedding_moves_input_and_head_together(estimator: str) -> None:
    # GPT-2's head weight is transformer.wte.weight: a direction on it moves the embedding and the head.
    model = float64_copy(tiny_causal_lm("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = token_batch(batch=3, pad_left=2)
    direction = {"transformer.wte.weight": random_direction(model)["transformer.wte.weight"]}
    chunked, full = chunked_and_full(model, batch, direction, ("output",), estimator, fd_step=1e-4)
    assert_same_report(chunked, full)
    spreads = reference_output_spreads(model, batch, direction)
    valid = causal_output_positions(batch["labels"])
    torch.testing.assert_close(chunked.out_spread.double(), spreads[valid].max(), rtol=1e-6, atol=0)
    # both parts matter: the head's part alone (embedding fixed) is another spread
    untied = float64_copy(tiny_causal_lm("gpt2", tie_word_embeddings=False))
    with torch.no_grad():
        untied.lm_head.weight.copy_(model.lm_head.weight)
        untied.transformer.wte.weight.copy_(model.transformer.wte.weight)
    moved_head = f64_probe(untied).measure(batch, {"lm_head.weight": direction["transformer.wte.weight"]})
    assert abs(moved_head.out_spread.item() / chunked.out_spread.item() - 1) > 1e-3


def test_head_bias_slope_is_the_bias_direction_spread() -> None:
    # Phi's head has a bias: along its bias alone every position's slopes are b' = v, spread max v - min v.
    model = tiny_linear_head_lm("phi")
    batch = token_batch(batch=2, length=8)
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5), dtype=F64)
    for estimator in ESTIMATORS:
        report = f64_probe(model, ("output",), estimator, chunked_head=True, vocab_chunk=CHUNK).measure(batch, {"lm_head.bias": bias})
        unit = bias / bias.norm()
        assert report.out_spread.item() == pytest.approx((unit.max() - unit.min()).item(), rel=1e-6)
    direction = random_direction(model)
    for estimator in ESTIMATORS:
        assert_same_report(*chunked_and_full(model, batch, direction, ("output", "attention"), estimator))


def test_params_override_reaches_the_chunked_head() -> None:
    model, other = float64_copy(tiny_causal_lm("llama", seed=0)), float64_copy(tiny_causal_lm("llama", seed=1))
    batch = token_batch(batch=2, pad_right=2)
    direction = random_direction(model)
    params = {"lm_head.weight": other.lm_head.weight.detach().clone()}
    chunked = f64_probe(model, chunked_head=True, vocab_chunk=CHUNK).measure(batch, direction, params=params)
    full = f64_probe(model, chunked_head=False).measure(batch, direction, params=params)
    assert_same_report(chunked, full)
    assert abs(chunked.out_spread.item() / f64_probe(model).measure(batch, direction).out_spread.item() - 1) > 1e-3


# ------------------------------------------------------------------------------------------ the head is not run
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_auto_mode_skips_the_head_and_leaves_no_hook(estimator: str, linear_calls) -> None:
    model = tiny_causal_lm("gpt_neox")
    head = model.get_output_embeddings()
    batch = token_batch(batch=2)
    direction = random_direction(model)
    weights = {name: t.clone() for name, t in model.state_dict().items()}
    for radii_ in (("output", "attention", "ffn"), ("attention",), ("ffn",)):
        auto = RadiusProbe(model, radii_, estimator).measure(batch, direction)  # chunked_head=None: chunked here
        assert linear_calls[head] == 0
        assert not head._forward_pre_hooks and not head._forward_hooks
        full = RadiusProbe(model, radii_, estimator, chunked_head=False).measure(batch, direction)
        # fd: two forwards at h and two at h/2 (its step check), where a spread is measured to check on
        assert linear_calls.pop(head) == (1 if estimator == "jvp" else 2 if radii_ == ("ffn",) else 4)
        assert_same_report(auto, full, rtol=1e-5 if estimator == "jvp" else 1e-4)
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())


def test_non_finite_slopes_give_a_nan_radius_chunked_or_not() -> None:
    """The probe no longer raises (radii make no host sync): the NaN reaches the report, whose reader checks it."""
    model = tiny_causal_lm("llama")
    weight = model.lm_head.weight.detach().clone()
    weight[3] = math.inf
    batch = token_batch()
    for chunked in (True, False):
        report = RadiusProbe(model, chunked_head=chunked, vocab_chunk=CHUNK).measure(
            batch, random_direction(model), params={"lm_head.weight": weight}
        )
        assert math.isnan(report.out_spread.item()) and math.isnan(report.rho.item())
        assert math.isfinite(report.rho_of(("attention",)).item())


# ------------------------------------------------------------------------------------------ where it does not apply
def softcapped_gemma2(cap: float | None = 0.2) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=cap))


def _gemma_rms_norm_float64(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return self._norm(hidden_states) * (1.0 + self.weight)


def gemma2_float64(model: Gemma2ForCausalLM) -> Gemma2ForCausalLM:
    """A float64 copy whose RMSNorms compute in float64 (Gemma2's own round to float32 inside ``forward``)."""
    model = float64_copy(model)
    for module in model.modules():
        if type(module).__name__ == "Gemma2RMSNorm":
            module.forward = types.MethodType(_gemma_rms_norm_float64, module)
    return model


def logit_scaled_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama", logit_scale=2.0))


def sequence_classifier() -> GPTNeoXForSequenceClassification:
    torch.manual_seed(0)
    return GPTNeoXForSequenceClassification(tiny_config("gpt_neox", num_labels=3, pad_token_id=VOCAB - 1))


def hooked_head() -> torch.nn.Module:
    model = tiny_causal_lm("llama")
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    return model


class LlamaSubclass(LlamaForCausalLM):
    """A subclass may override ``forward``: not provably ``lm_head(x)``."""


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (softcapped_gemma2, r"Gemma2ForCausalLM \(model_type 'gemma2'\) is not one of the causal LMs"),
        (logit_scaled_llama, r"config\.logit_scale=2\.0 may rescale or cap the logits"),
        (sequence_classifier, r"GPTNeoXForSequenceClassification \(model_type 'gpt_neox'\) is not one of"),
        (hooked_head, r"its output head has forward hooks or a replaced forward"),
        (lambda: LlamaSubclass(tiny_config("llama")), r"LlamaSubclass \(model_type 'llama'\) is not one of"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)), r"Sequential \(model_type None\) is not one of"),
    ],
)
def test_chunked_head_true_refuses_with_the_reason_and_the_fix(build, reason: str) -> None:
    model = build()
    with pytest.raises(ValueError, match=rf"chunked_head=True given to RadiusProbe, but {reason}.*Pass chunked_head=None .* \(or chunked_head=False\)"):
        RadiusProbe(model, ("output",), chunked_head=True)
    RadiusProbe(model, ("output",))  # auto falls back to the full head
    RadiusProbe(model, ("output",), chunked_head=False)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_softcapped_logits_fall_back_to_the_full_head(estimator: str, linear_calls) -> None:
    model = gemma2_float64(softcapped_gemma2())
    batch = token_batch(batch=2, pad_right=2)
    direction = random_direction(model)
    report = f64_probe(model, ("output", "attention"), estimator, fd_step=1e-4).measure(batch, direction)
    assert linear_calls[model.lm_head] == (1 if estimator == "jvp" else 4)  # fd: its step check, h and h/2
    assert_same_report(report, f64_probe(model, ("output", "attention"), estimator, chunked_head=False, fd_step=1e-4).measure(batch, direction))
    # the softcap is measured (Gemma2's eager softmax rounds to float32: a coarser reference step and tolerance) ...
    valid = causal_output_positions(batch["labels"])
    slopes = reference_logit_slopes(model, batch, direction, step=1e-3)
    capped = (slopes.amax(-1) - slopes.amin(-1))[valid].max()
    torch.testing.assert_close(report.out_spread.double(), capped, rtol=1e-3, atol=0)
    # ... and it matters: the head's own output (what a chunked head would see) has another spread
    uncapped = gemma2_float64(softcapped_gemma2(cap=None))
    slopes = reference_logit_slopes(uncapped, batch, direction, step=1e-3)
    assert abs((slopes.amax(-1) - slopes.amin(-1))[valid].max() / capped - 1) > 0.02


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, None])
def test_invalid_vocab_chunk_is_rejected(chunk: object) -> None:
    with pytest.raises(ValueError, match=rf"^RadiusProbe\.vocab_chunk: got {chunk!r}; expected a positive integer$"):
        RadiusProbe(tiny_causal_lm("gpt_neox"), vocab_chunk=chunk)


def test_families_are_listed() -> None:
    assert set(FAMILIES) <= set(LINEAR_HEAD_MODELS)
