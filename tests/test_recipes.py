"""End-to-end smoke tests of the recipes (tiny presets, a few steps, offline) and of recipes/presets.py."""

from __future__ import annotations

import csv
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from presets import (
    MODEL_PRESETS,
    build_model,
    preset_config,
    spike_loop,
    spike_schedule,
    spiked,
    train_bpe_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ghosts.cli.data import lm_blocks, pydoc_splits
from tests.helpers import SMALL_DATA, assert_png, recipe

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: a second thread buys nothing


def finite_numbers(value: object) -> list[float]:
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in finite_numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


# ------------------------------------------------------------------------------------------ presets
def test_pythia_presets_have_the_real_shapes() -> None:
    shapes = {  # hidden, layers, heads (EleutherAI/pythia-* config.json)
        "pythia-14m": (128, 6, 4), "pythia-70m": (512, 6, 8), "pythia-160m": (768, 12, 12),
        "pythia-410m": (1024, 24, 16), "pythia-1b": (2048, 16, 8), "pythia-12b": (5120, 36, 40),
    }
    for name, (hidden, layers, heads) in shapes.items():
        config = preset_config(name, vocab_size=2048)
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
        assert config.intermediate_size == 4 * hidden and config.rope_parameters["partial_rotary_factor"] == 0.25
        assert config.use_parallel_residual and config.hidden_act == "gelu" and not config.tie_word_embeddings
        assert config.vocab_size == 2048 and config.model_type == "gpt_neox"
    assert preset_config("llama-tiny").model_type == "llama"
    small, large = preset_config("llama-tiny"), preset_config("llama-14m")  # SwiGLU width: 8/3 hidden up to a multiple of 4
    assert (small.intermediate_size, large.intermediate_size) == (172, 344) and large.model_type == "llama"
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (128, 6, 4)  # pythia-14m's
    with pytest.raises(ValueError, match="unknown preset 'pythia-7m'"):
        preset_config("pythia-7m")
    assert set(shapes) < set(MODEL_PRESETS)


def test_qwen3_tiny_is_llama_tiny_plus_qk_norm() -> None:
    """The third family: the same parameters as llama-tiny (names and shapes), plus one q and one k RMSNorm per layer."""
    qwen = dict(build_model("qwen3-tiny", vocab_size=64).named_parameters())
    llama = dict(build_model("llama-tiny", vocab_size=64).named_parameters())
    extra = sorted(set(qwen) - set(llama))
    assert set(llama) < set(qwen) and all(qwen[n].shape == p.shape for n, p in llama.items())
    assert extra == [f"model.layers.{i}.self_attn.{qk}_norm.weight" for i in range(2) for qk in ("k", "q")]
    assert all(qwen[n].shape == (16,) for n in extra)  # per head: head_dim 64 / 4 heads


def test_tokenizer_corpus_and_blocks() -> None:
    splits = pydoc_splits()
    assert len(splits["train"]) + len(splits["validation"]) == 79
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])
    tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=512)
    assert len(tokenizer) == 512 and tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    text = "def f(x):\n    return x"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    blocks = lm_blocks(splits["validation"], tokenizer, block_size=32, max_blocks=5)
    assert len(blocks) == 5 and all(len(row) == 32 for row in blocks["input_ids"])
    assert blocks["labels"] == blocks["input_ids"]
    # Blocks are the concatenation of the documents, EOS-separated, cut every 32 tokens.
    first = tokenizer(splits["validation"][0]["text"], add_special_tokens=False)["input_ids"]
    assert blocks["input_ids"][0] == first[:32]
    model = build_model("pythia-tiny", vocab_size=len(tokenizer), seed=3)
    again = build_model("pythia-tiny", vocab_size=len(tokenizer), seed=3)
    assert model.get_output_embeddings().weight.shape == (512, 64)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_spike_schedule_and_loop_run_the_same_rates() -> None:
    """Optimizer step k (0-based) runs at lr x factor for start <= k < stop: by hand, in a Trainer's scheduler and the loop."""
    expected = [0.1, 0.1, 1.0, 1.0, 0.1]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = spike_schedule(optimizer, start=2, factor=10.0, stop=4)
    seen = []
    for _ in expected:
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(expected, rel=1e-12)

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor):
            return types.SimpleNamespace(loss=(self.weight * x).sum())

    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def sgd_step(batch: dict) -> float:
        optimizer.step()
        return optimizer.param_groups[0]["lr"]

    rows = spike_loop(model, optimizer, [{"x": torch.ones(1)}] * 5, start=2, factor=10.0, stop=4, step=sgd_step)
    assert [row["record"] for row in rows] == pytest.approx(expected, rel=1e-12)
    assert [row["spike"] for row in rows] == [False, False, True, True, False]
    # d loss / d weight = 1 every step: the weight moved by minus the sum of the rates
    assert model.weight.item() == pytest.approx(-sum(expected), rel=1e-6)
    assert [row["loss"] for row in rows] == pytest.approx([0.0, -0.1, -0.2, -1.2, -2.2], rel=1e-6)


def test_spiked_trainer_replaces_or_multiplies_the_schedule(tmp_path: Path) -> None:
    """``spiked(Trainer)``: "replace" runs the base rate x factor on [start, stop) whatever the arguments' schedule;
    "multiply" runs the arguments' schedule (here linear decay from 1 over 5 steps) x factor; a given scheduler stays."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, lr_scheduler_type="linear")
    decay = [1.0, 0.8, 0.6, 0.4, 0.2]
    expected = {"replace": [1.0, 1.0, 10.0, 10.0, 1.0], "multiply": [1.0, 0.8, 6.0, 4.0, 0.2]}
    assert spiked(Trainer) is spiked(Trainer) and spiked(Trainer).__name__ == "SpikedTrainer"
    for how, rates in expected.items():
        trainer = spiked(Trainer)(model=build_model("pythia-tiny", vocab_size=64), args=args, spike_start=2,
                                  spike_factor=10.0, spike_stop=4, spike_how=how)
        trainer.create_optimizer_and_scheduler(num_training_steps=5)
        assert [trainer.lr_scheduler.lr_lambdas[0](k) for k in range(5)] == pytest.approx(rates, rel=1e-12)
        assert trainer.optimizer.param_groups[0]["lr"] == args.learning_rate  # step 0's rate, unspiked
    assert expected["multiply"] == pytest.approx([d * (10.0 if 2 <= k < 4 else 1.0) for k, d in enumerate(decay)])
    model = build_model("pythia-tiny", vocab_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    given = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5)
    trainer = spiked(Trainer)(model=model, args=args, optimizers=(optimizer, given), spike_start=0, spike_factor=10.0,
                              spike_how="replace")
    trainer.create_optimizer_and_scheduler(num_training_steps=5)
    assert trainer.lr_scheduler is given and given.lr_lambdas[0](3) == 0.5
    with pytest.raises(ValueError, match="spike_how must be one of"):
        spiked(Trainer)(model=model, args=args, spike_start=2, spike_factor=10.0, spike_how="add")
    with pytest.raises(TypeError, match="onto must be a LambdaLR"):
        spike_schedule(optimizer, 2, 10.0, onto=torch.optim.lr_scheduler.StepLR(optimizer, 2))


# ------------------------------------------------------------------------------------------ pythia_finetune
@pytest.mark.slow
def test_pythia_finetune_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                     read_wandb_records) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    summary = recipe("pythia_finetune").main([
        "--output_dir", str(out), "--max_steps", "6", "--warmup_steps", "0", "--logging_steps", "1", "--eval_steps", "3",
        "--disable_tqdm", "true", "--rho_every", "1", "--rho_log_per_head", "true", *SMALL_DATA,
    ])
    printed = capsys.readouterr().out

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    numbers = finite_numbers({k: v for k, v in on_disk.items() if k != "figures"})
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert on_disk["rho_radii"] == ["output", "attention"]
    assert on_disk["rho_watch_radii"] == ["ffn", "ffn_activation"]
    assert on_disk["watched_min"]["ffn_activation"] == "inf"  # Pythia's exact GELU: no finite singularity
    assert 0 < on_disk["watched_min"]["ffn"] < math.inf

    # Consistent with the Trainer's log history.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 3, 6]
    assert on_disk["eval_final"]["loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert on_disk["eval_final"]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert on_disk["eval_final"]["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"])
    assert on_disk["eval_start"]["loss"] == pytest.approx(evals[0]["eval_loss"])
    clipped = [h["ghosts/clipped"] for h in history if "ghosts/clipped" in h]  # one probed step per log
    assert len(clipped) == on_disk["probed_steps"] == 6
    assert on_disk["clipped_fraction"] == pytest.approx(sum(clipped) / len(clipped))
    assert max(h["ghosts/r"] for h in history if "ghosts/r" in h) == pytest.approx(on_disk["r_proposed"]["max"])
    assert sum(on_disk["bottleneck_counts"].values()) == 6
    thirds = on_disk["bottleneck_by_thirds"]
    assert [row["third"] for row in thirds] == ["steps 1-2", "steps 3-4", "steps 5-6"]
    assert [row["probed"] for row in thirds] == [2, 2, 2]
    for name, count in on_disk["bottleneck_counts"].items():
        assert sum(row[name] for row in thirds) == count
    steps = [json.loads(line) for line in (out / "ghosts_steps.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in steps] == [1, 2, 3, 4, 5, 6]
    assert all(rec["r_applied"] <= 1.0 + 1e-6 for rec in steps)

    assert_png(out / "radii.png")
    assert_png(out / "rho_attn_heads.png")
    assert (out / "bottleneck_by_thirds.csv").read_text().count("\n") == 4
    assert "final eval: loss" in printed and "bottleneck counts" in printed
    # W&B offline under the output directory, the sync line printed, the heatmaps logged as images.
    run_dir = Path(on_disk["wandb_dir"])
    assert run_dir.parent == out / "wandb" and list(run_dir.glob("*.wandb"))
    assert f"wandb sync {run_dir}" in printed
    assert len(list(run_dir.glob("files/media/images/eval/ghosts/rho_attn_heads_*.png"))) == 2
    # The per-head table: at each evaluation the minima since the previous one, all evaluations so far. The reference
    # is the log history's per-head keys (one log per step): min over steps 1-3, then 4-6.
    tables = sorted(run_dir.glob("files/media/table/eval/ghosts/rho_attn_heads_table_*.table.json"),
                    key=lambda path: len(json.loads(path.read_text())["data"]))
    assert len(tables) == 2
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "layer", "head", "rho_attn"]
    per_head = [h for h in history if "ghosts/rho_attn/layer_0/head_0" in h]
    expected = [[end, layer, head, min(h[f"ghosts/rho_attn/layer_{layer}/head_{head}"] for h in per_head
                                       if end - 3 < h["step"] <= end)]
                for end in (3, 6) for layer in range(2) for head in range(4)]
    assert [row[:3] for row in last["data"]] == [row[:3] for row in expected]
    assert [row[3] for row in last["data"]] == pytest.approx([row[3] for row in expected], rel=1e-6)
    # The watched radii and the bottleneck counts reach W&B as keys.
    (run_file,) = run_dir.glob("run-*.wandb")
    keys = {item.key or "/".join(item.nested_key) for record in read_wandb_records(run_file)
            if record.WhichOneof("record_type") == "history" for item in record.history.item}
    for key in ("train/ghosts/rho_ffn", "train/ghosts/rho_ffn_activation", "train/ghosts/would_bind/ffn",
                "train/ghosts/bottleneck/output", "eval/ghosts/would_bind/ffn", "eval/ghosts/bottleneck/attention"):
        assert key in keys, key
    # The trained model and its tokenizer reload.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size == len(AutoTokenizer.from_pretrained(out)) == 512


def test_pythia_finetune_from_a_checkpoint_and_a_text_file(tmp_path: Path) -> None:
    """The real fine-tuning path, offline: save a tiny checkpoint, then fine-tune it on a local .txt file."""
    splits = pydoc_splits()
    tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=512)
    checkpoint = tmp_path / "checkpoint"
    build_model("pythia-tiny", vocab_size=len(tokenizer), seed=1).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    text_file = tmp_path / "train.txt"
    text_file.write_text("\n".join(splits["validation"]["text"][:4]))

    out = tmp_path / "finetuned"
    summary = recipe("pythia_finetune").main([
        "--model_name_or_path", str(checkpoint), "--train_file", str(text_file), "--validation_split_percentage", "20",
        "--block_size", "64", "--output_dir", str(out), "--max_steps", "3", "--warmup_steps", "0", "--eval_steps", "3",
        "--report_to", "none", "--rho_radii", "output", "--disable_tqdm", "true",
    ])
    assert summary["model"] == str(checkpoint) and summary["rho_radii"] == ["output"]
    assert summary["tokens_per_step"] == 8 * 64 and summary["steps"] == 3
    assert set(summary["bottleneck_counts"]) <= {"output", "none"} and summary["wandb_dir"] is None
    assert math.isfinite(summary["eval_final"]["loss"])
    before = AutoModelForCausalLM.from_pretrained(checkpoint)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert after.config.hidden_size == 64 and after.config.vocab_size == 512
    assert not torch.equal(before.gpt_neox.embed_in.weight, after.gpt_neox.embed_in.weight)
    assert_png(out / "radii.png")
    assert not (out / "rho_attn_heads.png").exists()  # no attention radius measured, no heatmap


# ------------------------------------------------------------------------------------------ spike_test
@pytest.mark.slow
def test_spike_test(tmp_path: Path) -> None:
    rows = recipe("spike_test").main([
        "--output_dir", str(tmp_path), "--presets", "pythia-tiny", "llama-tiny", "--factors", "1", "10000",
        "--max_steps", "6", "--spike_step", "3", *SMALL_DATA,
    ])
    with open(tmp_path / "spike_runs.csv") as handle:
        table = list(csv.DictReader(handle))
    keys = {(row["preset"], row["method"], float(row["factor"])) for row in table}
    methods = ("adamw", "adamw+clip", "rho", "rho-blocks")  # the global clip and the default block-wise one
    assert keys == {(p, m, f) for p in ("pythia-tiny", "llama-tiny") for m in methods for f in (1, 10000)}
    assert len(table) == len(rows) == 16
    for row in rows:
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert len(row["losses"]) == 6
        if row["method"] in ("rho", "rho-blocks") or row["factor"] == 1:
            assert math.isfinite(row["final_eval_loss"]) and not row["collapsed"]
            assert math.isfinite(row["loss_before_spike"])
        if row["method"] == "adamw" and row["factor"] == 10000:
            assert row["collapsed"]  # the point of the test: plain AdamW does not survive the spike ...
        if row["method"] in ("rho", "rho-blocks"):
            assert 0.0 <= row["clipped_fraction"] <= 1.0 and row["max_r_proposed"] > 0
    # ... and before the spike the methods agree on the same data (same weights, same order, no clip yet).
    by_key = {(r["preset"], r["method"], r["factor"]): r for r in rows}
    for preset in ("pythia-tiny", "llama-tiny"):
        for method in ("rho", "rho-blocks"):
            assert by_key[(preset, "adamw", 1.0)]["losses"][0] == pytest.approx(by_key[(preset, method, 10000.0)]["losses"][0])
    markdown = (tmp_path / "spike_table.md").read_text()
    assert markdown.count("| plain AdamW |") == 2 and "x10000" in markdown
    assert_png(tmp_path / "spike_test.png")


@pytest.mark.slow
def test_spike_test_runs_the_block_wise_clip(tmp_path: Path) -> None:
    (row,) = recipe("spike_test").main([
        "--output_dir", str(tmp_path), "--presets", "llama-tiny", "--methods", "rho-blocks", "--factors", "10000",
        "--max_steps", "6", "--spike_step", "3", *SMALL_DATA,
    ])
    assert row["method"] == "rho-blocks" and not row["collapsed"] and row["clipped_fraction"] > 0
    assert "| RhoTrainer (clip, r* = 2, bound, block-wise) |" in (tmp_path / "spike_table.md").read_text()


@pytest.mark.slow
def test_spike_test_saves_checkpoints_that_hf_ghosts_diagnoses(tmp_path: Path) -> None:
    """``--save_steps`` keeps Trainer checkpoints (tokenizer included) that ``hf-ghosts diagnose`` reads; without
    it nothing is kept. The spiked run's checkpoint before the first spiked step shows a larger ``r`` than the
    same checkpoint diagnosed at the base rate, by the spike factor (r is linear in the learning rate)."""
    from hf_ghosts.cli import main as cli_main

    common = ["--presets", "pythia-tiny", "--methods", "adamw", "--max_steps", "4", "--spike_step", "2", *SMALL_DATA]
    recipe("spike_test").main(["--output_dir", str(tmp_path / "plain"), "--factors", "1", *common])
    assert not (tmp_path / "plain" / "checkpoints").exists()
    recipe("spike_test").main(["--output_dir", str(tmp_path), "--factors", "1000", "--save_steps", "2", *common])
    checkpoint = tmp_path / "checkpoints" / "pythia-tiny-adamw-1000" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "tokenizer.json").is_file()
    r = {}
    for name, extra in (("spiked", []), ("base", ["--learning_rate", "0.001"])):
        out = tmp_path / name
        assert cli_main(["diagnose", str(checkpoint), "--output_dir", str(out), "--batches", "1", *extra]) in (0, None)
        r[name] = json.loads((out / "diagnosis.json").read_text())["r"]
    assert r["spiked"] == pytest.approx(1000 * r["base"], rel=1e-3)


# ------------------------------------------------------------------------------------------ phase_transition
@pytest.mark.slow
def test_phase_transition(tmp_path: Path) -> None:
    summary = recipe("phase_transition").main([
        "--output_dir", str(tmp_path), "--train_steps", "10", "--random_directions", "1", "--r_points", "5",
        "--exact_tokens", "8", "--probe_blocks", "4", *SMALL_DATA,
    ])
    rows = summary["directions"]
    assert [row["direction"] for row in rows] == ["-grad", "random 0"]
    for row in rows:
        # The recipe's own JVP and the library's probe agree on pi / max Delta of the output softmax.
        assert row["rho_bound"] == pytest.approx(row["rho_output"], rel=1e-3)
        assert row["rho"] == pytest.approx(min(row["rho_output"], row["rho_attention"]))
        # Theorem 4.6: no zero inside pi / Delta; the exact radius sits at or beyond the bound.
        assert row["token_ratio_min"] >= 1.0 - 1e-6 and row["exact_over_bound"] >= 1.0 - 1e-6
        assert row["rho_bound"] <= row["rho_exact_lower"] <= row["rho_exact"]
        assert row["r_exact"] == pytest.approx(row["rho_exact"] / row["rho"])
    with open(tmp_path / "phase_curves.csv") as handle:
        curves = list(csv.DictReader(handle))
    assert len(curves) == 2 * 5
    for curve in curves:
        assert 0.0 <= float(curve["flipped"]) <= 1.0 and float(curve["loss_ratio"]) > 0
    smallest = [float(c["loss_ratio"]) for c in curves if float(c["r"]) == pytest.approx(0.1)]
    assert all(abs(ratio - 1.0) < 0.05 for ratio in smallest)  # a step of 0.1 rho barely moves the loss
    gradient = [c for c in curves if c["direction"] == "-grad"]
    assert float(gradient[0]["loss_ratio"]) < 1.0  # along -grad a small step descends
    ends = rows[0]["r_descent_ends"]
    assert math.isnan(ends) or float(gradient[0]["r"]) < ends  # ... and the descent, if it ends, ends later
    assert json.loads((tmp_path / "summary.json").read_text())["directions"][0]["direction"] == "-grad"
    assert_png(tmp_path / "phase_transition.png")


# ------------------------------------------------------------------------------------------ temperature
@pytest.mark.slow
def test_temperature(tmp_path: Path) -> None:
    temperatures = [0.5, 2.0]
    summary = recipe("temperature").main([
        "--output_dir", str(tmp_path), "--train_steps", "0", "--temperatures", *map(str, temperatures), "--probe_blocks",
        "2", "--t_points", "25", "--bisect_steps", "12", *SMALL_DATA,
    ])
    rows = summary["rows"]
    assert [(row["T"], row["direction"]) for row in rows] == [(temp, "grad") for temp in temperatures]
    with open(tmp_path / "temperature_onsets.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(row["T"]) for row in table] == temperatures  # one row per temperature
    assert (tmp_path / "temperature_onsets.md").read_text().count("\n") == 2 + len(temperatures)
    with open(tmp_path / "temperature_curves.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 25 * len(temperatures)
    with open(tmp_path / "temperature_spread.csv") as handle:
        (spread_row,) = list(csv.DictReader(handle))
    onsets_t = [row["onset_t"] for row in rows]
    onsets_r = [row["onset_r"] for row in rows]
    assert all(math.isfinite(t) and t > 0 for t in onsets_t)
    # The spread is the population std of ln(onset): for two values, half the distance of their logs.
    assert float(spread_row["spread_raw"]) == pytest.approx(abs(math.log(onsets_t[0] / onsets_t[1])) / 2, rel=1e-6)
    assert float(spread_row["spread_r"]) == pytest.approx(abs(math.log(onsets_r[0] / onsets_r[1])) / 2, rel=1e-6)
    assert_png(tmp_path / "temperature.png")
    assert json.loads((tmp_path / "summary.json").read_text())["spreads"][0]["direction"] == "grad"

    # An independent float64 computation: the same model and batch, logits / T by hand, v = g / |g| by autograd,
    # Delta by central differences (no probe, no hook, no JVP).
    splits = pydoc_splits()
    tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=512)
    blocks = lm_blocks(splits["validation"], tokenizer, block_size=128, max_blocks=8)
    input_ids = torch.tensor(blocks["input_ids"][:2])
    model = build_model("pythia-tiny", vocab_size=len(tokenizer), seed=0).double().eval()
    theta = {name: p.detach() for name, p in model.named_parameters()}

    def logits(weights: dict[str, torch.Tensor], temp: float) -> torch.Tensor:
        out = torch.func.functional_call(model, weights, args=(), kwargs={"input_ids": input_ids})
        return out.logits[:, :-1] / temp  # position t predicts token t + 1; every label of these blocks is real

    def loss(weights: dict[str, torch.Tensor], temp: float) -> torch.Tensor:
        z = logits(weights, temp)
        return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), input_ids[:, 1:].reshape(-1))

    def moved(direction: dict[str, torch.Tensor], length: float) -> dict[str, torch.Tensor]:
        return {name: theta[name] + length * direction[name] for name in theta}

    h = 1e-4
    for temp, row in zip(temperatures, rows, strict=True):
        leaves = {name: p.clone().requires_grad_(True) for name, p in theta.items()}
        grads = torch.autograd.grad(loss(leaves, temp), list(leaves.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        v = {name: g / norm for name, g in zip(leaves, grads, strict=True)}
        with torch.no_grad():
            slopes = (logits(moved(v, h), temp) - logits(moved(v, -h), temp)) / (2 * h)
            max_delta = float((slopes.max(-1).values - slopes.min(-1).values).max())
            assert row["max_delta"] == pytest.approx(max_delta, rel=1e-3)
            assert row["rho"] == pytest.approx(math.pi / max_delta, rel=1e-3)
            assert row["onset_r"] == pytest.approx(row["onset_t"] * max_delta / math.pi, rel=1e-3)
            # The onset is where the loss ratio crosses the threshold (from below, to the bisection's resolution).
            ratio = float(loss(moved(v, -row["onset_t"]), temp) / loss(theta, temp))
            assert ratio == pytest.approx(2.0, rel=2e-2) and ratio > 2.0 - 1e-3
    with pytest.raises(ValueError, match="threshold must be > 1"):
        recipe("temperature").main(["--output_dir", str(tmp_path), "--threshold", "0.5"])


# ------------------------------------------------------------------------------------------ lr_free
@pytest.mark.slow
def test_lr_free(tmp_path: Path) -> None:
    """Every method runs end to end at a toy size, with a spike; files and table rows only (no science asserted)."""
    module = recipe("lr_free")
    summary = module.main([
        "--output_dir", str(tmp_path), "--presets", "pythia-tiny", "--learning_rates", "1e-3", "1e-2", "--rho_targets",
        "0.5", "--max_steps", "4", "--eval_points", "2", "--seeds", "0", "--spike_factor", "10", *SMALL_DATA,
    ])
    methods = ["adamw lr=0.001", "adamw lr=0.01", "rho-set r*=0.5", "rho-set r*=1 (default)", "prodigy", "schedule-free",
               "adamw-default"]
    with open(tmp_path / "lr_free_runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert [row["method"] for row in runs] == methods
    with open(tmp_path / "lr_free_table.csv") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == methods
    markdown = (tmp_path / "lr_free_table.md").read_text()
    assert all(f"| {m} |" in markdown or f"| **{m}** |" in markdown for m in methods) and "lr x10 from step 3" in markdown
    with open(tmp_path / "lr_free_curves.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * len(methods)  # eval_points per run
    for row in runs:
        probed = float(row["probed_steps"])
        assert (0 < probed <= 4) if row["method"].startswith("rho-set") else math.isnan(probed)
    assert summary["recommended_r_target"] in (0.5, 1.0) and summary["default_r_target"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["runs"] == len(methods)
    assert_png(tmp_path / "lr_free.png")
    table = (tmp_path / "lr_free_table.csv").read_text()
    replotted = module.main([  # --replot rebuilds the same table from the run and curve files, without training
        "--output_dir", str(tmp_path), "--presets", "pythia-tiny", "--learning_rates", "1e-3", "1e-2", "--rho_targets", "0.5",
        "--max_steps", "4", "--eval_points", "2", "--seeds", "0", "--spike_factor", "10", "--replot",
    ])
    assert (tmp_path / "lr_free_table.csv").read_text() == table and replotted["presets"] == summary["presets"]


def test_lr_free_spike_multiplies_each_methods_own_schedule(tmp_path: Path) -> None:
    """The spike rides on the method's schedule: cosine with warm-up (AdamW) and constant (schedule-free), x factor
    from step ``spike_at`` (0-based) on, as :func:`spike_multiplier` says."""
    module = recipe("lr_free")
    spec = module.LrFreeArguments(max_steps=10, warmup_fraction=0.2, spike_factor=100.0, spike_at=6)
    model = build_model("pythia-tiny", vocab_size=64, seed=0)
    for kind, value in (("adamw", 1e-3), ("schedule-free", math.nan)):
        method = {"label": kind, "kind": kind, "value": value}
        args = module.training_arguments(spec, method, 0, str(tmp_path))
        unused = [{"input_ids": [0, 1]}]  # the arguments evaluate every few steps; nothing runs here
        plain = module.Trainer(model=model, args=args, eval_dataset=unused)
        spiked_trainer = spiked(module.Trainer)(model=model, args=args, eval_dataset=unused, **module.spike_kwargs(spec))
        rates = []
        for trainer in (plain, spiked_trainer):
            trainer.create_optimizer_and_scheduler(num_training_steps=10)
            rates.append([trainer.lr_scheduler.lr_lambdas[0](k) for k in range(10)])
        assert rates[1] == pytest.approx([rate * (100.0 if k >= 6 else 1.0) for k, rate in enumerate(rates[0])])
        # constant for schedule-free (its warm-up lives in the optimizer); else 2 warm-up steps from 0, then the cosine
        assert rates[0] == ([1.0] * 10 if kind == "schedule-free" else [0.0, 0.5, 1.0, *rates[0][3:]])
    assert module.LrFreeArguments(rho_targets=[0.5, 2.0]).rho_targets == [0.5, 1.0, 2.0]  # the default joins the list
    for outside in (0, 10):
        with pytest.raises(ValueError, match="--spike_at must lie"):
            module.LrFreeArguments(max_steps=10, spike_at=outside)


def test_temperature_hook_scales_logits_and_loss_and_leaves_the_model_as_found() -> None:
    scaled = recipe("temperature").temperature
    model = build_model("pythia-tiny", vocab_size=64, seed=0).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids)
        with scaled(model, 0.25):
            hot = model(input_ids=ids, labels=ids)
        after = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(hot.logits, plain.logits / 0.25)
    z, labels = plain.logits[:, :-1] / 0.25, ids[:, 1:]
    torch.testing.assert_close(hot.loss, torch.nn.functional.cross_entropy(z.reshape(-1, 64), labels.reshape(-1)))
    assert torch.equal(after.logits, plain.logits) and not model.get_output_embeddings()._forward_hooks


def test_pythia_finetune_radii_defaults_and_a_limiting_radius_leaving_the_watch_list() -> None:
    module = recipe("pythia_finetune")
    common = sys.modules["common"]
    parser = module.HfArgumentParser((common.ModelArguments, common.DataArguments, module.FinetuneArguments))

    def parsed(*argv: str):
        return parser.parse_args_into_dataclasses(args=[*argv, "--report_to", "none"])[2]

    default = parsed()
    assert (default.rho_radii, default.rho_watch_radii) == (["output", "attention"], ["ffn", "ffn_activation"])
    table2 = parsed("--rho_mode", "set", "--rho_radii", "output", "attention", "ffn")
    assert (table2.rho_radii, table2.rho_watch_radii) == (["output", "attention", "ffn"], ["ffn_activation"])
    with pytest.raises(ValueError, match="in both rho_radii and rho_watch_radii"):  # an explicit watch list is kept
        parsed("--rho_radii", "output", "ffn", "--rho_watch_radii", "ffn")


def test_bottleneck_by_thirds_counts_binding_and_would_bind_by_hand() -> None:
    module = recipe("pythia_finetune")
    records = [  # 6 probed steps: thirds are steps 1-2, 3-4, 5-6
        {"step": 1, "bottleneck": "output", "would_bind": "ffn"}, {"step": 2, "bottleneck": "output", "would_bind": "ffn"},
        {"step": 3, "bottleneck": "attention", "would_bind": "ffn"}, {"step": 4, "bottleneck": "output"},
        {"step": 5, "bottleneck": "output"}, {"step": 6, "bottleneck": "output"},
    ]
    rows = module.bottleneck_by_thirds(records, 6, watched=("ffn", "ffn_activation"))
    assert rows[0] == {"third": "steps 1-2", "output": 2, "attention": 0, "would bind: ffn": 2,
                       "would bind: ffn_activation": 0, "probed": 2, "binding": "output", "would bind": "ffn"}
    assert (rows[1]["output"], rows[1]["attention"], rows[2]["output"], rows[2]["binding"]) == (1, 1, 2, "output")
    assert [row["would bind: ffn"] for row in rows] == [2, 1, 0]
    assert [row["would bind"] for row in rows] == ["ffn", "ffn", "-"]
