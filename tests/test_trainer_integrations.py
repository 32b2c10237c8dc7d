"""Where people fine-tune: TRL trainers, PEFT adapters, MoE, compiled models, sliding windows, the command line.

Tiny models from configs, tiny in-memory datasets, no hub.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_ghosts import (
    RadiusProbe,
    RhoCallback,
    RhoController,
    RhoTrainer,
    RhoTrainingArguments,
    rho_arguments,
    rho_trainer,
)
from hf_ghosts.probe import model_inputs
from tests.helpers import random_direction, text_dataset, tiny_causal_lm, tiny_tokenizer, token_batch, token_dataset
from tests.own_attention import own_attention_lm
from tests.references import float64_copy, reference_output_spreads

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def sft_kwargs(tmp_path, **overrides) -> dict:
    base = dict(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, max_length=12, disable_tqdm=True, seed=0)
    return {**base, **overrides}


def tiny(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------------------ rho_trainer / rho_arguments
def test_built_classes_are_cached_named_and_picklable() -> None:
    from trl import SFTConfig, SFTTrainer

    assert rho_trainer(Trainer) is RhoTrainer and rho_arguments(TrainingArguments) is RhoTrainingArguments
    built = rho_trainer(SFTTrainer)
    assert built is rho_trainer(SFTTrainer) and built.__name__ == "RhoSFTTrainer" and issubclass(built, SFTTrainer)
    assert rho_arguments(SFTConfig) is built.rho_arguments_class and built.rho_arguments_class.__name__ == "RhoSFTConfig"
    assert rho_trainer(built) is built and rho_arguments(RhoTrainingArguments) is RhoTrainingArguments
    args = rho_arguments(SFTConfig)(output_dir="x", rho_target=0.5, max_length=7, use_cpu=True)
    again = pickle.loads(pickle.dumps(args))
    assert type(again) is type(args) and again.rho_target == 0.5 and again.max_length == 7
    assert copy.deepcopy(args).rho_settings() == args.rho_settings()
    with pytest.raises(TypeError, match="Trainer or a subclass"):
        rho_trainer(TrainingArguments)


def test_sft_config_is_upgraded_with_every_value_kept(tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**sft_kwargs(tmp_path, max_length=11, learning_rate=3e-3), model_init_kwargs={"dtype": "float32"})
    trainer = rho_trainer(SFTTrainer)(model=tiny_causal_lm("llama"), args=config, train_dataset=text_dataset(),
                                      processing_class=tiny_tokenizer())
    assert type(trainer.args).__name__ == "RhoSFTConfig"
    assert (trainer.args.max_length, trainer.args.learning_rate, trainer.args.rho_mode) == (11, 3e-3, "clip")
    assert trainer.args.model_init_kwargs == {"dtype": "float32"}


@pytest.mark.slow
def test_sft_trainer_clips_every_step(tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    RhoSFTTrainer = rho_trainer(SFTTrainer)  # noqa: N806 (a class)
    args = rho_arguments(SFTConfig)(**sft_kwargs(tmp_path, learning_rate=1e-1), rho_target=0.05, rho_every=1)
    trainer = RhoSFTTrainer(model=tiny_causal_lm("llama"), args=args, train_dataset=text_dataset(),
                            processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ghosts/r" in h]
    assert len(logs) == 2 and all(h["ghosts/clipped"] == 1 for h in logs)
    assert all(h["ghosts/r_applied"] == pytest.approx(0.05, rel=1e-4) for h in logs)
    assert all(h["ghosts/block_probes"] > 0 for h in logs)  # the clip's default: block by block
    assert "mean_token_accuracy" in logs[0]  # SFTTrainer's own metrics are still there


def test_lora_sft_trainer_clips_the_adapters_block_by_block(tmp_path) -> None:
    """LoRA on q_proj and v_proj under the clip's default: the adapters join their base modules' blocks (q/k, v/o),
    each scaled on its own, and the applied step stays within r*."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = rho_arguments(SFTConfig)(**sft_kwargs(tmp_path, learning_rate=1e-1), rho_target=0.05, rho_every=1,
                                    rho_estimator="jvp")
    trainer = rho_trainer(SFTTrainer)(model=tiny_causal_lm("llama"), args=args, train_dataset=text_dataset(),
                                      processing_class=tiny_tokenizer(),
                                      peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.rho_controller.block_step.blocks.kinds == ("qk", "vo")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ghosts/r" in h]
    assert logs and all(h["ghosts/clipped"] == 1 and h["ghosts/block_probes"] > 0 for h in logs)
    assert all(h["ghosts/r_applied"] <= 0.05 * (1 + 1e-6) for h in logs)
    assert all({"ghosts/block_scale/qk", "ghosts/block_scale/vo"} <= set(h) for h in logs)


def test_rho_callback_on_sft_trainer_measures_with_model_inputs_only(tmp_path) -> None:
    """TRL calls the model with fused_lm_head=True; the probe must not pass that flag on (it used to crash)."""
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=tiny_causal_lm("llama"), args=SFTConfig(**sft_kwargs(tmp_path, max_steps=1)),
                         train_dataset=text_dataset(), processing_class=tiny_tokenizer())
    callback = RhoCallback.install(trainer, every=1, estimator="jvp")
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)) if m.training else None,
                                            with_kwargs=True)
    trainer.train()
    assert any("fused_lm_head" in keys for keys in seen)
    assert math.isfinite(trainer.state.log_history[0]["ghosts/rho"])
    assert callback.controller.last.output_tokens > 0  # the labels the model was called with decide the positions


def test_lora_sft_trainer_uses_the_chunked_head(tmp_path, linear_calls) -> None:
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = rho_arguments(SFTConfig)(**sft_kwargs(tmp_path, max_steps=1), rho_every=1)
    trainer = rho_trainer(SFTTrainer)(model=tiny_causal_lm("llama"), args=args, train_dataset=text_dataset(),
                                      processing_class=tiny_tokenizer(),
                                      peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    probe = trainer.rho_controller.probe
    assert probe._head is not None and type(probe._head.module) is torch.nn.Linear
    head = probe._head.module
    before = linear_calls[head]
    trainer.train()
    assert linear_calls[head] == before  # TRL's fused head and the probe's chunked head: no full logits
    assert set(trainer.rho_controller.names) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert math.isfinite(trainer.state.log_history[0]["ghosts/rho"])


def test_dpo_trainer_is_refused_with_the_reason() -> None:
    from trl import DPOTrainer

    with pytest.raises(ValueError, match=r"rho_trainer\(DPOTrainer\).*logistic loss.*not a softmax cross-entropy"):
        rho_trainer(DPOTrainer)
    subclass = type("MyDPO", (DPOTrainer,), {})
    with pytest.raises(ValueError, match=r"rho_trainer\(MyDPO\): the radius controller does not apply to DPOTrainer: its loss"):
        rho_trainer(subclass)


# ------------------------------------------------------------------------------------------ model inputs only
def test_probe_passes_model_inputs_only() -> None:
    model = tiny_causal_lm("llama")
    batch = token_batch()
    extras = {"fused_lm_head": True, "return_token_accuracy": True, "use_cache": True, "num_items_in_batch": 7,
              "completion_mask": batch["attention_mask"], "position_ids": torch.arange(12).expand(2, 12)}
    assert set(model_inputs(model, {**batch, **extras})) == {"input_ids", "attention_mask", "position_ids"}
    direction = random_direction(model)
    probe = RadiusProbe(model, ("output", "attention"), "jvp")
    with_extras = probe.measure({**batch, **extras}, direction)
    plain = probe.measure({**batch, "position_ids": extras["position_ids"]}, direction)
    torch.testing.assert_close(with_extras.out_spread, plain.out_spread, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ PEFT
def lora(model: torch.nn.Module, **config) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config))


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_lora_chunked_head_equals_the_full_head_in_float64(estimator: str, linear_calls) -> None:
    model = lora(float64_copy(tiny_causal_lm("llama")))
    batch, direction = token_batch(pad_right=3), random_direction(model)
    chunked = RadiusProbe(model, ("output", "attention"), estimator, dtype=F64, chunked_head=True, vocab_chunk=37)
    head = chunked._head.module
    report = chunked.measure(batch, direction)
    assert linear_calls[head] == 0
    full = RadiusProbe(model, ("output", "attention"), estimator, dtype=F64, chunked_head=False).measure(batch, direction)
    assert linear_calls[head] == (1 if estimator == "jvp" else 4)  # fd's first probe checks its step: h and h / 2
    torch.testing.assert_close(report.out_spread, full.out_spread, rtol=1e-6, atol=0)
    torch.testing.assert_close(report.attn_spread, full.attn_spread, rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [dict(modules_to_save=["lm_head"]), dict(target_modules=["q_proj", "lm_head"])],
                         ids=["modules_to_save", "lora_on_head"])
def test_trained_peft_head_switches_the_chunked_head_off_with_the_reason(config: dict) -> None:
    from peft import LoraConfig, get_peft_model

    config = {"target_modules": ["q_proj", "v_proj"], **config}
    model = get_peft_model(float64_copy(tiny_causal_lm("llama")), LoraConfig(r=4, init_lora_weights=False, **config))
    with pytest.raises(ValueError, match="output head is trained through PEFT"):
        RadiusProbe(model, ("output",), dtype=F64, chunked_head=True)
    probe = RadiusProbe(model, ("output",), "jvp", dtype=F64)
    assert probe._head is None  # auto: the full head, with the trained weights
    batch, direction = token_batch(), random_direction(model)
    report = probe.measure(batch, direction)
    reference = reference_output_spreads(model, batch, direction)[:, :-1].amax()
    torch.testing.assert_close(report.out_spread.double(), reference, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ MoE, compile
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_jvp_runs_the_experts_eagerly_and_restores_them(model_type: str) -> None:
    extra = dict(num_key_value_heads=2, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=32)
    model = tiny(model_type, **extra)
    found = model.get_experts_implementation()
    assert found[""] not in (None, "eager")  # _grouped_mm: no forward-mode AD
    batch, direction = token_batch(), random_direction(model)
    jvp = RadiusProbe(model, ("output", "attention"), "jvp").measure(batch, direction)
    fd = RadiusProbe(model, ("output", "attention"), "fd").measure(batch, direction)
    assert model.get_experts_implementation() == found
    torch.testing.assert_close(jvp.rho_out, fd.rho_out, rtol=1e-3, atol=0)
    torch.testing.assert_close(jvp.rho_attn, fd.rho_attn, rtol=1e-3, atol=0)


def test_moe_trainer_with_jvp_trains(tmp_path) -> None:
    model = tiny("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    args = RhoTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                                rho_estimator="jvp", rho_every=1)
    trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset(rows=8))
    trainer.train()
    assert trainer.rho_controller.probes == 2 and math.isfinite(trainer.rho_controller.last_rho)


@pytest.mark.parametrize("how", ["wrapper", "in_place"])
def test_compiled_model_is_measured_as_the_uncompiled_one(how: str) -> None:
    model = tiny_causal_lm("llama")
    reference_model = copy.deepcopy(model)
    if how == "wrapper":
        compiled = torch.compile(model)
    else:
        model.compile()
        compiled = model
    batch, direction = token_batch(), random_direction(reference_model)
    expected = RadiusProbe(reference_model, ("output", "attention"), "jvp").measure(batch, direction)
    controller = RhoController(compiled, estimator="jvp")
    assert set(controller.names) == set(direction)
    report = controller.probe.measure(batch, direction)
    torch.testing.assert_close(report.out_spread, expected.out_spread, rtol=1e-6, atol=0)
    torch.testing.assert_close(report.attn_spread, expected.attn_spread, rtol=1e-6, atol=0)
    assert math.isfinite(float(report.rho))
    if how == "in_place":
        assert model._compiled_call_impl is not None  # restored


# ------------------------------------------------------------------------------------------ sliding windows
def windowed_reference(model, batch, direction, window: int) -> torch.Tensor:
    """``[layers, heads]`` score-slope spreads by float64 central differences, keys ``q - window < k <= q``."""
    from tests.references import central_difference, recorded_scores

    slopes = central_difference(model, direction, lambda: recorded_scores(model, batch))
    length = batch["input_ids"].shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril().triu(1 - window)
    spreads = []
    for layer in slopes:
        high = layer.masked_fill(~allowed, -math.inf).amax(-1)
        low = layer.masked_fill(~allowed, math.inf).amin(-1)
        spreads.append((high - low).amax(dim=(0, 2)))
    return torch.stack(spreads)


@pytest.mark.parametrize("window", [4, 16], ids=["window_inside_the_batch", "mask_left_to_is_causal"])
@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_layers_are_measured(model_type: str, window: int) -> None:
    """Window 16 > length 10: sdpa's mask function returns None (is_causal) and the probe builds the windowed mask
    (it used to raise); window 4: the mask is materialized and must be read as it is."""
    extra = dict(num_key_value_heads=2, sliding_window=window, head_dim=8)
    if model_type == "gemma2":
        extra.update(layer_types=["sliding_attention"] * 2, attn_logit_softcapping=None)  # the reference records raw scores
    model = float64_copy(tiny(model_type, **extra))
    batch = token_batch(length=10)  # an all-ones attention_mask
    direction = random_direction(model)
    report = RadiusProbe(model, ("attention",), "jvp", dtype=F64).measure(batch, direction)
    expected = windowed_reference(model, batch, direction, window)
    # Gemma2's RMSNorm computes in float32 whatever the weights: the reference's differences carry ~1e-3 of rounding
    rtol = 1e-5 if model_type == "mistral" else 1e-2
    torch.testing.assert_close(report.attn_spread.double(), expected, rtol=rtol, atol=1e-9)
    if window < 10:
        assert not torch.allclose(windowed_reference(model, batch, direction, 10), expected, rtol=0.1)


# ------------------------------------------------------------------------------------------ refusals at construction
def test_models_without_attention_are_refused_at_construction_named_as_the_caller_knows(tmp_path) -> None:
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                                                   state_size=4))
    with pytest.raises(ValueError, match=r"no attention layer.*Set radii=\('output',\)"):
        RadiusProbe(mamba)
    with pytest.raises(ValueError, match=r"no attention layer.*Set radii=\('output',\)"):
        RhoController(mamba)
    args = RhoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"RhoTrainingArguments: .*no attention layer.*Set rho_radii=\['output'\]"):
        RhoTrainer(model=mamba, args=args)
    own = own_attention_lm()  # its own attention code in every transformers release (Falcon's moved in 5.25)
    with pytest.raises(ValueError, match=r"'own_attention'.*does not route its attention.*Set rho_radii=\['output'\]"):
        RhoTrainer(model=own, args=args)
    RhoTrainer(model=own, args=RhoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                    rho_radii=["output"]))
    with pytest.raises(ValueError, match="drop 'ffn' from rho_radii"):
        RhoTrainer(model=tiny("mixtral", num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
                   args=RhoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                             rho_radii=["output", "ffn"]))
    assert RhoTrainer(model=mamba, args=RhoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                             rho_radii=["output"])).rho_controller.probe


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("args_cls", ["RhoTrainingArguments", "RhoSFTConfig"])
def test_command_line_comma_form_and_non_finite_target(args_cls: str, tmp_path) -> None:
    from trl import SFTConfig

    cls = RhoTrainingArguments if args_cls == "RhoTrainingArguments" else rho_arguments(SFTConfig)
    parser = HfArgumentParser(cls)
    cpu = ["--output_dir", str(tmp_path), "--use_cpu", "True", "--bf16", "False"]  # SFTConfig defaults to bf16
    (args,) = parser.parse_args_into_dataclasses([*cpu, "--rho_radii", "output,ffn"])
    assert args.rho_radii == ["output", "ffn"]
    (args,) = parser.parse_args_into_dataclasses([*cpu, "--rho_radii", "output", "attention"])
    assert args.rho_radii == ["output", "attention"]
    with pytest.raises(ValueError, match=r"rho_target: got inf \(not finite\); expected a finite number > 0"):
        parser.parse_args_into_dataclasses([*cpu, "--rho_target", "inf"])


def test_a_second_train_starts_from_clean_counters(tmp_path) -> None:
    args = RhoTrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, rho_every=1)
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=token_dataset(rows=8))
    trainer.train()
    assert (trainer.rho_controller.steps, trainer.rho_controller.probes) == (3, 3)
    trainer.train()
    assert (trainer.rho_controller.steps, trainer.rho_controller.probes) == (3, 3)


# ------------------------------------------------------------------------------------------ fd accuracy
@pytest.mark.parametrize("norm_scale", [30.0, 300.0, 1000.0])
def test_fd_on_saturated_softcapped_logits_stays_within_one_percent_of_jvp(norm_scale: float) -> None:
    """Gemma2's logits capped at 30 and saturated (final norm scaled up), moved along the norm's scale: the slopes
    are tiny next to |z|, so at the fixed step the differences were mostly float32 rounding (1%, 5%, 28% off jvp);
    the rounding guard widens the step (two more forwards) only there."""
    model = tiny("gemma2", num_key_value_heads=2, head_dim=8)
    with torch.no_grad():
        model.model.norm.weight.fill_(norm_scale - 1)  # Gemma's RMSNorm multiplies by (1 + weight)
    batch, direction = token_batch(length=10), {"model.norm.weight": torch.ones(32)}
    jvp = RadiusProbe(model, ("output",), "jvp").measure(batch, direction)
    probe = RadiusProbe(model, ("output",), "fd")
    forwards = []
    probe.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    fd = probe.measure(batch, direction)
    torch.testing.assert_close(fd.rho_out, jvp.rho_out, rtol=1e-2, atol=0)
    # the guard fired: a second pair of forwards at the wider step w, then the step check's pair at w / 2
    assert len(forwards) == 6 and float(fd.fd_step) > 2 * probe.settings.fd_step


def test_fd_rounding_guard_costs_nothing_on_ordinary_logits() -> None:
    model = tiny("gemma2", num_key_value_heads=2, head_dim=8)
    probe = RadiusProbe(model, ("output", "attention"), "fd")
    forwards = []
    probe.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    probe.measure(token_batch(length=10), random_direction(model))
    assert len(forwards) == 4  # the step check's pairs at h and h / 2, nothing from the guard
