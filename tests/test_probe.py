"""RadiusProbe on tiny models against independent references.

References never call hf_ghosts.probe: weights moved in place with central differences in float64,
pre-softmax scores recorded by our own attention function, masks rebuilt by hand from the batch
(see tests/references.py). Tight comparisons run on float64 copies (``float64_copy``) with ``dtype=torch.float64``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    BloomConfig,
    BloomForCausalLM,
    GPTNeoXForSequenceClassification,
    GPTNeoXModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from hf_ghosts import FfnSpec, RadiusProbe, RadiusReport, compat, radii
from hf_ghosts.architectures import FFN_PREACTIVATIONS
from hf_ghosts.probe import output_positions
from hf_ghosts.probe.inputs import query_positions
from tests.helpers import FAMILIES, VOCAB, random_direction, tiny_causal_lm, tiny_config, token_batch
from tests.references import (
    causal_output_positions,
    central_difference,
    float64_copy,
    forward_logits,
    hide_widest_label,
    module_outputs,
    reference_attention_spreads,
    reference_logit_slopes,
    reference_output_spreads,
    unit_direction,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")
PADDINGS = {"none": {}, "left": {"pad_left": 4}, "right": {"pad_right": 5}, "both": {"pad_left": 2, "pad_right": 3}}


def padded_batch(padding: str, batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    if padding == "no_mask":
        return {k: v for k, v in token_batch(batch=batch, length=length).items() if k != "attention_mask"}
    return token_batch(batch=batch, length=length, **PADDINGS[padding])


def f64_probe(model: torch.nn.Module, radii_: tuple[str, ...], estimator: str = "jvp", **kwargs: object) -> RadiusProbe:
    return RadiusProbe(model, radii_, estimator, dtype=F64, **kwargs)


# ------------------------------------------------------------------------------------------ output radius
@pytest.mark.parametrize("padding", ["right", "left"])
def test_output_spread_matches_central_differences_float64(family: str, padding: str) -> None:
    model = float64_copy(tiny_causal_lm(family))
    batch = padded_batch(padding)
    direction = random_direction(model)
    report = f64_probe(model, ("output",)).measure(batch, direction)
    spreads = reference_output_spreads(model, batch, direction)
    valid = causal_output_positions(batch["labels"])
    torch.testing.assert_close(report.out_spread.double(), spreads[valid].max(), rtol=1e-6, atol=0)
    assert report.output_tokens.item() == valid.sum().item()
    torch.testing.assert_close(report.rho_out.double(), math.pi / spreads[valid].max(), rtol=1e-6, atol=0)


def test_output_spread_float32_probe_matches_float64_reference(family: str) -> None:
    model = tiny_causal_lm(family)
    batch = padded_batch("right")
    direction = random_direction(model)
    report = RadiusProbe(model, ("output",)).measure(batch, direction)
    spreads = reference_output_spreads(float64_copy(model), batch, direction)
    valid = causal_output_positions(batch["labels"])
    assert report.out_spread.dtype == torch.float32
    torch.testing.assert_close(report.out_spread.double(), spreads[valid].max(), rtol=2e-4, atol=0)


def test_each_position_spread_by_isolating_its_label() -> None:
    # One label at a time: out_spread is then that position's spread alone, so every position is checked.
    model = float64_copy(tiny_causal_lm("llama"))
    batch = padded_batch("left", batch=2, length=8)
    direction = random_direction(model)
    spreads = reference_output_spreads(model, batch, direction)
    probe = f64_probe(model, ("output",))
    measured = torch.zeros_like(spreads)
    for row, position in causal_output_positions(batch["labels"]).nonzero().tolist():
        labels = torch.full_like(batch["labels"], -100)
        labels[row, position + 1] = batch["labels"][row, position + 1]
        report = probe.measure({**batch, "labels": labels}, direction)
        assert report.output_tokens.item() == 1
        measured[row, position] = report.out_spread.double()
    valid = causal_output_positions(batch["labels"])
    torch.testing.assert_close(measured[valid], spreads[valid], rtol=1e-6, atol=0)


def test_ignored_labels_are_excluded(family: str) -> None:
    model = float64_copy(tiny_causal_lm(family))
    batch = padded_batch("none")
    direction = random_direction(model)
    spreads = reference_output_spreads(model, batch, direction)
    valid = causal_output_positions(batch["labels"])
    labels, others = hide_widest_label(spreads, batch["labels"])
    report = f64_probe(model, ("output",)).measure({**batch, "labels": labels}, direction)
    torch.testing.assert_close(report.out_spread.double(), spreads[others].max(), rtol=1e-6, atol=0)
    assert report.output_tokens.item() == valid.sum().item() - 1


def test_all_labels_ignored_gives_zero_spread_and_no_output_radius() -> None:
    model = tiny_causal_lm("gpt_neox")
    batch = padded_batch("none")
    batch["labels"] = torch.full_like(batch["labels"], -100)
    report = RadiusProbe(model, ("output",)).measure(batch, random_direction(model))
    assert report.out_spread.item() == 0.0 and report.output_tokens.item() == 0
    assert math.isnan(report.rho_out.item()) and report.unmeasured() == ("output",)  # not measured, never inf
    assert report.rho_of().item() == math.inf  # does not limit


def test_without_labels_positions_come_from_the_attention_mask() -> None:
    model = float64_copy(tiny_causal_lm("gpt2"))
    batch = padded_batch("both")
    direction = random_direction(model)
    spreads = reference_output_spreads(model, batch, direction)
    report = f64_probe(model, ("output",)).measure({k: v for k, v in batch.items() if k != "labels"}, direction)
    real = batch["attention_mask"].bool()
    valid = torch.zeros_like(real)
    valid[:, :-1] = real[:, :-1] & real[:, 1:]
    torch.testing.assert_close(report.out_spread.double(), spreads[valid].max(), rtol=1e-6, atol=0)
    assert report.output_tokens.item() == valid.sum().item()


def test_output_positions_closed_forms() -> None:
    labels = torch.tensor([[5, -100, 7, 8], [-100, 3, 4, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    shape = labels.shape
    # causal: position t counts where labels[t + 1] is kept; the last position never does
    causal = output_positions({"labels": labels}, shape, shift_labels=True)
    assert causal.tolist() == [[False, True, True, False], [True, True, False, False]]
    # not causal: the labels as they are
    plain = output_positions({"labels": labels}, shape, shift_labels=False)
    assert plain.tolist() == [[True, False, True, True], [False, True, True, False]]
    # labels shifted already (TRL): used as they are
    shifted = torch.tensor([[1, -100, 2, -100], [-100, -100, -100, 9]])
    assert output_positions({"labels": labels, "shift_labels": shifted}, shape, shift_labels=True).tolist() == [
        [True, False, True, False], [False, False, False, True]
    ]
    # no labels: t and t + 1 both real tokens; no mask either: every position but the last
    unlabelled = output_positions({"attention_mask": mask}, shape, shift_labels=True)
    assert unlabelled.tolist() == [[True, True, True, False], [False, True, False, False]]
    assert output_positions({}, (1, 3), shift_labels=True).tolist() == [[True, True, False]]
    # one output per sample
    per_sample = output_positions({"labels": torch.tensor([2, -100, 0])}, (3,), shift_labels=True)
    assert per_sample.tolist() == [True, False, True]
    assert output_positions({"attention_mask": mask}, (2,), shift_labels=True).tolist() == [True, True]


# ------------------------------------------------------------------------------------------ logit slopes
@pytest.mark.parametrize("estimator", ["jvp", "fd"])
@pytest.mark.parametrize("chunked_head", [None, False])
def test_logit_slopes_are_the_logits_and_their_derivative(estimator: str, chunked_head: bool | None) -> None:
    model = float64_copy(tiny_causal_lm("llama"))
    batch = padded_batch("left")
    direction = random_direction(model)
    probe = f64_probe(model, ("output", "attention", "ffn"), estimator, fd_step=1e-4, chunked_head=chunked_head)
    logits, slopes = probe.logit_slopes(batch, direction)
    assert logits.shape == slopes.shape == (*batch["input_ids"].shape, VOCAB)
    assert logits.dtype == slopes.dtype == F64
    torch.testing.assert_close(logits, forward_logits(model, batch), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(slopes, reference_logit_slopes(model, batch, direction), rtol=1e-6, atol=1e-9)
    assert model.config._attn_implementation == "sdpa"
    # at other weights: the slopes there
    other = float64_copy(tiny_causal_lm("llama", seed=1))
    params = {name: p.detach() for name, p in other.named_parameters()}
    _, moved = probe.logit_slopes(batch, direction, params=params)
    torch.testing.assert_close(moved, reference_logit_slopes(other, batch, direction), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ attention radius
@pytest.mark.parametrize("padding", ["none", "left", "right", "both", "no_mask"])
def test_attention_spreads_match_brute_force_per_layer_and_head(family: str, padding: str) -> None:
    model = float64_copy(tiny_causal_lm(family))
    batch = padded_batch(padding)
    direction = random_direction(model)
    report = f64_probe(model, ("attention",)).measure(batch, direction)
    expected = reference_attention_spreads(model, batch, direction)
    config = model.config
    assert report.attn_spread.shape == (config.num_hidden_layers, config.num_attention_heads)
    torch.testing.assert_close(report.attn_spread.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(report.rho_attn.double(), math.pi / expected, rtol=1e-6, atol=0)
    assert report.radii()["attention"].item() == pytest.approx(math.pi / expected.max().item(), rel=1e-6)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padding_changes_the_attention_spreads(padding: str) -> None:
    # On a single padded row the padding must matter, or the comparisons above could not see it.
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = padded_batch(padding, batch=1)
    direction = random_direction(model)
    probe = f64_probe(model, ("attention",))
    padded = probe.measure(batch, direction).attn_spread.double()
    torch.testing.assert_close(padded, reference_attention_spreads(model, batch, direction), rtol=1e-6, atol=0)
    unpadded = probe.measure({**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}, direction)
    assert not torch.allclose(unpadded.attn_spread.double(), padded, rtol=1e-3)


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_all_padding_batch_leaves_the_attention_radii_unmeasured(estimator: str) -> None:
    # No query position to take a score spread over: NaN ("not measured") per head, never inf; it does not limit.
    model = tiny_causal_lm("llama")
    batch = padded_batch("left", batch=2)
    partly = RadiusProbe(model, ("attention",), estimator).measure(batch, random_direction(model))
    assert partly.attention_tokens.item() == batch["attention_mask"].sum().item() > 0
    assert partly.unmeasured() == () and torch.isfinite(partly.rho_attn).all()
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    report = RadiusProbe(model, ("attention",), estimator).measure(batch, random_direction(model))
    assert report.attention_tokens.item() == 0 and report.unmeasured() == ("attention",)
    assert report.rho_attn.shape == partly.rho_attn.shape and report.rho_attn.isnan().all()
    assert math.isnan(report.radii()["attention"].item()) and report.rho_of().item() == math.inf


def test_query_positions_counts_the_unmasked_queries() -> None:
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert query_positions({"input_ids": ids, "attention_mask": mask}).item() == 5
    assert query_positions({"input_ids": ids, "attention_mask": torch.zeros_like(mask)}).item() == 0
    assert query_positions({"input_ids": ids}).item() == 6
    assert query_positions({"inputs_embeds": torch.zeros(4, 5, 8)}).item() == 20
    assert query_positions({"pixel_values": torch.zeros(1, 3, 4, 4)}) is None  # nothing to count by


# ------------------------------------------------------------------------------------------ estimators
def test_jvp_and_fd_estimators_agree(family: str) -> None:
    model = tiny_causal_lm(family)
    batch = padded_batch("left")
    direction = random_direction(model)
    jvp = RadiusProbe(model, ("output", "attention", "ffn"), "jvp").measure(batch, direction)
    fd = RadiusProbe(model, ("output", "attention", "ffn"), "fd").measure(batch, direction)
    torch.testing.assert_close(fd.out_spread, jvp.out_spread, rtol=2e-3, atol=0)
    torch.testing.assert_close(fd.attn_spread, jvp.attn_spread, rtol=2e-3, atol=0)
    torch.testing.assert_close(fd.ffn_radius, jvp.ffn_radius, rtol=2e-3, atol=0)
    assert fd.output_tokens.item() == jvp.output_tokens.item()


def test_fd_step_is_a_length_along_the_unit_direction() -> None:
    # fd is (z(theta + h v) - z(theta - h v)) / 2h with |v| = 1: it equals our own difference at the step it reports
    # (fd_step = 3 is far too wide here: its error check shrinks it), and its error estimate holds against the exact slope.
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = padded_batch("right")
    direction = {name: 5 * d for name, d in random_direction(model).items()}
    report = f64_probe(model, ("output", "attention"), "fd", fd_step=3.0).measure(batch, direction)
    step = float(report.fd_step)
    assert step < 3.0 / 4
    (slopes,) = central_difference(model, direction, lambda: [forward_logits(model, batch)], step)
    valid = causal_output_positions(batch["labels"])
    own = (slopes.amax(-1) - slopes.amin(-1))[valid].max()
    torch.testing.assert_close(report.out_spread.double(), own, rtol=1e-6, atol=0)
    torch.testing.assert_close(report.attn_spread.double(), reference_attention_spreads(model, batch, direction, step), rtol=1e-6, atol=0)
    exact = f64_probe(model, ("output",)).measure(batch, direction)
    assert abs(exact.out_spread.item() / report.out_spread.item() - 1) < 3 * float(report.fd_error) < 1e-2


def test_fd_output_slopes_difference_in_the_forward_dtype() -> None:
    # A float64 probe with a tiny step must not lose the slopes to fp32 rounding of the logits.
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = padded_batch("none")
    direction = random_direction(model)
    fd = f64_probe(model, ("output",), "fd", fd_step=1e-5).measure(batch, direction)
    jvp = f64_probe(model, ("output",)).measure(batch, direction)
    torch.testing.assert_close(fd.out_spread, jvp.out_spread, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_sign_and_scale_invariance(estimator: str) -> None:
    model = tiny_causal_lm("llama")
    batch = padded_batch("right")
    direction = random_direction(model)
    probe = RadiusProbe(model, ("output", "attention", "ffn"), estimator)
    base = probe.measure(batch, direction)
    for factor in (-1.0, 7.0, -0.01):
        other = probe.measure(batch, {name: factor * d for name, d in direction.items()})
        for field in ("out_spread", "attn_spread", "ffn_radius"):
            torch.testing.assert_close(getattr(other, field), getattr(base, field), rtol=1e-5, atol=0)
    # and the probe reads the direction: another one gives another report
    moved = probe.measure(batch, random_direction(model, seed=9))
    assert not torch.allclose(moved.attn_spread, base.attn_spread, rtol=1e-3)


# ------------------------------------------------------------------------------------------ weights and state
def test_params_linearizes_at_the_given_weights(family: str) -> None:
    model, other = tiny_causal_lm(family, seed=0), tiny_causal_lm(family, seed=1)
    batch = padded_batch("left")
    direction = random_direction(model)
    params = {name: p.detach().clone() for name, p in other.named_parameters()}
    probe = RadiusProbe(model, ("output", "attention", "ffn"))
    at_params = probe.measure(batch, direction, params=params)
    at_other = RadiusProbe(other, ("output", "attention", "ffn")).measure(batch, direction)
    at_model = probe.measure(batch, direction)
    for field in ("out_spread", "attn_spread", "ffn_radius"):
        torch.testing.assert_close(getattr(at_params, field), getattr(at_other, field), rtol=1e-6, atol=0)
    assert not torch.allclose(at_params.attn_spread, at_model.attn_spread, rtol=1e-3)


def test_params_for_some_names_keeps_the_direction_on_the_others() -> None:
    # params names a subset: the rest are the model's weights, and the direction still moves them all.
    model, other = float64_copy(tiny_causal_lm("gpt_neox", seed=0)), float64_copy(tiny_causal_lm("gpt_neox", seed=1))
    batch = padded_batch("right")
    direction = random_direction(model)
    replaced = [name for name in dict(model.named_parameters()) if ".layers.0." in name]
    params = {name: dict(other.named_parameters())[name].detach().clone() for name in replaced}
    report = f64_probe(model, ("output", "attention")).measure(batch, direction, params=params)
    hybrid = float64_copy(model)
    with torch.no_grad():
        for name, value in params.items():
            dict(hybrid.named_parameters())[name].copy_(value)
    spreads = reference_output_spreads(hybrid, batch, direction)
    torch.testing.assert_close(report.out_spread.double(), spreads[causal_output_positions(batch["labels"])].max(), rtol=1e-6, atol=0)
    torch.testing.assert_close(report.attn_spread.double(), reference_attention_spreads(hybrid, batch, direction), rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_measure_leaves_the_model_exactly_as_found(estimator: str) -> None:
    model = tiny_causal_lm("llama")
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back mixed
    model.lm_head.weight.requires_grad_(False)
    generator = torch.Generator().manual_seed(4)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator)
    weights = {name: t.clone() for name, t in model.state_dict().items()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    flags = {name: m.training for name, m in model.named_modules()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    implementation = model.config._attn_implementation
    batch = padded_batch("left")
    direction = random_direction(model)
    report = RadiusProbe(model, ("output", "attention", "ffn"), estimator).measure(batch, direction)
    assert torch.isfinite(report.rho)
    assert model.config._attn_implementation == implementation == "sdpa"
    assert "forward" not in model.__dict__
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in grads)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name


def test_compat_attention_implementation_still_selects_the_attention() -> None:
    # compat.attention_implementation writes config._attn_implementation, which the attention layers read per call.
    calls: list[int] = []

    def counting(module: torch.nn.Module, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("hf_ghosts_test_counting", counting)
    AttentionMaskInterface.register("hf_ghosts_test_counting", sdpa_mask)
    model = tiny_causal_lm("llama")
    batch = padded_batch("left")
    expected = forward_logits(model, batch)
    with compat.attention_implementation(model, "hf_ghosts_test_counting"):
        assert compat.attention_implementation_of(model) == "hf_ghosts_test_counting"
        logits = forward_logits(model, batch)
    assert calls == [0, 1], "upstream changed: config._attn_implementation no longer selects attention; update compat"
    assert torch.equal(logits, expected)
    assert compat.attention_implementation_of(model) == model.config._attn_implementation == "sdpa"
    forward_logits(model, batch)
    assert calls == [0, 1]


def test_frozen_parameters_may_not_carry_the_direction() -> None:
    model = tiny_causal_lm("gpt_neox")
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(KeyError, match=r"lm_head\.weight"):
        RadiusProbe(model, ("output",)).measure(padded_batch("none"), random_direction(tiny_causal_lm("gpt_neox")))


def test_ghosts_attention_trains_bit_for_bit_like_sdpa(family: str) -> None:
    batch = padded_batch("left")
    results = {}
    for implementation in ("sdpa", "ghosts"):
        model = tiny_causal_lm(family, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        model.train()
        output = model(**batch)
        output.loss.backward()
        results[implementation] = (output.logits.detach(), [p.grad for p in model.parameters()])
    (logits_sdpa, grads_sdpa), (logits_ghosts, grads_ghosts) = results["sdpa"], results["ghosts"]
    assert torch.equal(logits_ghosts, logits_sdpa)
    assert all(torch.equal(a, b) for a, b in zip(grads_ghosts, grads_sdpa, strict=True))
    # and a probe through the ghosts-configured model measures what the sdpa one does
    model = tiny_causal_lm(family, attn_implementation="ghosts")
    direction = random_direction(model)
    torch.testing.assert_close(
        RadiusProbe(model).measure(batch, direction).attn_spread,
        RadiusProbe(tiny_causal_lm(family)).measure(batch, direction).attn_spread,
        rtol=0,
        atol=0,
    )


def test_output_only_jvp_runs_on_an_sdpa_model_and_keeps_left_padded_logits() -> None:
    # sdpa has no forward-mode AD: the probe routes through ghosts (eager inside), whose padded
    # query rows output 0 like sdpa's, so the label at the first real token is measured on sdpa's logits.
    model = float64_copy(tiny_causal_lm("gpt2"))
    assert model.config._attn_implementation == "sdpa"
    batch = padded_batch("left")
    direction = random_direction(model)
    spreads = reference_output_spreads(model, batch, direction)
    valid = causal_output_positions(batch["labels"])
    first_real = PADDINGS["left"]["pad_left"] - 1  # a padding position whose label is the first real token
    assert valid[-1, first_real]
    labels = torch.full_like(batch["labels"], -100)
    labels[-1, first_real + 1] = batch["labels"][-1, first_real + 1]
    for radii_ in (("output",), ("output", "attention")):
        report = f64_probe(model, radii_).measure({**batch, "labels": labels}, direction)
        torch.testing.assert_close(report.out_spread.double(), spreads[-1, first_real], rtol=1e-6, atol=0)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------ FFN radius
def own_ffn_values(model: torch.nn.Module, batch: dict, direction: dict, suffix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN pre-activations ``z`` and their slopes ``z'`` over real tokens, all layers, by our own hooks."""
    def run() -> list[torch.Tensor]:
        return module_outputs(model, suffix, lambda: forward_logits(model, batch))

    values = run()
    slopes = central_difference(model, direction, run)
    real = batch["attention_mask"].bool()
    return torch.cat([v[real].reshape(-1) for v in values]), torch.cat([s[real].reshape(-1) for s in slopes])


def test_ffn_kink_proxy_is_the_one_percent_quantile(family: str) -> None:
    model = float64_copy(tiny_causal_lm(family))
    batch = padded_batch("both")
    direction = random_direction(model)
    report = f64_probe(model, ("ffn",)).measure(batch, direction)
    values, slopes = own_ffn_values(model, batch, direction, FFN_PREACTIVATIONS[model.config.model_type].module_suffix)
    expected = np.quantile((values.abs() / slopes.abs()).numpy(), 0.01, method="inverted_cdf")
    assert report.ffn_radius.item() == pytest.approx(float(expected), rel=1e-6)
    other = np.quantile((values.abs() / slopes.abs()).numpy(), 0.05, method="inverted_cdf")
    assert f64_probe(model, ("ffn",), ffn_quantile=0.05).measure(batch, direction).ffn_radius.item() == pytest.approx(float(other), rel=1e-6)


@pytest.mark.parametrize(
    ("family", "overrides", "distance"),
    [
        ("llama", {}, lambda z: torch.sqrt(z**2 + math.pi**2)),  # silu
        ("gpt_neox", {"hidden_act": "relu"}, lambda z: z.abs()),
        ("gpt_neox", {"hidden_act": "tanh"}, lambda z: torch.sqrt(z**2 + math.pi**2 / 4)),
        ("gpt_neox", {}, lambda z: torch.full_like(z, math.inf)),  # exact gelu: entire
        ("gpt2", {}, None),  # gelu_new: radii.activation_radius (checked against brute force in test_radii_activations)
    ],
)
def test_ffn_activation_mode_is_the_minimum_activation_radius(family: str, overrides: dict, distance) -> None:
    model = float64_copy(tiny_causal_lm(family, **overrides))
    batch = padded_batch("right")
    direction = random_direction(model)
    report = f64_probe(model, ("ffn",), ffn_mode="activation").measure(batch, direction)
    spec = FFN_PREACTIVATIONS[model.config.model_type]
    values, slopes = own_ffn_values(model, batch, direction, spec.module_suffix)
    if distance is None:
        expected = radii.activation_radius(values, slopes, getattr(model.config, spec.activation_attr)).min()
    else:
        expected = (distance(values) / slopes.abs()).min()
    if math.isinf(expected):
        assert report.ffn_radius.item() == math.inf
    else:
        assert report.ffn_radius.item() == pytest.approx(expected.item(), rel=1e-6)
    # Both forms in one probe: "ffn" as the kink proxy, "ffn_activation" always the activation radius.
    both = f64_probe(model, ("ffn", "ffn_activation")).measure(batch, direction)
    kink = np.quantile((values.abs() / slopes.abs()).numpy(), 0.01, method="inverted_cdf")
    assert both.ffn_radius.item() == pytest.approx(float(kink), rel=1e-6)
    assert both.radii()["ffn_activation"].item() == (math.inf if math.isinf(expected) else pytest.approx(expected.item(), rel=1e-6))
    exact_gelu = getattr(model.config, spec.activation_attr) == "gelu"
    assert math.isinf(expected) == exact_gelu  # SiLU, tanh, tanh-GELU, ReLU: finite; exact GELU: inf


def test_ffn_spec_override_for_an_unknown_model_type() -> None:
    # Bloom: not in the table, and its GeLU is an autograd.Function without a jvp: the fd estimator.
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).double().eval()
    batch = padded_batch("right")
    direction = random_direction(model)
    with pytest.raises(ValueError, match=r"model_type 'bloom'.*ffn_spec=FfnSpec"):
        RadiusProbe(model, ("output", "ffn"))
    spec = FfnSpec("mlp.dense_h_to_4h", "unused")
    report = f64_probe(model, ("ffn",), "fd", ffn_spec=spec, fd_step=1e-4).measure(batch, direction)
    values, slopes = own_ffn_values(model, batch, direction, spec.module_suffix)
    expected = np.quantile((values.abs() / slopes.abs()).numpy(), 0.01, method="inverted_cdf")
    assert report.ffn_radius.item() == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------------------------------ report
@pytest.mark.parametrize(
    ("ffn", "bottleneck", "rho"), [(2.5, "output", 2.0), (1.5, "ffn", 1.5), (math.inf, "output", 2.0)]
)
def test_report_rho_and_bottleneck_are_the_minimum(ffn: float, bottleneck: str, rho: float) -> None:
    # spreads pi/2 (output), [[pi/3, pi/5], [0, pi/4]] (heads): radii 2 and [[3, 5], [inf, 4]], closed form
    report = RadiusReport(
        out_spread=torch.tensor(math.pi / 2),
        attn_spread=torch.tensor([[math.pi / 3, math.pi / 5], [0.0, math.pi / 4]]),
        ffn_radius=torch.tensor(ffn),
    )
    torch.testing.assert_close(report.rho_attn, torch.tensor([[3.0, 5.0], [math.inf, 4.0]]))
    radii_ = {k: v.item() for k, v in report.radii().items()}
    assert radii_ == pytest.approx({"output": 2.0, "attention": 3.0, "ffn": ffn})
    assert report.bottleneck == bottleneck
    assert report.rho.item() == pytest.approx(rho)


def test_report_without_a_finite_radius_has_no_bottleneck() -> None:
    report = RadiusReport(torch.tensor(0.0), torch.zeros(2, 3), torch.tensor(math.inf))  # zero spreads, no FFN kink
    assert report.bottleneck == "none"
    assert report.rho.item() == math.inf
    with pytest.raises(ValueError, match="no radius was measured"):
        _ = RadiusReport().rho


# ------------------------------------------------------------------------------------------ other models
class TinyClassifier(torch.nn.Module):
    """``logits = W2 tanh(W1 x + b1) + b2``: its JVP has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(6, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(features)))


def test_plain_module_classifier_output_radius_closed_form() -> None:
    model = TinyClassifier()
    features = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, -100, 1, 1])
    direction = random_direction(model)
    report = RadiusProbe(model, ("output",)).measure({"features": features, "labels": labels}, direction)
    v = unit_direction(direction)
    x = features.double()
    w1, b1, w2 = model.hidden.weight.double(), model.hidden.bias.double(), model.out.weight.double()
    h = torch.tanh(x @ w1.T + b1)
    slopes = h @ v["out.weight"].T + v["out.bias"] + ((1 - h**2) * (x @ v["hidden.weight"].T + v["hidden.bias"])) @ w2.T
    spreads = slopes.amax(-1) - slopes.amin(-1)
    torch.testing.assert_close(report.out_spread.double(), spreads[labels != -100].max(), rtol=1e-5, atol=0)
    assert report.output_tokens.item() == 4
    assert report.bottleneck == "output"


def test_plain_module_rejects_attention_and_ffn_clearly() -> None:
    with pytest.raises(ValueError, match=r"AttentionInterface.*TinyClassifier.*radii=\('output',\)"):
        RadiusProbe(TinyClassifier(), ("output", "attention"))
    with pytest.raises(ValueError, match=r"model_type None.*ffn_spec"):
        RadiusProbe(TinyClassifier(), ("output", "ffn"))


def test_sequence_classification_gets_a_per_sample_output_radius() -> None:
    torch.manual_seed(0)
    config = tiny_config("gpt_neox", num_labels=3, pad_token_id=VOCAB - 1)
    model = float64_copy(GPTNeoXForSequenceClassification(config))
    batch = token_batch(batch=4)
    batch["input_ids"] = batch["input_ids"] % (VOCAB - 1)  # no pad token inside: pooled at the last position
    batch["labels"] = torch.tensor([0, 2, 1, 1])
    direction = random_direction(model)
    probe = f64_probe(model, ("output", "attention"))
    report = probe.measure(batch, direction)
    spreads = reference_output_spreads(model, batch, direction)
    assert spreads.shape == (4,)
    torch.testing.assert_close(report.out_spread.double(), spreads.max(), rtol=1e-6, atol=0)
    assert report.output_tokens.item() == 4
    # per sample: drop the sample with the largest spread
    labels = batch["labels"].clone()
    labels[spreads.argmax()] = -100
    report = probe.measure({**batch, "labels": labels}, direction)
    torch.testing.assert_close(report.out_spread.double(), spreads[labels != -100].max(), rtol=1e-6, atol=0)
    assert report.output_tokens.item() == 3


# ------------------------------------------------------------------------------------------ errors
def test_model_without_logits_is_rejected() -> None:
    torch.manual_seed(0)
    model = GPTNeoXModel(tiny_config("gpt_neox"))
    with pytest.raises(ValueError, match=r"GPTNeoXModel returned .* without `logits`.*AutoModelForCausalLM"):
        RadiusProbe(model, ("output",)).measure(padded_batch("none"), random_direction(model))


def test_invalid_settings_are_rejected() -> None:
    model = tiny_causal_lm("gpt_neox")
    names = r"expected a non-empty list of distinct names from \['output', 'attention', 'ffn', 'ffn_activation'\]$"
    with pytest.raises(ValueError, match=r"^RadiusProbe\.radii: got \('output', 'logits'\); " + names):
        RadiusProbe(model, ("output", "logits"))
    with pytest.raises(ValueError, match=r"^RadiusProbe\.radii: got \(\); " + names):
        RadiusProbe(model, ())
    with pytest.raises(ValueError, match=r"^RadiusProbe\.estimator: got 'hvp'; expected one of \['jvp', 'fd'\]$"):
        RadiusProbe(model, estimator="hvp")
    modes = r"expected one of \['kink', 'activation'\]$"
    with pytest.raises(ValueError, match=r"^RadiusProbe\.ffn_mode: got 'quantile'; " + modes):
        RadiusProbe(model, ("ffn",), ffn_mode="quantile")
    with pytest.raises(ValueError, match=r"^RadiusProbe\.ffn_quantile: got 1\.0; expected a number in \(0, 1\)$"):
        RadiusProbe(model, ("ffn",), ffn_quantile=1.0)
    with pytest.raises(ValueError, match=r"^RadiusProbe\.fd_step: got 0\.0; expected a finite number > 0$"):
        RadiusProbe(model, estimator="fd", fd_step=0.0)
    assert RadiusProbe(model, "output,attention").radii == ("output", "attention")  # the command line's form


def test_bad_directions_are_rejected() -> None:
    model = tiny_causal_lm("gpt_neox")
    probe = RadiusProbe(model, ("output",))
    batch = padded_batch("none")
    with pytest.raises(ValueError, match=r"norm is 0\.0"):
        probe.measure(batch, {name: torch.zeros_like(p) for name, p in model.named_parameters()})
    with pytest.raises(ValueError, match="norm is nan"):
        probe.measure(batch, {name: torch.full_like(p, math.nan) for name, p in model.named_parameters()})
    with pytest.raises(ValueError, match="empty"):
        probe.measure(batch, {})
    with pytest.raises(KeyError, match="not_a_parameter"):
        probe.measure(batch, {"not_a_parameter": torch.ones(3)})


def test_a_direction_on_some_parameters_only() -> None:
    # Missing names are zero: moving only the output head changes only the output logits' last layer.
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = padded_batch("right")
    direction = {"lm_head.weight": random_direction(model)["lm_head.weight"]}
    report = f64_probe(model, ("output", "attention")).measure(batch, direction)
    spreads = reference_output_spreads(model, batch, direction)
    torch.testing.assert_close(report.out_spread.double(), spreads[causal_output_positions(batch["labels"])].max(), rtol=1e-6, atol=0)
    assert torch.equal(report.attn_spread, torch.zeros_like(report.attn_spread))
    assert torch.isinf(report.rho_attn).all()


def test_families_cover_the_table() -> None:
    assert set(FAMILIES) <= set(FFN_PREACTIVATIONS)
