"""``hf-ghosts diagnose`` on a plain ``Trainer`` run: the last checkpoint of a linear schedule (rate 0), batches that
disagree, and a ``training_args.bin`` that carries a payload.

The run: a Pythia-style GPT-NeoX (dropout off) trained by ``transformers.Trainer`` for ``STEPS`` steps of 4 x 16
tokens at ``BASE_LR`` with the default linear schedule to 0, weight decay 0.1, ``max_grad_norm`` 0.5 (not the
default, so that reading it shows), a checkpoint at the middle and at the end.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import statistics

import pytest
import torch
from datasets import load_dataset
from presets import build_model, train_bpe_tokenizer
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_ghosts.cli import main
from hf_ghosts.cli.data import DEFAULT_BATCHES, lm_blocks, pydoc_corpus

BASE_LR = 3e-3
STEPS = 20
BLOCK, BATCH = 16, 4


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: a second thread buys nothing


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """``{"dir", "text", "mixed"}``: the run (checkpoint-10, checkpoint-20), its text, and a text whose first two
    batches repeat one word and whose others are random CJK and Latin-1 characters the run never saw."""
    root = tmp_path_factory.mktemp("plain")
    text = root / "text.txt"
    text.write_text("\n".join(pydoc_corpus()[:3])[:20000])
    texts = load_dataset("text", data_files={"train": str(text)}, split="train")
    tokenizer = train_bpe_tokenizer(texts["text"], vocab_size=320)
    data = lm_blocks(texts, tokenizer, BLOCK, max_blocks=BATCH * STEPS)
    model = build_model("pythia-tiny", vocab_size=len(tokenizer), seed=0, hidden_dropout=0.0, attention_dropout=0.0)
    args = TrainingArguments(
        output_dir=str(root / "run"), max_steps=STEPS, learning_rate=BASE_LR, weight_decay=0.1, max_grad_norm=0.5,
        per_device_train_batch_size=BATCH, save_strategy="steps", save_steps=STEPS // 2, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
            data_collator=default_data_collator).train()
    rng = random.Random(0)
    mixed = root / "mixed.txt"
    strange = "".join(rng.choice("日本語中文한국어ñéüßøπΩ") for _ in range(4000))
    mixed.write_text("the " * 2 * BATCH * BLOCK + "\n" + strange + "\n")
    return {"dir": root / "run", "text": str(text), "mixed": str(mixed), "root": root}


def diagnose(capsys, checkpoint, output_dir, text, *extra: str) -> dict:
    """Run ``hf-ghosts diagnose`` in-process; return diagnosis.json (and check the exit status)."""
    argv = ["diagnose", str(checkpoint), "--train_file", text, "--block_size", str(BLOCK), "--batch_size", str(BATCH),
            "--output_dir", str(output_dir), *extra]
    assert main(argv) == 0, capsys.readouterr().err
    with open(os.path.join(output_dir, "diagnosis.json")) as handle:
        return json.load(handle)


# ----------------------------------------------------------------------------- the last checkpoint: rate 0
def test_last_checkpoint_of_a_linear_schedule_is_measured_at_the_last_nonzero_rate(plain, capsys, tmp_path) -> None:
    """The scheduled rate is 0 (the step is a no-op, r = 0), so the direction is measured at the rate of the last
    step, BASE_LR / STEPS on a linear schedule: finite rho, a bottleneck, a safe rate; r is linear in the rate."""
    last = plain["dir"] / f"checkpoint-{STEPS}"
    result = diagnose(capsys, last, tmp_path / "default", plain["text"], "--batches", "2")
    assert result["learning_rate"] == 0 and result["learning_rate_source"] == "scheduler.pt"
    assert result["r"] == 0 and result["inside"] is True
    assert result["measured_learning_rate"] == pytest.approx(BASE_LR / STEPS, rel=1e-9)
    assert "trainer_state.json" in result["measured_learning_rate_source"]
    assert "scheduled learning rate is 0" in result["measured_learning_rate_why"]
    assert 0 < result["rho"] < float("inf") and result["bottleneck"] in ("output", "attention")
    assert result["rho"] == min(result["rho_out"], result["rho_attn"])
    assert result["r_at_measured_rate"] == pytest.approx(result["update_norm"] / result["rho"], rel=1e-9)
    assert result["safe_learning_rate"] == pytest.approx(BASE_LR / STEPS / result["r_at_measured_rate"], rel=1e-9)
    assert result["fragile_tokens"] and result["rho_attn_heads"] is not None
    assert result["max_grad_norm"] == 0.5  # read from training_args.bin without unpickling anything else
    markdown = (tmp_path / "default" / "diagnosis.md").read_text()
    assert "no-op" in markdown and f"measured at learning rate {BASE_LR / STEPS:.4g}" in markdown
    # --learning_rate at the last step's rate gives the same update; r is linear in the rate, rho does not move
    same = diagnose(capsys, last, tmp_path / "same", plain["text"], "--batches", "2", "--learning_rate",
                    repr(BASE_LR / STEPS))
    assert same["r"] == pytest.approx(result["r_at_measured_rate"], rel=1e-6)
    low = diagnose(capsys, last, tmp_path / "low", plain["text"], "--batches", "2", "--learning_rate", "1e-4")
    high = diagnose(capsys, last, tmp_path / "high", plain["text"], "--batches", "2", "--learning_rate", "7e-4")
    assert high["r"] / low["r"] == pytest.approx(7.0, rel=1e-4)
    for other in (low, high, same):
        assert other["rho"] == pytest.approx(result["rho"], rel=1e-4)
        assert other["safe_learning_rate"] == pytest.approx(result["safe_learning_rate"], rel=1e-4)


# ----------------------------------------------------------------------------- batches that disagree
def test_default_verdict_is_the_worst_of_several_batches(plain, capsys, tmp_path) -> None:
    """The first batch (a repeated word) alone is put at r = 0.5; the default measures DEFAULT_BATCHES batches, and
    the strange-text ones lie far outside: the verdict, the safe rate and the statistics follow the worst batch."""
    middle = plain["dir"] / f"checkpoint-{STEPS // 2}"
    first = diagnose(capsys, middle, tmp_path / "first", plain["mixed"], "--batches", "1")
    rate = 0.5 * first["learning_rate"] / first["r"]
    result = diagnose(capsys, middle, tmp_path / "default", plain["mixed"], "--learning_rate", repr(rate))
    rs = [entry["r"] for entry in result["per_batch"]]
    assert result["batches"] == len(rs) == DEFAULT_BATCHES
    assert rs[0] == pytest.approx(0.5, rel=1e-4)
    assert result["inside"] is False and result["r"] == max(rs) > 2  # far outside on some batch
    assert result["worst_batch"] == rs.index(max(rs)) > 1
    assert 0 < result["fraction_inside"] == sum(r < 1 for r in rs) / len(rs) < 1
    assert result["r_median"] == pytest.approx(statistics.median(rs), rel=1e-12)
    assert result["r_max_over_min"] == pytest.approx(max(rs) / min(rs), rel=1e-9)
    assert result["safe_learning_rate"] == pytest.approx(rate / max(rs), rel=1e-9)
    outside = sum(r >= 1 for r in rs)
    markdown = (tmp_path / "default" / "diagnosis.md").read_text()
    assert f"OUTSIDE the radius (r >= 1) on {outside} of {DEFAULT_BATCHES} batch(es)" in markdown


# ----------------------------------------------------------------------------- training_args.bin is not unpickled
class Payload:
    """Unpickling it opens (creates) ``path``: the shape of a ``__reduce__`` payload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_training_args_with_a_payload_is_not_unpickled(plain, capsys, tmp_path) -> None:
    """Nothing in the payload runs: without flags diagnose exits 2 naming --trust_checkpoint; with --max_grad_norm it
    diagnoses from the safe files (optimizer.pt, scheduler.pt, trainer_state.json) exactly as from the clean one."""
    clean = plain["dir"] / f"checkpoint-{STEPS // 2}"
    checkpoint = tmp_path / "payload"
    shutil.copytree(clean, checkpoint)
    marker = tmp_path / "payload-ran"
    arguments = torch.load(clean / "training_args.bin", weights_only=False)  # written by this test's own run
    arguments.run_name = Payload(str(marker))
    torch.save(arguments, checkpoint / "training_args.bin")
    argv = ["diagnose", str(checkpoint), "--train_file", plain["text"], "--block_size", str(BLOCK), "--batches", "1"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--trust_checkpoint" in err and "io.open" in err and "--max_grad_norm" in err
    assert not marker.exists()
    result = diagnose(capsys, checkpoint, tmp_path / "safe", plain["text"], "--batches", "1", "--max_grad_norm", "0.5")
    assert not marker.exists()
    assert any("not unpickled" in note for note in result["notes"])
    reference = diagnose(capsys, clean, tmp_path / "clean", plain["text"], "--batches", "1")
    for key in ("r", "rho", "update_norm", "learning_rate", "safe_learning_rate"):
        assert result[key] == pytest.approx(reference[key], rel=1e-12), key


@pytest.mark.parametrize("kind", ["TrainingArguments", "RhoTrainingArguments", "RhoSFTConfig"])
def test_training_args_fields_are_read_without_constructing_them(kind, tmp_path) -> None:
    """The fields of TrainingArguments, RhoTrainingArguments and rho_arguments(SFTConfig) are read as they were
    saved (a FieldRecord: none of the classes is built); a payload beside them is named and not run."""
    from hf_ghosts import RhoTrainingArguments, rho_arguments
    from hf_ghosts.cli.checkpoint import FieldRecord, read_training_args

    if kind == "RhoSFTConfig":
        from trl import SFTConfig

        cls = rho_arguments(SFTConfig)
    else:
        cls = {"TrainingArguments": TrainingArguments, "RhoTrainingArguments": RhoTrainingArguments}[kind]
    saved = cls(output_dir=str(tmp_path / "out"), max_grad_norm=0.25, weight_decay=0.03, optim="adamw_torch",
                per_device_train_batch_size=3, gradient_accumulation_steps=5, lr_scheduler_type="cosine",
                report_to=[], use_cpu=True)
    path = tmp_path / "training_args.bin"
    torch.save(saved, path)
    record = read_training_args(str(path))
    assert type(record) is FieldRecord
    for name in ("max_grad_norm", "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps"):
        assert getattr(record, name) == getattr(saved, name), name
    assert record.optim == "adamw_torch" and record.lr_scheduler_type == "cosine"
    marker = tmp_path / "payload-ran"
    saved.run_name = Payload(str(marker))
    torch.save(saved, path)
    with pytest.raises(pickle.UnpicklingError, match=r"io\.open"):
        read_training_args(str(path))
    assert not marker.exists()
