"""The ``hf-ghosts`` command: ``diagnose`` agrees with RhoTrainer, is linear in the LR, sees a spike, its per-token
spreads are float64 central differences; ``plot``; bad input.

One tiny run serves every test: a Pythia-style GPT-NeoX (dropout off) trained by RhoTrainer in monitor mode
(plain AdamW steps, every step probed with jvp) for 3 steps on one batch of 4 x 16 tokens, weight decay 0.1, the
learning rate x1000 from step 3 on, a checkpoint after every step. ``checkpoint-1``'s next step runs at the base
rate, ``checkpoint-2``'s at the spiked one. Every batch of the text after the first differs from the one the run
saw, so the tests that compare with the run measure one batch (``--batches 1``).
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import sys
import tomllib

import pytest
import torch
from datasets import load_dataset
from presets import build_model, train_bpe_tokenizer
from transformers import BloomConfig, BloomForCausalLM, default_data_collator

from hf_ghosts import RhoTrainer, RhoTrainingArguments
from hf_ghosts.cli import main
from hf_ghosts.cli.checkpoint import load_checkpoint
from hf_ghosts.cli.data import lm_blocks, pydoc_corpus
from hf_ghosts.cli.diagnose import diagnose as diagnose_batches
from hf_ghosts.cli.diagnose import token_table
from hf_ghosts.cli.proposal import StepProposer
from hf_ghosts.probe import RadiusProbe
from tests.references import causal_output_positions, float64_copy, forward_logits, reference_output_spreads

BASE_LR = 1e-3
SPIKE = 1000.0
BLOCK, BATCH = 16, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: a second thread buys nothing


class SpikedRhoTrainer(RhoTrainer):
    """Constant learning rate, x``SPIKE`` from optimizer step 3 on (LambdaLR's k sets the rate of step k + 1)."""

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda k: SPIKE if k >= 2 else 1.0
            )
        return self.lr_scheduler


def spiked_trainer(output_dir: str, data, tokenizer, max_steps: int, seed: int = 0) -> SpikedRhoTrainer:
    model = build_model("pythia-tiny", vocab_size=len(tokenizer), seed=seed, hidden_dropout=0.0, attention_dropout=0.0)
    args = RhoTrainingArguments(
        output_dir=output_dir, max_steps=max_steps, learning_rate=BASE_LR, weight_decay=0.1,
        per_device_train_batch_size=BATCH, save_strategy="steps", save_steps=1, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, rho_mode="monitor", rho_every=1, rho_estimator="jvp",
    )
    return SpikedRhoTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                            data_collator=default_data_collator)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``{"dir", "text", "data", "tokenizer"}``: the spiked run (checkpoint-1..3) and the text file it was trained on."""
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text("\n".join(pydoc_corpus()[:3])[:20000])
    texts = load_dataset("text", data_files={"train": str(text)}, split="train")  # as diagnose reads a .txt
    tokenizer = train_bpe_tokenizer(texts["text"], vocab_size=320)
    data = lm_blocks(texts, tokenizer, BLOCK, max_blocks=BATCH)  # one batch: every step (and diagnose) sees it
    trainer = spiked_trainer(str(root / "run"), data, tokenizer, max_steps=3)
    trainer.train()
    return {"dir": root / "run", "text": str(text), "data": data, "tokenizer": tokenizer, "root": root}


def diagnose(capsys, checkpoint, output_dir, *extra: str, run=None) -> dict:
    """Run ``hf-ghosts diagnose`` in-process on the run's text (one batch unless ``extra`` says otherwise); return
    diagnosis.json (and check the exit status)."""
    batches = () if "--batches" in extra else ("--batches", "1")
    argv = ["diagnose", str(checkpoint), "--train_file", run["text"], "--block_size", str(BLOCK), "--batch_size",
            str(BATCH), "--output_dir", str(output_dir), *batches, *extra]
    assert main(argv) == 0, capsys.readouterr().err
    with open(os.path.join(output_dir, "diagnosis.json")) as handle:
        return json.load(handle)


def fails(capsys, argv: list[str]) -> str:
    """Run ``hf-ghosts`` expecting exit status 2; return stderr."""
    capsys.readouterr()  # drop what came before
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"hf-ghosts {argv[0]}: error: ")
    return err


@pytest.fixture(scope="module")
def all_checkpoints(run):
    """``hf-ghosts diagnose RUN --all``: ``(diagnosis_all.json, output directory)``."""
    output = run["root"] / "all"
    argv = ["diagnose", str(run["dir"]), "--all", "--train_file", run["text"], "--block_size", str(BLOCK),
            "--batch_size", str(BATCH), "--batches", "1", "--output_dir", str(output)]
    assert main(argv) == 0
    with open(output / "diagnosis_all.json") as handle:
        return json.load(handle), output


# ----------------------------------------------------------------------------- agreement, linearity, spike
def test_diagnose_agrees_with_a_resumed_rho_trainer(run, all_checkpoints, tmp_path) -> None:
    """The next step RhoTrainer takes from checkpoint-2 (same batch, jvp, monitor) has diagnose's r and rho."""
    _, output = all_checkpoints
    with open(output / "checkpoint-2" / "diagnosis.json") as handle:
        diagnosis = json.load(handle)
    # start from other weights: whatever the resume does not restore shows
    resumed = spiked_trainer(str(tmp_path / "resumed"), run["data"], run["tokenizer"], max_steps=3, seed=1)
    resumed.train(resume_from_checkpoint=str(run["dir"] / "checkpoint-2"))
    logged = next(h for h in resumed.state.log_history if h["step"] == 3 and "ghosts/r" in h)
    assert diagnosis["direction"] == "adamw"
    assert diagnosis["learning_rate"] == pytest.approx(BASE_LR * SPIKE, rel=1e-12)
    assert diagnosis["learning_rate_source"] == "scheduler.pt"
    for key in ("r", "rho", "rho_out", "rho_attn", "update_norm"):
        assert diagnosis[key] == pytest.approx(logged[f"ghosts/{key}"], rel=1e-4), key


def test_r_is_linear_in_the_learning_rate(run, capsys, tmp_path) -> None:
    """On every one of 3 batches r triples with the rate and rho stays; the summary is the worst batch's."""
    checkpoint = run["dir"] / "checkpoint-1"
    low = diagnose(capsys, checkpoint, tmp_path / "low", "--learning_rate", "1e-4", "--batches", "3", run=run)
    high = diagnose(capsys, checkpoint, tmp_path / "high", "--learning_rate", "3e-4", "--batches", "3", run=run)
    assert low["learning_rate_source"] == "--learning_rate"
    assert low["measured_learning_rate"] == 1e-4 and low["measured_learning_rate_why"] is None
    for slow, fast in zip(low["per_batch"], high["per_batch"], strict=True):
        assert fast["r"] == pytest.approx(3 * slow["r"], rel=1e-4)
        assert fast["rho"] == pytest.approx(slow["rho"], rel=1e-4)
    assert low["r"] == max(e["r"] for e in low["per_batch"])
    assert high["r"] == pytest.approx(3 * low["r"], rel=1e-4)
    assert high["rho"] == pytest.approx(low["rho"], rel=1e-4)
    assert high["safe_learning_rate"] == pytest.approx(low["safe_learning_rate"], rel=1e-4)
    assert low["safe_learning_rate"] == pytest.approx(1e-4 / low["r"], rel=1e-9)  # lr * r_target / r, r_target 1


def test_a_learning_rate_spike_shows_as_r_above_one(all_checkpoints) -> None:
    """Before the spike the next step is inside the radius; at the spiked rate far outside; the table and PNG exist."""
    table, output = all_checkpoints
    rows = {row["checkpoint"]: row for row in table["checkpoints"]}
    assert list(rows) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert rows["checkpoint-1"]["r"] < 1 < rows["checkpoint-2"]["r"]
    assert rows["checkpoint-1"]["learning_rate"] == pytest.approx(BASE_LR)
    assert rows["checkpoint-2"]["learning_rate"] == pytest.approx(BASE_LR * SPIKE)
    assert rows["checkpoint-2"]["safe_learning_rate"] < BASE_LR * SPIKE
    for name in ("diagnosis_all.md", "diagnosis_all.png", "checkpoint-2/diagnosis.md", "checkpoint-2/rho_attn_heads.png"):
        assert (output / name).stat().st_size > 0, name


def test_report_contents_and_fragile_tokens_match_the_probe(run, all_checkpoints) -> None:
    """The most fragile token's radius pi / Delta is the probe's rho_out; each token's margin and prediction are those
    of a float64 copy of the checkpoint on the batch measured; the report holds the table, heads and tokens."""
    _, output = all_checkpoints
    with open(output / "checkpoint-2" / "diagnosis.json") as handle:
        result = json.load(handle)
    tokens = result["fragile_tokens"]
    assert len(tokens) == 10
    assert [t["spread"] for t in tokens] == sorted((t["spread"] for t in tokens), reverse=True)
    assert tokens[0]["radius"] == pytest.approx(result["rho_out"], rel=1e-5)
    assert all(t["radius"] == pytest.approx(math.pi / t["spread"], rel=1e-6) for t in tokens)
    model64 = float64_copy(load_checkpoint(str(run["dir"] / "checkpoint-2")).model)
    batch = default_data_collator([run["data"][i] for i in range(BATCH)])  # --batches 1: the run's own batch
    top = forward_logits(model64, batch).topk(2, dim=-1)
    for t in tokens:
        values, indices = top.values[t["row"], t["position"]], top.indices[t["row"], t["position"]]
        assert t["batch"] == 0 and t["context"]
        assert t["margin"] == pytest.approx(float(values[0] - values[1]), rel=1e-4, abs=1e-5)
        assert t["predicted"] == run["tokenizer"].decode([int(indices[0])])
    assert len({(t["row"], t["position"]) for t in tokens}) == len(tokens)
    heads = torch.tensor(result["rho_attn_heads"])
    assert heads.shape == (2, 4)
    assert heads.min().item() == pytest.approx(result["rho_attn"], rel=1e-6)
    assert result["rho"] == pytest.approx(min(result["rho_out"], result["rho_attn"]), rel=1e-9)
    assert result["r"] == pytest.approx(result["update_norm"] / result["rho"], rel=1e-9)
    markdown = (output / "checkpoint-2" / "diagnosis.md").read_text()
    assert "OUTSIDE the radius" in markdown and "](rho_attn_heads.png)" in markdown
    assert "The 10 most fragile tokens" in markdown


def test_token_spreads_are_float64_central_differences(run) -> None:
    """Every position's spread Delta of the logit slopes along the proposed step, its radius pi / Delta and its margin,
    against central differences (h = 1e-4) and logits of a float64 copy of the model."""
    checkpoint = load_checkpoint(str(run["dir"] / "checkpoint-2"))
    batch = default_data_collator([run["data"][i] for i in range(BATCH)])
    batch["labels"][0, 5] = -100  # a position that predicts no label is no softmax sample
    proposer = StepProposer(checkpoint, None, None, "cpu", seed=0)
    update = proposer.propose(batch).update
    proposer.close()
    table = token_table(RadiusProbe(checkpoint.model, ("output",), shift_labels=True), batch, update)
    model64 = float64_copy(checkpoint.model)
    spreads = reference_output_spreads(model64, batch, {name: u.double() for name, u in update.items()})
    logits = forward_logits(model64, batch).topk(2, dim=-1).values
    valid = causal_output_positions(batch["labels"])
    assert torch.equal(table["valid"], valid) and not valid[0, 4]
    torch.testing.assert_close(table["spread"].double(), spreads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(table["radius"].double(), math.pi / spreads, rtol=1e-4, atol=0)
    torch.testing.assert_close(table["margin"].double(), logits[..., 0] - logits[..., 1], rtol=0, atol=1e-5)


def test_every_batch_starts_from_the_saved_state_and_nothing_is_applied(run) -> None:
    """Two identical batches propose identical steps (the moments are reloaded), and the weights are left unchanged."""
    checkpoint = load_checkpoint(str(run["dir"] / "checkpoint-1"))
    before = {name: p.detach().clone() for name, p in checkpoint.model.named_parameters()}
    batch = default_data_collator([run["data"][i] for i in range(BATCH)])
    result = diagnose_batches(checkpoint, [batch, batch], radii_names=("output",), top_tokens=3)
    first, second = result["per_batch"]
    assert second["r"] == pytest.approx(first["r"], rel=1e-6)
    assert second["update_norm"] == pytest.approx(first["update_norm"], rel=1e-6)
    assert len(result["fragile_tokens"]) == 3
    for name, p in checkpoint.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.grad is None


# ----------------------------------------------------------------------------- bad input
def test_checkpoint_without_optimizer_state_falls_back_to_sgd(run, capsys, tmp_path) -> None:
    checkpoint = tmp_path / "no-optimizer"
    shutil.copytree(run["dir"] / "checkpoint-1", checkpoint, ignore=shutil.ignore_patterns("optimizer.pt"))
    err = fails(capsys, ["diagnose", str(checkpoint), "--train_file", run["text"], "--block_size", str(BLOCK)])
    assert "no optimizer state" in err and "--learning_rate" in err
    result = diagnose(capsys, checkpoint, tmp_path / "sgd", "--learning_rate", "0.01", run=run)
    assert result["direction"] == "sgd"
    clipped = min(result["per_batch"][0]["grad_norm"], 1.0)  # Trainer's default max_grad_norm, from training_args.bin
    assert result["update_norm"] == pytest.approx(0.01 * clipped, rel=1e-4)  # u = -lr * clipped gradient


def test_model_without_attention_interface_names_the_radii_option(run, capsys, tmp_path) -> None:
    checkpoint = tmp_path / "bloom"
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=len(run["tokenizer"]), hidden_size=32, n_layer=1, n_head=4)).save_pretrained(checkpoint)
    run["tokenizer"].save_pretrained(checkpoint)
    err = fails(capsys, ["diagnose", str(checkpoint), "--train_file", run["text"], "--block_size", str(BLOCK),
                         "--learning_rate", "0.01", "--radii", "output,attention"])
    assert "cannot measure the attention radius of bloom" in err and "--radii output" in err


def test_missing_or_empty_data_file(run, capsys, tmp_path) -> None:
    checkpoint = str(run["dir"] / "checkpoint-1")
    err = fails(capsys, ["diagnose", checkpoint, "--train_file", str(tmp_path / "missing.txt")])
    assert "missing.txt: no such file" in err
    (tmp_path / "empty.txt").write_text("")
    err = fails(capsys, ["diagnose", checkpoint, "--train_file", str(tmp_path / "empty.txt")])
    assert "empty.txt: the file is empty" in err
    (tmp_path / "short.txt").write_text("too short")
    err = fails(capsys, ["diagnose", checkpoint, "--train_file", str(tmp_path / "short.txt"), "--block_size", "64"])
    assert "fewer than block_size=64 tokens" in err and "--block_size" in err


def test_checkpoint_without_a_tokenizer_names_the_tokenizer_option(run, capsys, tmp_path) -> None:
    """A checkpoint saved without ``processing_class`` has no tokenizer files; transformers would then build an
    empty tokenizer that encodes every text to nothing. diagnose refuses it and names ``--tokenizer``, which works."""
    checkpoint = tmp_path / "no-tokenizer"
    shutil.copytree(run["dir"] / "checkpoint-1", checkpoint, ignore=shutil.ignore_patterns("tokenizer*", "vocab*",
                                                                                            "merges*", "special_*"))
    err = fails(capsys, ["diagnose", str(checkpoint), "--train_file", run["text"], "--block_size", str(BLOCK)])
    assert "holds no tokenizer" in err and "--tokenizer" in err
    result = diagnose(capsys, checkpoint, tmp_path / "out", "--tokenizer", str(run["dir"] / "checkpoint-1"), run=run)
    reference = diagnose(capsys, run["dir"] / "checkpoint-1", tmp_path / "reference", run=run)  # its own tokenizer
    for key in ("r", "rho", "update_norm"):
        assert result[key] == pytest.approx(reference[key], rel=1e-12), key


def test_directory_that_is_not_a_checkpoint(run, capsys, tmp_path) -> None:
    err = fails(capsys, ["diagnose", str(tmp_path)])
    assert "is not a Trainer checkpoint" in err and "config.json" in err
    err = fails(capsys, ["diagnose", str(run["dir"])])
    assert "is a run directory" in err and "checkpoint-3" in err and "--all" in err
    err = fails(capsys, ["diagnose", str(tmp_path), "--all"])
    assert "holds no checkpoint-* folders" in err


# ----------------------------------------------------------------------------- plot and the entry points
def test_plot_draws_a_run_with_ghosts_keys(run, capsys, tmp_path) -> None:
    output = tmp_path / "figure" / "ghosts.png"
    assert main(["plot", str(run["dir"]), "--output", str(output)]) == 0
    assert output.stat().st_size > 0
    assert "3 entries with ghosts/* keys" in capsys.readouterr().out


def test_plot_refuses_a_run_without_ghosts_keys(capsys, tmp_path, monkeypatch) -> None:
    state = {"global_step": 2, "log_history": [{"loss": 5.0, "learning_rate": 1e-3, "step": 1},
                                              {"loss": 4.0, "learning_rate": 1e-3, "step": 2}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    monkeypatch.setattr(sys, "argv", ["hf-ghosts", "plot", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # through ``python -m hf_ghosts``
        runpy.run_module("hf_ghosts", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no ghosts/* keys" in err and "RhoTrainer" in err and "RhoCallback" in err
    assert not (tmp_path / "ghosts.png").exists()
    assert fails(capsys, ["plot", str(tmp_path / "nowhere")])


def test_console_script_is_declared() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        scripts = tomllib.load(handle)["project"]["scripts"]
    assert scripts["hf-ghosts"] == "hf_ghosts.cli:main"
