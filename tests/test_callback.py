"""Monitoring: RhoCallback and ``rho_mode="monitor"`` leave training bit-identical and log what they measured."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState

from hf_ghosts import RhoCallback, RhoTrainer
from tests.helpers import StepRecorder, rho_args, tiny_causal_lm, token_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

RADII = ("output", "attention", "ffn")
LAYERS, HEADS = 2, 4  # tiny_config("gpt_neox")
BASE_KEYS = ["ghosts/r", "ghosts/r_applied", "ghosts/rho", "ghosts/rho_out", "ghosts/rho_attn", "ghosts/rho_ffn",
             "ghosts/scale", "ghosts/update_norm", "ghosts/clipped"]
HEAD_KEYS = [f"ghosts/rho_attn/layer_{layer}/head_{head}" for layer in range(LAYERS) for head in range(HEADS)]


def training_logs(trainer: Trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_window_aggregates(logs: list[dict], records: list[dict], window: int) -> None:
    """Each log holds the max of r (and |u|) and the min of the radii over the ``window`` steps since the last log."""
    assert len(logs) * window == len(records)
    for number, entry in enumerate(logs):
        steps = records[number * window : (number + 1) * window]
        probed = [record for record in steps if record.probed]
        assert probed, "every window should hold a probed step"
        assert entry["ghosts/r"] == max(record.r for record in steps)
        assert entry["ghosts/r_applied"] == max(record.r_applied for record in steps)
        assert entry["ghosts/update_norm"] == max(record.update_norm for record in steps)
        assert entry["ghosts/scale"] == min(record.scale for record in steps)
        assert entry["ghosts/rho"] == min(record.rho for record in steps)
        for key in ("rho_out", "rho_attn", "rho_ffn"):
            assert entry[f"ghosts/{key}"] == min(getattr(record, key) for record in probed), key
        assert entry["ghosts/clipped"] == pytest.approx(sum(record.clipped for record in probed) / len(probed))
        heads = torch.stack([record.rho_attn_heads for record in probed]).amin(0)
        for layer in range(LAYERS):
            for head in range(HEADS):
                assert entry[f"ghosts/rho_attn/layer_{layer}/head_{head}"] == float(heads[layer, head])


def test_monitoring_is_bit_identical_to_plain_trainer_and_logs_every_key(tmp_path) -> None:
    finals = {}
    runs = {}
    for kind in ("plain", "callback", "monitor"):
        # Dropout on: a probe that consumed random numbers or left a module in train mode would show.
        model = tiny_causal_lm("gpt_neox", hidden_dropout=0.1, attention_dropout=0.1)
        args = rho_args(
            tmp_path / kind, max_steps=4, logging_steps=2, learning_rate=0.05,
            rho_mode="monitor", rho_radii=list(RADII), rho_log_per_head=True, rho_every=2,  # windows of 2: one probe each
        )
        if kind == "monitor":
            trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset())
            recorder = StepRecorder(lambda trainer=trainer: trainer.rho_controller)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
            if kind == "callback":
                callback = RhoCallback.install(trainer, radii=RADII, log_per_head=True, every=2)
                recorder = StepRecorder(lambda callback=callback: callback.controller)
        if kind != "plain":
            trainer.add_callback(recorder)
        trainer.train()
        finals[kind] = {name: p.detach().clone() for name, p in model.named_parameters()}
        if kind != "plain":
            runs[kind] = (training_logs(trainer), recorder.records)
        if kind == "callback":
            assert callback.controller._handles == [] and not model._forward_pre_hooks, "hooks left behind"

    for kind in ("callback", "monitor"):
        assert all(torch.equal(finals[kind][name], value) for name, value in finals["plain"].items()), kind
        logs, records = runs[kind]
        assert len(logs) == 2
        for entry in logs:
            missing = [key for key in BASE_KEYS + HEAD_KEYS if key not in entry]
            assert missing == [], (kind, missing)
            assert entry["ghosts/r"] == entry["ghosts/r_applied"] and entry["ghosts/scale"] == 1.0
            assert entry["ghosts/clipped"] == 0.0 and entry["ghosts/r"] > 0
        assert_window_aggregates(logs, records, window=2)
    # Both monitors measured the same steps of the same trajectory.
    assert runs["callback"][0] == runs["monitor"][0]


def test_clip_window_aggregates_probed_and_reused_steps(tmp_path) -> None:
    args = rho_args(
        tmp_path, max_steps=6, logging_steps=3, learning_rate=0.02, rho_radii=list(RADII), rho_log_per_head=True,
        rho_every=2, rho_trigger_r=math.inf, rho_trigger_growth=math.inf,
    )
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=token_dataset())
    recorder = StepRecorder(lambda: trainer.rho_controller)
    trainer.add_callback(recorder)
    trainer.train()
    logs, records = training_logs(trainer), recorder.records
    assert [record.probed for record in records] == [True, False, True, False, True, False]
    assert_window_aggregates(logs, records, window=3)
    assert [entry["ghosts/probed"] for entry in logs] == pytest.approx([2 / 3, 1 / 3])
    assert any(record.clipped for record in records)


def test_callback_added_the_usual_way_fills_the_log_history(tmp_path) -> None:
    trainer = Trainer(
        model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path, max_steps=2), train_dataset=token_dataset(),
        callbacks=[RhoCallback(radii=("output", "attention"), every=1)],
    )
    trainer.train()
    for entry in training_logs(trainer):
        assert entry["ghosts/r"] == entry["ghosts/r_applied"] > 0
        assert math.isfinite(entry["ghosts/rho_out"]) and math.isfinite(entry["ghosts/rho_attn"])


def test_callback_refuses_deepspeed(tmp_path) -> None:
    model = tiny_causal_lm("gpt_neox")
    args = rho_args(tmp_path)
    args.deepspeed = "ds_config.json"  # set after construction: building such arguments needs deepspeed installed
    callback = RhoCallback()
    with pytest.raises(ValueError, match="DeepSpeed"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=torch.optim.AdamW(model.parameters()))
