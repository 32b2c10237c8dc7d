"""recipes/lr_sensitivity.py: the sensitivity, the z-loss, the logit measurements, the clipping summary, and a smoke run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from presets import build_model
from transformers import TrainingArguments

from tests.helpers import SMALL_DATA, assert_png, recipe
from tests.references import recorded_scores

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def module():
    return recipe("lr_sensitivity")


def test_lr_sensitivity_by_hand(module) -> None:
    sensitivity = module.lr_sensitivity
    # capped at loss_0 = 5: [3, 2, 5 (NaN), 5 (6 > 5)], mean 3.75, minus the best finite loss 2
    assert sensitivity([3.0, 2.0, math.nan, 6.0], 5.0) == pytest.approx(1.75)
    assert sensitivity([4.0, 3.0], 5.0) == pytest.approx(0.5)
    assert sensitivity([2.5, 2.5, 2.5], 5.0) == 0.0  # flat: insensitive
    assert sensitivity([math.inf, 4.0], 5.0) == pytest.approx((5.0 + 4.0) / 2 - 4.0)
    assert math.isnan(sensitivity([math.nan, math.nan], 5.0))
    with pytest.raises(ValueError, match="at least one loss"):
        sensitivity([], 5.0)


def test_mean_regret_against_one_common_best_by_hand() -> None:
    """Issue 30's measure: each method's mean over the rates of ``min(loss, loss_0)`` minus the best loss of ANY method
    on that preset and seed; a method that lowers its own best is not more sensitive for it (unlike Wortsman's)."""
    from types import SimpleNamespace

    report = recipe("lr_sensitivity_report")
    assert report.mean_regret([3.0, 2.0, math.nan, 6.0], 5.0, 1.5) == pytest.approx((3 + 2 + 5 + 5) / 4 - 1.5)
    run = dict(preset="p", seed=0, initial_eval_loss=5.0, diverged=False, max_attention_logit=1.0, max_output_logit=1.0,
               clipped_fraction=0.0, probed_fraction=0.0, train_seconds=1.0)
    losses = {"adamw": [3.0, 4.0], "other": [2.0, 4.5]}
    rows = [dict(run, method=m, learning_rate=lr, final_eval_loss=loss)
            for m, values in losses.items() for lr, loss in zip((1e-3, 1e-2), values, strict=True)]
    table = {row["method"]: row for row in report.summarize(rows, SimpleNamespace(presets=["p"], methods=list(losses)))}
    # common best 2.0: adamw (3 + 4) / 2 - 2 = 1.5, other (2 + 4.5) / 2 - 2 = 1.25; Wortsman's: 0.5 and 1.25
    assert table["adamw"]["regret_mean"] == pytest.approx(1.5) and table["other"]["regret_mean"] == pytest.approx(1.25)
    assert table["other"]["regret_vs_adamw"] == pytest.approx(1.25 / 1.5)
    assert table["other"]["sensitivity_vs_adamw"] == pytest.approx(1.25 / 0.5)
    assert table["other"]["worst_rate_vs_adamw"] == pytest.approx(4.5 / 4.0 - 1)


def test_z_loss_against_a_float64_hand_computation(module, tmp_path: Path) -> None:
    """Training loss = cross-entropy + 1e-4 x mean of logsumexp(z)^2 over the positions that predict a label;
    with the Trainer's ``num_items_in_batch`` the sum is divided by it; evaluation sees the plain loss."""
    model = build_model("pythia-tiny", vocab_size=64, seed=0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 3:6] = -100
    labels[1, 9] = -100
    inputs = {"input_ids": ids, "labels": labels}
    trainer = module.SweepTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
                                  z_loss_weight=1e-4)
    with torch.no_grad():
        model.train()
        plain = model(**inputs)
        logits = plain.logits.double().numpy()
        rows = [(b, t) for b in range(2) for t in range(11) if labels[b, t + 1] != -100]  # t predicts labels[t + 1]
        assert len(rows) == 22 - 4
        lse = [np.log(np.exp(logits[b, t] - logits[b, t].max()).sum()) + logits[b, t].max() for b, t in rows]
        squares = np.square(lse)
        mixed = trainer.compute_loss(model, inputs)
        # float32 losses near 4: 1e-6 absolute (the masked rows alone would move it by ~5e-5)
        assert float(mixed) == pytest.approx(float(plain.loss) + 1e-4 * squares.mean(), abs=1e-6)
        assert float(module.z_loss(plain.logits, labels)) == pytest.approx(squares.mean(), rel=1e-6)
        assert float(module.z_loss(plain.logits, labels, num_items=40)) == pytest.approx(squares.sum() / 40, rel=1e-6)
        model.eval()
        assert torch.equal(trainer.compute_loss(model, inputs), model(**inputs).loss)


def test_qk_norm_model_is_the_llama_plus_qk_norms(module) -> None:
    llama = build_model("llama-tiny", vocab_size=64, seed=3)
    qwen = module.qk_norm_model("llama-tiny", 64, seed=3)
    assert qwen.config.model_type == "qwen3" and qwen.config.head_dim == llama.config.head_dim == 16
    shared = dict(llama.named_parameters())
    extra = {name: p for name, p in qwen.named_parameters() if name not in shared}
    assert sorted(extra) == sorted(f"model.layers.{layer}.self_attn.{qk}_norm.weight" for layer in (0, 1) for qk in "qk")
    assert all(torch.equal(p, torch.ones_like(p)) for p in extra.values())
    assert all(torch.equal(p, shared[name]) for name, p in qwen.named_parameters() if name in shared)
    assert len(shared) == sum(1 for name, _ in qwen.named_parameters() if name in shared)
    with pytest.raises(ValueError, match="is a gpt_neox"):
        module.qk_norm_model("pythia-tiny", 64, seed=0)


@pytest.mark.parametrize("family", ["pythia-tiny", "llama-tiny", "qk-norm"])
def test_max_logits_against_the_recorded_scores(module, family: str) -> None:
    """Max |score| over causal keys from an independent recording attention (tests/references.py), max |z| over the
    positions that predict a label; the model's mode and attention implementation are restored."""
    model = module.qk_norm_model("llama-tiny", 64, 0) if family == "qk-norm" else build_model(family, vocab_size=64, seed=0)
    with torch.no_grad():  # grow the weights so that the maxima are not all alike
        for p in model.parameters():
            p.mul_(4.0)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, 4:] = -100
    predicting = torch.zeros(2, 10, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()
    found = model.config._attn_implementation
    attention, output = module.max_logits(model, batch, predicting)
    assert model.training and model.config._attn_implementation == found
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    expected = max(float(scores.abs().masked_fill(~causal, 0).max()) for scores in recorded_scores(model.eval(), batch))
    assert attention == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        logits = model(**batch).logits
    assert output == pytest.approx(float(logits[predicting].abs().max()), rel=1e-6)
    single = torch.zeros_like(predicting)
    single[1, 2] = True  # one position: that row's max |z| only
    assert module.max_logits(model, batch, single)[1] == pytest.approx(float(logits[1, 2].abs().max()), rel=1e-6)


def test_ghosts_summary_by_hand(module) -> None:
    history = [
        {"step": 0, "eval_loss": 6.0},
        {"step": 2, "loss": 5.0, "ghosts/probed": 1.0, "ghosts/clipped": 0.5, "ghosts/skipped_nonfinite": 0.0,
         "ghosts/bottleneck/output": 2.0, "ghosts/bottleneck/attention": 0.0, "ghosts/r": 3.0, "ghosts/rho": 0.2},
        {"step": 6, "loss": 4.0, "ghosts/probed": 1 / 3, "ghosts/clipped": 1.0, "ghosts/skipped_nonfinite": 1.0,
         "ghosts/bottleneck/output": 0.0, "ghosts/bottleneck/attention": 1.0, "ghosts/r": 9.0, "ghosts/rho": 0.5},
        {"step": 8, "loss": 4.0, "ghosts/skipped_nonfinite": 2.0},  # every step skipped: no fractions logged
        {"step": 8, "train_runtime": 1.0},
    ]
    summary = module.ghosts_summary(history)
    # measured 2 + 3 + 0 steps; probed 2 + 1; clipped 1 + 1; skipped 0 + 1 + 2
    assert summary["probed_fraction"] == pytest.approx(3 / 5) and summary["clipped_fraction"] == pytest.approx(2 / 3)
    assert summary["skipped_steps"] == 3 and summary["bottleneck_counts"] == {"output": 2, "attention": 1}
    assert (summary["binding_radius"], summary["r_max"], summary["rho_min"]) == ("output", 9.0, 0.2)
    plain = module.ghosts_summary([{"step": 2, "loss": 5.0}, {"step": 2, "eval_loss": 4.0}])
    assert math.isnan(plain["probed_fraction"]) and plain["binding_radius"] == ""
    assert "block_probes_per_step" not in summary  # a global run's record is as it was
    history[1]["ghosts/block_probes"], history[2]["ghosts/block_probes"] = 9.0, 1.0
    assert module.ghosts_summary(history)["block_probes_per_step"] == pytest.approx(10 / 5)


def test_block_methods_leave_the_other_methods_run_settings_alone(module) -> None:
    """``rho-blocks`` is ``rho`` plus ``rho_granularity="blocks"``; the run settings (what a run file must match to be
    reused) of the methods that were there before are as they were, so their run files are reused."""
    from common import DataArguments

    spec, data = module.SensitivityArguments(), DataArguments()
    base = {"max_steps", "batch_size", "logit_every", "logit_blocks", "block_size", "max_train_blocks", "max_eval_blocks",
            "tokenizer_vocab_size", "dataset_name", "train_file"}
    assert set(module.run_settings(spec, data, "rho")) == set(module.run_settings(spec, data, "rho+qk-norm")) == base
    assert set(module.run_settings(spec, data, "rho-best")) == base | {"rho_target", "rho_radius", "rho_radii", "rho_every"}
    blocks = module.run_settings(spec, data, "rho-blocks")
    assert {k: v for k, v in blocks.items() if k not in base} == {"rho_granularity": "blocks", "rho_block_refresh": 4}
    assert module.run_settings(spec, data, "rho-blocks+qk-norm") == blocks
    args = {method: module.training_arguments(spec, method, 1e-2, 0, "out") for method in ("rho", "rho-blocks")}
    assert (args["rho"].rho_granularity, args["rho-blocks"].rho_granularity) == ("global", "blocks")
    assert module.applies("llama-tiny", "rho-blocks+qk-norm") and not module.applies("pythia-tiny", "rho-blocks+qk-norm")
    assert module.applies("pythia-tiny", "rho-blocks") and "rho-blocks" not in module.DEFAULT_METHODS


def test_grid_defaults_and_applicability(module) -> None:
    spec = module.SensitivityArguments()
    for preset in spec.presets:
        lrs = spec.learning_rates_of(preset)
        assert max(lrs) / min(lrs) >= 100  # at least two decades
        assert len(spec.seeds_of(preset)) == (3 if preset.endswith("-tiny") else 1)
    keys = list(module.grid(spec))
    assert len(keys) == len(set(keys))
    assert not any(method == "qk-norm" and preset.startswith("pythia") for preset, method, _, _ in keys)
    assert sum(1 for preset, method, _, _ in keys if preset == "llama-tiny" and method == "qk-norm") == 6 * 3
    assert len(keys) == 6 * 6 * 3 + 7 * 6 * 3 + 6 * 6 + 7 * 6
    with pytest.raises(ValueError, match="finite numbers > 0"):
        module.SensitivityArguments(learning_rates=[1e-3, 0.0])


@pytest.mark.slow
def test_lr_sensitivity_smoke(module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 preset x 2 methods x 2 rates x 10 steps: files, the grid, the table recomputed from the CSV, clipping at a
    huge rate, resuming and --replot."""
    argv = ["--output_dir", str(tmp_path), "--presets", "pythia-tiny", "--methods", "adamw", "rho", "--learning_rates",
            "1e-3", "30", "--seeds", "0", "--max_steps", "10", "--logit_every", "5", *SMALL_DATA]
    summary = module.main(argv)
    with open(tmp_path / "lr_sensitivity_runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert [(r["preset"], r["method"], float(r["learning_rate"]), int(r["seed"])) for r in runs] == [
        ("pythia-tiny", method, lr, 0) for lr in (1e-3, 30.0) for method in ("adamw", "rho")]
    by = {(r["method"], float(r["learning_rate"])): r for r in runs}
    assert len({r["initial_eval_loss"] for r in runs}) == 1  # same initial weights for every method and rate
    # At 1e-3 (the main job's rate on this preset) AdamW proposes steps far inside the default clip target r* = 2
    # (r below a quarter of it): nothing is clipped, so the controlled run is AdamW's, bit for bit.
    assert 0 < float(by["rho", 1e-3]["r_max"]) < 0.5
    assert float(by["rho", 1e-3]["clipped_fraction"]) == 0.0
    assert by["adamw", 1e-3]["final_eval_loss"] == by["rho", 1e-3]["final_eval_loss"]
    assert by["adamw", 30.0]["diverged"] == "True" and by["rho", 30.0]["diverged"] == "False"
    assert float(by["rho", 30.0]["clipped_fraction"]) == 1.0 and 0 < float(by["rho", 30.0]["probed_fraction"]) <= 1
    assert by["rho", 30.0]["binding_radius"] in ("output", "attention")
    assert math.isnan(float(by["adamw", 30.0]["clipped_fraction"]))
    assert float(by["adamw", 30.0]["max_output_logit"]) > 10 * float(by["rho", 30.0]["max_output_logit"])
    with open(tmp_path / "lr_sensitivity_table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["method"] for row in table] == ["adamw", "rho"]
    for row in table:  # Wortsman's sensitivity recomputed from the run CSV by numpy
        mine = [r for r in runs if r["method"] == row["method"]]
        losses = np.array([float(r["final_eval_loss"]) for r in mine])
        initial = float(mine[0]["initial_eval_loss"])
        assert float(row["sensitivity_mean"]) == pytest.approx(np.minimum(losses, initial).mean() - losses.min(), rel=1e-9)
    assert summary["runs"] == 4 and summary["missing_runs"] == 0
    assert_png(tmp_path / "lr_sensitivity.png")
    assert_png(tmp_path / "lr_sensitivity_logits.png")
    stored = json.loads((tmp_path / "runs" / "pythia-tiny" / "rho" / "lr30-seed0.json").read_text())
    assert [s[0] for s in stored["run"]["logit_samples"]] == [0, 5, 10] and len(stored["run"]["train_losses"]) == 10

    text = (tmp_path / "lr_sensitivity_table.csv").read_text()
    monkeypatch.setattr(module, "train_run", lambda *args, **kwargs: pytest.fail("a finished run was trained again"))
    module.main(argv)  # resumes: every run file is found
    assert (tmp_path / "lr_sensitivity_table.csv").read_text() == text
    module.main([*argv, "--replot"])
    assert (tmp_path / "lr_sensitivity_table.csv").read_text() == text
    with pytest.raises(ValueError, match="other settings \\(max_steps\\)"):
        module.main([*argv, "--max_steps", "12"])


@pytest.mark.slow
def test_lr_sensitivity_runs_the_block_wise_clip(module, tmp_path: Path) -> None:
    """``rho-blocks`` on llama-tiny at a huge rate: every probed step clipped block-wise, no divergence."""
    argv = ["--output_dir", str(tmp_path), "--presets", "llama-tiny", "--methods", "rho-blocks", "--learning_rates", "30",
            "--seeds", "0", "--max_steps", "6", "--logit_every", "3", *SMALL_DATA]
    module.main(argv)
    stored = json.loads((tmp_path / "runs" / "llama-tiny" / "rho-blocks" / "lr30-seed0.json").read_text())
    run = stored["run"]
    assert stored["settings"]["rho_granularity"] == "blocks" and not run["diverged"]
    assert run["clipped_fraction"] == 1.0 and run["block_probes_per_step"] >= 1.0
