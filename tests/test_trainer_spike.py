"""Learning-rate spike (the paper's Table 1 in miniature): plain AdamW collapses, RhoTrainer(clip, r*=1) does not.

A tiny GPT-NeoX learns byte-level English from ``pydoc_data.topics`` (ships with Python; bytes are the
tokens, vocabulary 256). After a warm-up at lr 1e-3 the learning rate is multiplied by 1000 until the
end. Both runs see the same data in the same order from the same initial weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from presets import pydoc_text, spike_schedule
from transformers import Trainer, TrainerCallback

from hf_ghosts import RhoTrainer
from tests.helpers import rho_args, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH = 32
WARMUP, SPIKE, FACTOR, BASE_LR = 20, 30, 1000.0, 1e-3


def byte_rows(text: bytes, offset: int, rows: int) -> Dataset:
    ids = torch.tensor(list(text[offset : offset + rows * LENGTH]), dtype=torch.long).view(rows, LENGTH).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class EvaluateAfterWarmup(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == WARMUP:
            control.should_evaluate = True


def run(trainer_class: type[Trainer], tmp_path, train: Dataset, held_out: Dataset) -> dict[str, float]:
    model = tiny_causal_lm("gpt_neox")
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.0)
    spike = spike_schedule(optimizer, start=WARMUP, factor=FACTOR)
    args = rho_args(
        tmp_path / trainer_class.__name__, per_device_train_batch_size=8, per_device_eval_batch_size=32,
        max_steps=WARMUP + SPIKE, logging_steps=5, rho_mode="clip", rho_target=1.0,
    )
    trainer = trainer_class(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, optimizers=(optimizer, spike),
        callbacks=[EvaluateAfterWarmup()],
    )
    initial = trainer.evaluate()["eval_loss"]
    trainer.train()
    final = trainer.evaluate()["eval_loss"]
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]  # train() reset it
    assert len(evals) == 2, evals  # after the warm-up, and the final one
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "initial": initial,
        "before_spike": evals[0],
        "final": final,
        "max_r": max((entry.get("ghosts/r", math.nan) for entry in logs), default=math.nan),
        "max_train_loss": max(entry["loss"] for entry in logs),
    }


@pytest.mark.slow
def test_lr_spike_collapses_adamw_but_not_the_rho_controller(tmp_path) -> None:
    text = pydoc_text(separator="").encode("utf-8")
    train, held_out = byte_rows(text, 0, 128), byte_rows(text, 200_000, 32)
    plain = run(Trainer, tmp_path, train, held_out)
    rho = run(RhoTrainer, tmp_path, train, held_out)
    print(f"\nLR spike x{FACTOR:g} from step {WARMUP} to {WARMUP + SPIKE} (held-out loss, nats/byte):")
    for name, result in (("AdamW", plain), ("RhoTrainer(clip, r*=1)", rho)):
        print(f"  {name:24s} initial {result['initial']:.3f}  before spike {result['before_spike']:.3f}  "
              f"after spike {result['final']:.3f}  max train loss {result['max_train_loss']:.2f}  max r {result['max_r']:.3g}")

    start = plain["before_spike"]
    assert rho["initial"] == plain["initial"]
    assert rho["before_spike"] == pytest.approx(start, rel=1e-2)  # warm-up steps lie inside the radius: ~unclipped
    assert start < plain["initial"] - 0.5, "the warm-up should have learned something"
    assert plain["final"] > 3 * start, "plain AdamW was expected to collapse under the spike"
    assert rho["final"] < start * 1.02, "the controller should hold (or improve) the pre-spike loss"
    assert rho["max_r"] > 10, "the spike should have proposed steps far outside the radius"
