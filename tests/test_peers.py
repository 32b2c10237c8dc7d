"""recipes/peers.py: ZClip and OLMo-core's skip-step optimizer wired into transformers.Trainer, checked by behaviour.

ZClip (``zclip``) is in the ``[test]`` extra: its tests always run. OLMo-core (``ai2-olmo-core``) is only in ``[peers]``
(it needs huggingface_hub<2, transformers 5.25 needs >=2.4): the tests that run its optimizer skip without it; the
feed itself (what the optimizer is given before each step) is tested here with a recording optimizer.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from presets import build_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from tests.helpers import SMALL_DATA, recipe

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB, LENGTH, SPIKE = 64, 16, 1000.0


@pytest.fixture(scope="module")
def peers():
    return recipe("peers")


def blocks(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def arguments(tmp_path: Path, steps: int, **overrides: Any) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                    max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                    lr_scheduler_type="constant", dataloader_pin_memory=False)
    return TrainingArguments(**{**settings, **overrides})


class LossSpike:
    """A trainer mixin: the training loss times ``SPIKE`` at optimizer step ``spike_at`` (a gradient-norm and loss
    outlier with the same direction)."""

    spike_at = -1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.state.global_step != self.spike_at:
            return loss
        return (loss[0] * SPIKE, *loss[1:]) if return_outputs else loss * SPIKE


class GradNormAfter(TrainerCallback):
    """The total gradient norm the optimizer is about to use, per step (added after the callback under test)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))


class WeightsMoved(TrainerCallback):
    """Per optimizer step: did any weight change across ``optimizer.step()``?"""

    def __init__(self) -> None:
        self.moved: list[bool] = []
        self._before: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.moved.append(any(not torch.equal(a, p) for a, p in zip(self._before, model.parameters(), strict=True)))


def spiked_trainer(base: type, spike_at: int) -> type:
    return type("SpikedLoss" + base.__name__, (LossSpike, base), {"spike_at": spike_at})


# --------------------------------------------------------------------------------------------- refusing without the extra
def test_missing_package_is_an_import_error_naming_the_extra(peers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a peer whose package is missing fails at argument parsing, with the pip line; other methods don't."""
    monkeypatch.setitem(sys.modules, "zclip", None)  # import zclip -> ImportError
    monkeypatch.setitem(sys.modules, "olmo_core.optim", None)
    for method, distribution in (("zclip", "'zclip'"), ("skip-step", "'ai2-olmo-core'")):
        with pytest.raises(ImportError, match=rf"{method!r} needs the package {distribution} of the \[peers\] extra"):
            peers.require([method])
        with pytest.raises(ImportError, match=r'pip install -e "\.\[peers\]"'):
            recipe("spike_test").SpikeArguments(methods=["adamw", method])
        with pytest.raises(ImportError, match=r'pip install -e "\.\[peers\]"'):
            recipe("lr_sensitivity").SensitivityArguments(methods=["adamw", method])
    peers.require(["adamw", "rho"])
    recipe("spike_test").SpikeArguments()  # the default methods need no peer
    recipe("lr_sensitivity").SensitivityArguments(methods=["skip-step"], replot=True)  # replotting trains nothing


# --------------------------------------------------------------------------------------------- ZClip
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_zclip_clips_a_gradient_spike_in_the_trainer(peers, tmp_path: Path, max_grad_norm: float | None) -> None:
    """Steps 0-3 fill ZClip's warm-up buffer (clipped to max_grad_norm, if any); step 4's loss x 1000 is a z-score
    outlier: the optimizer sees the norm of ZClip's README, ``min(mean + 2.5 std / (z / 2.5), max_grad_norm)`` with
    the buffer's mean and (population) std, ``z = (g - mean) / (std + 1e-6)``; g is the Trainer's own logged norm."""
    after = GradNormAfter()
    zclip = peers.ZClipCallback(warmup_steps=4, max_grad_norm=max_grad_norm)
    trainer = spiked_trainer(Trainer, 4)(model=build_model("pythia-tiny", vocab_size=VOCAB, seed=0),
                                         args=arguments(tmp_path, 5), train_dataset=blocks(10), callbacks=[zclip, after])
    trainer.train()
    before = np.array([h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h], dtype=np.float64)
    assert len(before) == len(after.norms) == 5
    cap = math.inf if max_grad_norm is None else max_grad_norm
    np.testing.assert_allclose(after.norms[:4], np.minimum(before[:4], cap), rtol=1e-5)  # warm-up
    mean, std = before[:4].mean(), before[:4].std()
    z = (before[4] - mean) / (std + 1e-6)
    assert z > 2.5 and before[4] > 100 * before[:4].max()  # the spike: a z-score outlier
    assert after.norms[4] == pytest.approx(min(mean + 2.5 * std / (z / 2.5), cap), rel=1e-5)
    assert after.norms[4] < before[4] / 100
    assert zclip.clipped_fraction() == pytest.approx((1 if max_grad_norm is None else 5) / 5)


def test_zclip_refuses_the_trainers_own_clipping(peers, tmp_path: Path) -> None:
    model = build_model("pythia-tiny", vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0 clips the gradients before ZClip sees them; set max_grad_norm=0"):
        Trainer(model=model, args=arguments(tmp_path, 2, max_grad_norm=1.0), callbacks=[peers.ZClipCallback()])


# --------------------------------------------------------------------------------------------- skip-step: the feed
class RecordingAdamW(torch.optim.AdamW):
    """torch's AdamW with a skip-step optimizer's two inputs; ``seen`` holds what they were when ``step()`` ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[float, float]] = []
        self._loss = self._norm = None

    @property
    def latest_loss(self):
        return self._loss

    @latest_loss.setter
    def latest_loss(self, value):
        self._loss = value

    @property
    def latest_grad_norm(self):
        return self._norm

    @latest_grad_norm.setter
    def latest_grad_norm(self, value):
        self._norm = value

    def step(self, closure=None):
        self.seen.append((float(self._loss), float(self._norm)))
        self._loss = self._norm = None  # each step must be fed anew
        return super().step(closure)


def test_skip_step_feed_gives_the_step_loss_and_grad_norm_before_each_step(peers, tmp_path: Path) -> None:
    """With 2 micro-batches per step: the loss fed is the Trainer's logged loss of that step (both micro-batches) and
    the norm its logged gradient norm, both there when ``step()`` runs."""
    args = arguments(tmp_path, 4, gradient_accumulation_steps=2, per_device_train_batch_size=1)
    trainer = peers.skip_step(Trainer)(model=build_model("pythia-tiny", vocab_size=VOCAB, seed=0), args=args,
                                       train_dataset=blocks(8), optimizer_cls_and_kwargs=(RecordingAdamW, {"lr": 1e-3}))
    trainer.train()
    logged = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    assert len(trainer.optimizer.optimizer.seen) == len(logged) == 4
    np.testing.assert_allclose(trainer.optimizer.optimizer.seen, logged, rtol=1e-5)
    assert trainer.skipped_steps == []  # RecordingAdamW has no step_skipped


def test_skip_step_feed_refuses_what_it_cannot_feed(peers, tmp_path: Path) -> None:
    model = build_model("pythia-tiny", vocab_size=VOCAB, seed=0)
    plain = (torch.optim.AdamW, {"lr": 1e-3})
    with pytest.raises(ValueError, match=r"skip-step: TrainingArguments\.max_grad_norm=1\.0 clips"):
        peers.skip_step(Trainer)(model=model, args=arguments(tmp_path, 2, max_grad_norm=1.0), optimizer_cls_and_kwargs=plain)
    trainer = peers.skip_step(Trainer)(model=model, args=arguments(tmp_path, 2), optimizer_cls_and_kwargs=plain)
    with pytest.raises(TypeError, match="feeds a skip-step optimizer \\(latest_loss, latest_grad_norm\\); got AdamW"):
        trainer.create_optimizer()


# --------------------------------------------------------------------------------------------- skip-step: OLMo-core's
def test_skip_step_skips_an_outlier_step_in_the_trainer(peers, tmp_path: Path) -> None:
    """OLMo-core's SkipStepAdamW (window 8: the rule acts from 4 losses on) inside the Trainer: step 6's loss x 1000
    leaves every weight as it was; every other step moves them."""
    pytest.importorskip("olmo_core.optim", reason="skip-step needs ai2-olmo-core, in the [peers] extra only")
    args = arguments(tmp_path, 9)
    moved = WeightsMoved()
    trainer = spiked_trainer(peers.skip_step(Trainer), 6)(
        model=build_model("pythia-tiny", vocab_size=VOCAB, seed=0), args=args, train_dataset=blocks(18),
        optimizer_cls_and_kwargs=peers.skip_step_adamw(args, rolling_interval_length=8), callbacks=[moved])
    trainer.train()
    assert moved.moved == [True] * 6 + [False] + [True] * 2
    assert trainer.skipped_steps == [6] and peers.peer_summary(trainer) == {"skipped_steps": 1}


def test_skip_step_without_a_skip_is_the_trainers_adamw(peers, tmp_path: Path) -> None:
    """Before its rule can act, SkipStepAdamW at the Trainer's rate, betas, epsilon and weight decay (0.1, none on
    biases and norms) takes the Trainer's AdamW steps: same weights after 5 steps, to 5% of one step (lr) where the
    gradient is rounding noise (the key part of the qkv bias: softmax ignores it; Adam's normalized step amplifies
    the foreach kernels' last-bit differences there), to float32 rounding elsewhere. A wrong weight decay would be
    off by 5e-4, wrong betas by more."""
    pytest.importorskip("olmo_core.optim", reason="skip-step needs ai2-olmo-core, in the [peers] extra only")
    weights = {}
    for name, cls in (("adamw", Trainer), ("skip-step", peers.skip_step(Trainer))):
        model = build_model("pythia-tiny", vocab_size=VOCAB, seed=0)
        cls(model=model, args=arguments(tmp_path / name, 5, weight_decay=0.1), train_dataset=blocks(10)).train()
        weights[name] = dict(model.named_parameters())
    initial = dict(build_model("pythia-tiny", vocab_size=VOCAB, seed=0).named_parameters())
    for key, value in weights["adamw"].items():
        assert not torch.equal(value, initial[key])
        noise = key.endswith("query_key_value.bias")
        torch.testing.assert_close(weights["skip-step"][key], value, rtol=1e-5, atol=5e-5 if noise else 1e-6)


# --------------------------------------------------------------------------------------------- the recipes
def needs_package(method: str) -> None:
    if method == "skip-step":
        pytest.importorskip("olmo_core.optim", reason="skip-step needs ai2-olmo-core, in the [peers] extra only")


def test_existing_methods_keep_their_run_settings() -> None:
    """The sweep's run files of the methods that were there before the peers are read back unchanged: the same
    settings, no peer keys."""
    module = recipe("lr_sensitivity")
    spec, data = module.SensitivityArguments(), recipe("common").DataArguments()
    base = {"max_steps", "batch_size", "logit_every", "logit_blocks", "block_size", "max_train_blocks", "max_eval_blocks",
            "tokenizer_vocab_size", "dataset_name", "train_file"}
    own = {"adamw+clip": {"max_grad_norm"}, "adamw+zloss": {"z_loss"}, "qk-norm+zloss": {"z_loss"}, "rho+zloss": {"z_loss"},
           "rho-best": {"rho_target", "rho_radius", "rho_radii", "rho_every"}}
    for method in ("adamw", "adamw+clip", "adamw+zloss", "qk-norm", "qk-norm+zloss", "rho", "rho+zloss", "rho+qk-norm",
                   "rho-best"):
        assert set(module.run_settings(spec, data, method)) == base | own.get(method, set()), method


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["zclip", "skip-step"])
def test_spike_test_runs_each_peer_beside_adamw(tmp_path: Path, peer: str) -> None:
    """Same data and initial weights as AdamW (the first training loss is the same); ZClip clips (its default bound 1
    is below the tiny model's gradient norms); skip-step skips nothing in 6 steps and so is AdamW, loss for loss."""
    needs_package(peer)
    rows = recipe("spike_test").main([
        "--output_dir", str(tmp_path), "--presets", "pythia-tiny", "--methods", "adamw", peer, "--factors", "1", "10000",
        "--max_steps", "6", "--spike_step", "3", *SMALL_DATA,
    ])
    by = {(r["method"], r["factor"]): r for r in rows}
    assert set(by) == {(m, f) for m in ("adamw", peer) for f in (1.0, 10000.0)}
    for factor in (1.0, 10000.0):
        assert by[peer, factor]["losses"][0] == by["adamw", factor]["losses"][0]
    if peer == "zclip":
        assert 0 < by[peer, 1.0]["clipped_fraction"] <= 1
    else:
        assert by[peer, 1.0]["skipped_steps"] == by[peer, 10000.0]["skipped_steps"] == 0
        np.testing.assert_allclose([x for _, x in by[peer, 1.0]["losses"]], [x for _, x in by["adamw", 1.0]["losses"]],
                                   rtol=1e-5)
    with open(tmp_path / "spike_runs.csv") as handle:
        assert ("skipped_steps" in next(csv.DictReader(handle))) == (peer == "skip-step")
    assert f"| {recipe('spike_test').METHODS[peer]} |" in (tmp_path / "spike_table.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["zclip", "skip-step"])
def test_lr_sensitivity_runs_each_peer_beside_adamw(tmp_path: Path, peer: str) -> None:
    """A peer's run file sits beside AdamW's in the same layout, records the package version and defaults, and starts
    from the same weights (initial eval loss)."""
    needs_package(peer)
    argv = ["--output_dir", str(tmp_path), "--presets", "pythia-tiny", "--methods", "adamw", peer, "--learning_rates",
            "1e-3", "--seeds", "0", "--max_steps", "6", "--logit_every", "3", *SMALL_DATA]
    summary = recipe("lr_sensitivity").main(argv)
    assert summary["runs"] == 2 and summary["missing_runs"] == 0
    runs = {m: json.loads((tmp_path / "runs" / "pythia-tiny" / m / "lr0.001-seed0.json").read_text()) for m in ("adamw", peer)}
    distribution = {"zclip": "zclip", "skip-step": "ai2-olmo-core"}[peer]
    assert runs[peer]["settings"]["peer"] == distribution and runs[peer]["settings"]["peer_version"] == version(distribution)
    assert {k: v for k, v in runs[peer]["settings"].items() if not k.startswith("peer")} == runs["adamw"]["settings"]
    assert runs[peer]["run"]["initial_eval_loss"] == runs["adamw"]["run"]["initial_eval_loss"]
    if peer == "zclip":
        assert runs[peer]["settings"]["peer_defaults"]["z_thresh"] == 2.5 and 0 < runs[peer]["run"]["clipped_fraction"] <= 1
    else:
        assert runs[peer]["settings"]["peer_defaults"]["rolling_interval_length"] == 128
        assert runs[peer]["run"]["skipped_steps"] == 0
        np.testing.assert_allclose(runs[peer]["run"]["train_losses"], runs["adamw"]["run"]["train_losses"], rtol=1e-5)
