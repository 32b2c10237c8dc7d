"""RhoTrainer: the clip after AdamW, checked against plain AdamW, a fresh probe, resume, bf16 and bad input."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPTNeoXModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_ghosts import RadiusProbe, RhoTrainer, RhoTrainingArguments
from hf_ghosts.settings import DEFAULT_TARGETS, SETTINGS
from tests.helpers import StepRecorder, rho_args, tiny_causal_lm, tiny_config, token_dataset
from tests.references import AdamWReplay

ARGUMENTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "arguments.md"

pytestmark = pytest.mark.usefixtures("single_thread")


def flat_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class LastTrainingBatch:
    """Remembers the inputs of the model's last training-mode forward (a forward pre-hook; no Trainer internals)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inputs: dict[str, torch.Tensor] | None = None
        model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            self.inputs = {key: value.clone() for key, value in kwargs.items() if key != "num_items_in_batch" and torch.is_tensor(value)}


class Lockstep(TrainerCallback):
    """Replays every optimizer step with a plain ``torch.optim.AdamW`` (:class:`AdamWReplay`).

    Before each step the replay gets the model's (old) weights, its clipped gradients and the groups'
    current learning rates; it gives ``u``, the update AdamW proposes. After the real
    (controlled) step, each row holds the controller's record, ``|u|``, the relative distance between
    the applied update and ``scale * u``, and ``rho`` from a fresh ``RadiusProbe`` at the old weights
    along ``u`` on the last training batch.
    """

    def __init__(self, trainer: RhoTrainer, probe_model: torch.nn.Module | None = None) -> None:
        self.trainer = trainer
        self.model = trainer.model
        self.batch = LastTrainingBatch(self.model)
        args = trainer.args  # the controller's own (resolved) estimator: a fresh probe repeats its measurement exactly
        self.probe = RadiusProbe(probe_model or self.model, radii=tuple(args.rho_radii),
                                 estimator=trainer.rho_controller.probe.estimator, fd_step=args.rho_fd_step)
        self.rows: list[dict] = []
        self.grad_norms: list[float] = []
        self.learning_rates: list[list[float]] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        self.replay = AdamWReplay(self.model, optimizer)
        assert type(self.replay.real) is torch.optim.AdamW, type(self.replay.real)

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.old = snapshot(self.model)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.learning_rates.append([group["lr"] for group in self.replay.real.param_groups])
        self.u = self.replay.propose()

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        record = self.trainer.rho_controller.last
        u = self.u
        applied = {name: p.detach() - self.old[name] for name, p in self.model.named_parameters()}
        scaled = {name: record.scale * u[name] for name in u}
        deviation = flat_norm({name: applied[name] - scaled[name] for name in u}) / flat_norm(scaled)
        report = self.probe.measure(self.batch.inputs, u, params=self.old)
        self.rows.append(
            {
                **record.scalars(),
                "u_norm": flat_norm(u),
                "applied_norm": flat_norm(applied),
                "deviation": deviation,
                "fresh_rho": float(report.rho),
                "old": self.old,
                "batch": self.batch.inputs,
                "u": u,
            }
        )


# ----------------------------------------------------------------------------- the clip after AdamW


@pytest.mark.parametrize(("mode", "lr"), [("clip", 0.05), ("set", 1e-3)])
def test_update_is_scale_times_plain_adamw_and_rho_matches_a_fresh_probe(tmp_path, mode: str, lr: float) -> None:
    r_target = 0.5
    args = rho_args(tmp_path, rho_mode=mode, rho_target=r_target, learning_rate=lr, weight_decay=0.1, max_steps=5,
                    rho_granularity="global")  # one scale: the applied update is scale * AdamW's
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=token_dataset())
    lockstep = Lockstep(trainer)
    trainer.add_callback(lockstep)
    trainer.train()

    rows = lockstep.rows
    assert len(rows) == 5 and all(row["probed"] for row in rows)
    for t, row in enumerate(rows):
        assert row["update_norm"] == pytest.approx(row["u_norm"], rel=1e-6), "the controller saw another update than AdamW's"
        assert row["deviation"] < 1e-4, f"applied update is not scale * u: {row['deviation']}"
        assert row["rho"] == pytest.approx(row["fresh_rho"], rel=1e-6)
        assert row["r"] == pytest.approx(row["u_norm"] / row["fresh_rho"], rel=1e-5)
        if mode == "clip":
            assert row["r_applied"] <= r_target * (1 + 1e-12)
            assert row["applied_norm"] / row["fresh_rho"] <= r_target * (1 + 1e-5)
            assert row["scale"] == pytest.approx(min(1.0, r_target * row["fresh_rho"] / row["u_norm"]), rel=1e-5)
        else:  # set: r* follows the Trainer's default linear decay over the 5 steps, lr(t) / lr = 1 - t / 5
            assert row["r_applied"] == pytest.approx(r_target * (1 - t / 5), rel=1e-6)
            assert row["applied_norm"] / row["fresh_rho"] == pytest.approx(r_target * (1 - t / 5), rel=1e-5)
    scales = [row["scale"] for row in rows]
    if mode == "clip":
        assert sum(row["clipped"] for row in rows) >= 3 and min(scales) < 0.5, scales
    else:
        assert max(scales) > 1.0, scales


def test_bf16_training_probes_in_float32(tmp_path) -> None:
    """Under bf16 Accelerate wraps ``model.forward`` in autocast; the probe must measure in fp32 anyway."""
    model = tiny_causal_lm("gpt_neox")
    args = rho_args(tmp_path, bf16=True, max_steps=3, learning_rate=0.05)
    trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset())
    fp32_model = tiny_causal_lm("gpt_neox")  # never wrapped: a plain float32 forward
    lockstep = Lockstep(trainer, probe_model=fp32_model)
    trainer.add_callback(lockstep)
    trainer.train()

    assert hasattr(model, "_original_forward"), "Accelerate did not wrap forward in autocast: the test would prove nothing"
    bf16_model = tiny_causal_lm("gpt_neox")
    bf16_model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(bf16_model.forward)
    bf16_probe = RadiusProbe(bf16_model, radii=tuple(args.rho_radii))
    deviations = []
    for row in lockstep.rows:
        assert row["rho"] == pytest.approx(row["fresh_rho"], rel=1e-6)
        bf16_rho = float(bf16_probe.measure(row["batch"], row["u"], params=row["old"]).rho)
        deviations.append(abs(bf16_rho / row["fresh_rho"] - 1))
    assert max(deviations) > 1e-4, f"a bf16 probe should be visibly off here (100x the 1e-6 above): {deviations}"
    assert any(row["clipped"] for row in lockstep.rows)


@pytest.mark.parametrize("user_optimizer", [False, True])
def test_gradient_accumulation_probes_once_per_step_on_the_last_micro_batch(tmp_path, user_optimizer: bool) -> None:
    model = tiny_causal_lm("gpt_neox")
    args = rho_args(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        train_sampling_strategy="sequential", max_grad_norm=0.05, learning_rate=0.05, weight_decay=0.1,
        lr_scheduler_type="linear", rho_radii=["output", "attention", "ffn"], rho_granularity="global",
    )
    base_lr = 0.08 if user_optimizer else args.learning_rate
    optimizers = (torch.optim.AdamW(model.parameters(), lr=base_lr), None) if user_optimizer else (None, None)
    data = token_dataset(rows=12)
    trainer = RhoTrainer(model=model, args=args, train_dataset=data, optimizers=optimizers)
    probed: list[torch.Tensor] = []
    measure = trainer.rho_controller.probe.measure

    def spy(inputs, direction, params=None, **keywords):
        probed.append(inputs["input_ids"].clone())
        return measure(inputs, direction, params, **keywords)

    trainer.rho_controller.probe.measure = spy
    lockstep = Lockstep(trainer)
    trainer.add_callback(lockstep)
    trainer.train()

    ids = torch.tensor(data["input_ids"])
    assert len(probed) == 3, "exactly one probe per optimizer step"
    for step, inputs in enumerate(probed):  # micro-batches 2k and 2k+1 make step k; the probe sees 2k+1
        assert torch.equal(inputs, ids[4 * step + 2 : 4 * step + 4])
    # max_grad_norm clipped the gradients AdamW saw (the logged norm is the one before clipping).
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert min(logged) > 0.05
    assert all(norm <= 0.05 * (1 + 1e-5) for norm in lockstep.grad_norms)
    # The linear schedule set the learning rate of every step, in every parameter group.
    for step, rates in enumerate(lockstep.learning_rates):
        assert rates == pytest.approx([base_lr * (3 - step) / 3] * len(rates))
    # And the controller rescaled what that optimizer proposed.
    for row in lockstep.rows:
        assert row["update_norm"] == pytest.approx(row["u_norm"], rel=1e-6)
        assert row["deviation"] < 1e-4
        assert row["rho"] == pytest.approx(row["fresh_rho"], rel=1e-6)
    assert any(row["clipped"] for row in lockstep.rows)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize(("restore_callbacks", "granularity"), [(False, "global"), (True, "global"), (False, "blocks")])
def test_resume_is_exact_including_the_gpt_neox_head(tmp_path, restore_callbacks: bool, granularity: str) -> None:
    # Triggers off: probes at steps 1, 3, 5, so step 4 (the first after resuming) reuses the rho saved at step 3.
    # Blocks: the block spreads measured at step 1 are reused at steps 3 and 5 (refresh every 4 block steps), so step 5
    # after the resume takes them from the checkpoint.
    common = dict(
        max_steps=6, save_strategy="steps", save_steps=3, logging_steps=2, learning_rate=0.05,
        rho_every=2, rho_trigger_r=math.inf, rho_trigger_growth=math.inf, rho_granularity=granularity,
        restore_callback_states_from_checkpoint=restore_callbacks,
    )
    straight = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path, **common), train_dataset=token_dataset())
    straight.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    assert "embed_out.weight" in saved and "lm_head.weight" not in saved, "the checkpoint no longer renames the head"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["RhoControllerState"]
    assert (stored["attributes"]["controller_state"]["steps"], stored["attributes"]["controller_state"]["probes"]) == (3, 2)

    # Start from other weights, so that anything the resume fails to load shows.
    resumed = RhoTrainer(
        model=tiny_causal_lm("gpt_neox", seed=7),
        args=rho_args(tmp_path, output_dir=str(tmp_path / "resumed"), **common),
        train_dataset=token_dataset(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    expected = straight.model.state_dict()
    got = resumed.model.state_dict()
    assert set(got) == set(expected)
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert differing == []
    assert torch.equal(got["lm_head.weight"], expected["lm_head.weight"])
    assert resumed.rho_controller.state_dict() == straight.rho_controller.state_dict()
    assert straight.rho_controller.probes == 3  # steps 1, 3, 5: step 4 reuses the rho saved at step 3

    def ghosts_after(trainer: RhoTrainer, step: int) -> list[dict]:
        return [
            {key: value for key, value in entry.items() if key.startswith("ghosts/")}
            for entry in trainer.state.log_history
            if "loss" in entry and entry["step"] > step
        ]

    # The window open at the checkpoint (step 3) is logged at step 4 by both runs.
    assert ghosts_after(resumed, 3) == ghosts_after(straight, 3)
    assert any(entry["ghosts/clipped"] > 0 for entry in ghosts_after(straight, 0))
    if granularity == "blocks":  # steps 1, 3, 5 block-wise: the blocks measured at step 1 only (plus w each time)
        probes = [entry["ghosts/block_probes"] for entry in ghosts_after(straight, 0)]
        assert probes[0] > 2 and probes[1:] == [1.0, 1.0], probes
        assert straight.rho_controller.state_dict()["blocks"]["since_refresh"] == 2


def test_resume_from_a_plain_trainer_checkpoint_starts_the_controller_afresh(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    common = dict(save_strategy="steps", save_steps=2, learning_rate=0.05)
    plain = Trainer(model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path, max_steps=2, **common), train_dataset=token_dataset())
    plain.train()
    resumed = RhoTrainer(
        model=tiny_causal_lm("gpt_neox"),
        args=rho_args(tmp_path, output_dir=str(tmp_path / "resumed"), max_steps=4, **common),
        train_dataset=token_dataset(),
    )
    with caplog.at_level(logging.WARNING, logger="hf_ghosts"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert "holds no RhoController state" in caplog.text
    stored = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert stored["RhoControllerState"]["attributes"]["controller_state"]["steps"] == 2  # steps 3 and 4


def test_best_model_loads_the_renamed_head(tmp_path) -> None:
    trainer = RhoTrainer(
        model=tiny_causal_lm("gpt_neox"),
        args=rho_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=token_dataset(),
    )
    trainer.train()
    trained = {name: t.clone() for name, t in trainer.model.state_dict().items()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer.state.best_model_checkpoint = str(tmp_path / "out" / "checkpoint-2")
    trainer._load_best_model()
    assert all(torch.equal(t, trained[name]) for name, t in trainer.model.state_dict().items())


# ----------------------------------------------------------------------------- settings and bad input


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_is_unchanged_by_training(tmp_path, implementation: str) -> None:
    model = tiny_causal_lm("gpt_neox", attn_implementation=implementation)
    trainer = RhoTrainer(model=model, args=rho_args(tmp_path, max_steps=2), train_dataset=token_dataset())
    recorder = StepRecorder(lambda: trainer.rho_controller)
    trainer.add_callback(recorder)
    trainer.train()
    assert model.config._attn_implementation == implementation
    assert all(math.isfinite(record.rho_attn) for record in recorder.records)


def test_model_without_logits_is_refused_at_construction(tmp_path) -> None:
    backbone = GPTNeoXModel(tiny_config("gpt_neox"))
    with pytest.raises(ValueError, match="logits"):
        RhoTrainer(model=backbone, args=rho_args(tmp_path), train_dataset=token_dataset())


def test_unsupported_architecture_for_the_ffn_radius(tmp_path) -> None:
    bert = BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match=r"FFN radius does not know model_type 'bert'.*ffn_spec"):
        RhoTrainer(model=bert, args=rho_args(tmp_path, rho_radii=["output", "ffn"]))


def test_batch_without_labels_gives_no_output_radius_and_no_clip(tmp_path) -> None:
    data = token_dataset(rows=8)
    labels = data["labels"]
    data = data.remove_columns("labels").add_column("labels", [row if i % 2 == 0 else [-100] * len(row) for i, row in enumerate(labels)])
    args = rho_args(
        tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, train_sampling_strategy="sequential",
        max_steps=3, learning_rate=0.05, rho_radii=["output"],
    )
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=data)
    trainer.train()  # the probed (second) micro-batch of every step has labels -100 only
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and trainer.rho_controller.probes == 3
    for entry in logs:
        assert entry["ghosts/no_output_tokens"] == 1.0
        assert "ghosts/rho_out" not in entry and "ghosts/rho" not in entry  # not measured: not logged as inf
        assert entry["ghosts/scale"] == 1.0 and entry["ghosts/clipped"] == 0.0 and entry["ghosts/r"] == 0.0
        assert entry["ghosts/update_norm"] > 0


def test_zero_learning_rate_means_no_probe_and_scale_one(tmp_path) -> None:
    model = tiny_causal_lm("gpt_neox")
    before = snapshot(model)
    trainer = RhoTrainer(model=model, args=rho_args(tmp_path, learning_rate=0.0, max_steps=2), train_dataset=token_dataset())
    trainer.train()
    assert trainer.rho_controller.probes == 0 and trainer.rho_controller.steps == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["ghosts/scale"] for entry in logs] == [1.0, 1.0]
    assert [entry["ghosts/update_norm"] for entry in logs] == [0.0, 0.0]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_gradient_checkpointing_trains_identically_and_still_probes(tmp_path) -> None:
    finals = []
    for checkpointing in (False, True):
        model = tiny_causal_lm("gpt_neox")
        args = rho_args(tmp_path, activation_checkpointing=checkpointing, max_steps=3, learning_rate=0.05)
        trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset())
        trainer.train()
        assert model.is_gradient_checkpointing is checkpointing
        assert trainer.rho_controller.probes == 3
        finals.append(snapshot(model))
    assert all(torch.equal(finals[1][name], value) for name, value in finals[0].items())


def test_deepspeed_is_refused(tmp_path) -> None:
    class DeepSpeedLike(RhoTrainer):
        """A Trainer whose Accelerator reports a DeepSpeed plugin (deepspeed itself is not installed)."""

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            self.is_deepspeed_enabled = True

    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        DeepSpeedLike(model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path))


class InjectNan(TrainerCallback):
    """Puts a NaN into one gradient (after Trainer's clipping) before optimizer step ``at`` (0-based)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step == self.at:
            next(model.parameters()).grad.view(-1)[0] = math.nan


class WeightsAroundStep(TrainerCallback):
    def __init__(self) -> None:
        self.changed: list[bool] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        self.before = snapshot(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        self.changed.append(any(not torch.equal(p, self.before[name]) for name, p in model.named_parameters()))


@pytest.mark.parametrize("source", ["gradient", "learning_rate"])
def test_nonfinite_step_is_skipped_with_a_warning(tmp_path, caplog: pytest.LogCaptureFixture, source: str) -> None:
    model = tiny_causal_lm("gpt_neox")
    args = rho_args(tmp_path, max_steps=3, learning_rate=1e-2)
    optimizers = (None, None)
    if source == "learning_rate":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        optimizers = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: math.nan if step == 1 else 1.0))
    trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset(), optimizers=optimizers)
    if source == "gradient":
        trainer.add_callback(InjectNan(at=1))
    watch = WeightsAroundStep()
    trainer.add_callback(watch)
    with caplog.at_level(logging.WARNING, logger="hf_ghosts"):
        trainer.train()
    reason = "gradient" if source == "gradient" else "update"
    assert f"skipped optimizer step 2: non-finite {reason}" in caplog.text
    assert watch.changed == [True, False, True]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["ghosts/skipped_nonfinite"] for entry in logs] == [0.0, 1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rho_mode", "clipped"),
        ("rho_estimator", "exact"),
        ("rho_probe_dtype", "bf16"),
        ("rho_probe_dtype", "auto16"),
        ("rho_radii", ["output", "logits"]),
        ("rho_radii", []),
        ("rho_target", 0.0),
        ("rho_target", -1.0),
        ("rho_target", math.inf),
        ("rho_target", math.nan),
        ("rho_every", 0),
        ("rho_every", 2.5),
        ("rho_fd_step", 0.0),
        ("rho_fd_step", math.inf),
        ("rho_trigger_r", 0.0),
        ("rho_trigger_growth", 0.5),
    ],
)
def test_invalid_arguments_fail_naming_the_field(tmp_path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"RhoTrainingArguments.{field}"):
        RhoTrainingArguments(output_dir=str(tmp_path), report_to=[], **{field: value})


def test_comma_separated_radii_are_split(tmp_path) -> None:
    args = RhoTrainingArguments(output_dir=str(tmp_path), report_to=[], rho_radii="output, ffn")
    assert args.rho_radii == ["output", "ffn"]


def documented_argument_defaults() -> dict[str, object]:
    """``{field: default}`` of the table of every field in docs/arguments.md (rows ``| `rho_x` | `default` | ... |``)."""
    rows = re.findall(r"^\| `(rho_\w+)` \| `([^`]*)` \|", ARGUMENTS_PAGE.read_text(), flags=re.MULTILINE)
    return {name: ast.literal_eval(default) for name, default in rows}


def test_plain_training_arguments_are_upgraded(tmp_path) -> None:
    plain = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=0.123, per_device_train_batch_size=3, warmup_steps=2,
        weight_decay=0.01, report_to=[], use_cpu=True, logging_steps=7, seed=11,
    )
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=plain, train_dataset=token_dataset())
    assert isinstance(trainer.args, RhoTrainingArguments)
    documented = documented_argument_defaults()
    rho_fields = sorted(f.name for f in dataclasses.fields(RhoTrainingArguments) if f.name.startswith("rho_"))
    assert sorted(documented) == rho_fields, "docs/arguments.md's table and the rho_* fields differ"
    assert {name: getattr(trainer.args, name) for name in documented} == documented
    mismatched = {
        name: (getattr(plain, name), getattr(trainer.args, name))
        for name in plain.__dataclass_fields__
        if getattr(plain, name) != getattr(trainer.args, name)
    }
    assert mismatched == {}
    assert trainer.rho_controller.mode == "clip" and trainer.rho_controller.r_target == DEFAULT_TARGETS["clip"] == 2.0
    probe = trainer.rho_controller.probe  # "auto" on CPU in fp32: today's fp32 central differences
    assert (probe.estimator, probe.dtype) == ("fd", torch.float32)


# The 20 settings of the controller and the probe, as the arguments spell them, in declaration order (written out
# by hand: a field added, dropped or renamed must show here).
RHO_FIELDS = [
    "rho_mode", "rho_target", "rho_radii", "rho_watch_radii", "rho_ffn_mode", "rho_set_schedule", "rho_estimator",
    "rho_probe_dtype", "rho_every", "rho_trigger_r", "rho_trigger_growth", "rho_log_per_head", "rho_fd_step",
    "rho_radius", "rho_topk", "rho_rescale_moments", "rho_granularity", "rho_block_refresh", "rho_ffn_quantile",
    "rho_vocab_chunk",
]


def test_argument_parser_shows_and_parses_the_rho_fields(tmp_path) -> None:
    parser = HfArgumentParser(RhoTrainingArguments)
    text = " ".join(parser.format_help().split())
    rho_fields = [f for f in dataclasses.fields(RhoTrainingArguments) if f.name.startswith("rho_")]
    assert [f.name for f in rho_fields] == RHO_FIELDS  # every setting, none lost, none added unseen
    assert sorted(setting.argument for setting in SETTINGS.values()) == sorted(RHO_FIELDS)
    for f in rho_fields:
        assert f"--{f.name}" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--rho_mode", "set", "--rho_target", "0.5",
         "--rho_radii", "output", "ffn", "--rho_every", "3", "--rho_log_per_head", "true"]
    )
    assert (args.rho_mode, args.rho_target, args.rho_radii, args.rho_every, args.rho_log_per_head) == ("set", 0.5, ["output", "ffn"], 3, True)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--rho_mode", "sometimes"])
