"""The benchmarks: a smoke run of benchmarks/overhead.py (every part, tiny size, no timing asserts: each ratio is
checked against the timings it was made from), and the accuracy study's oracle against an independent float64
reference. A benchmark script is imported by name when its test runs (``benchmarks/`` is on ``sys.path``:
pytest's ``pythonpath`` setting)."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_ghosts.settings import ESTIMATORS, MODES
from tests.helpers import tiny_causal_lm, token_batch
from tests.references import causal_output_positions, float64_copy, reference_logit_slopes

pytestmark = pytest.mark.usefixtures("single_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_PARAMS = 41856  # counted by hand in test_tiny_size_parameter_count_by_hand


def assert_step_costs(rows: Sequence[Mapping[str, Any]], steps: int, params: int) -> None:
    """``run_overhead``'s rows against what they were made from (no timing asserts).

    Plain and every-step rows time ``steps`` steps of one kind each, so with 2 steps their cost, the median,
    is the mean (``statistics.fmean``, computed apart); every cost is ``f * probed + (1 - f) * reused``
    (the formula in docs/cost.md); each ratio is the row's own cost or peak over plain's. A peak holds at
    least the fp32 weights, gradients and AdamW's two moments, all alive when AdamW steps: ``16 * params`` bytes.
    """
    plain = rows[0]
    assert plain["setting"] == "plain" and plain["probed_fraction"] == 0.0
    assert (plain["time_ratio"], plain["peak_ratio"]) == (1.0, 1.0)
    for row in rows:
        assert row["steps"] == steps, row
        fraction = row["probed_fraction"]
        if steps == 2 and (row["setting"] == "plain" or row.get("every") == 1):
            assert row["cost_s"] == pytest.approx(row["mean_s"], rel=1e-9), row
        expected = (fraction * row["probed_step_s"] if fraction else 0.0) + (
            (1 - fraction) * row["reused_step_s"] if fraction < 1 else 0.0)
        assert row["cost_s"] == pytest.approx(expected, rel=1e-9), row
        assert row["time_ratio"] == pytest.approx(row["cost_s"] / plain["cost_s"], rel=1e-9), row
        assert row["peak_ratio"] == pytest.approx(row["peak_bytes"] / plain["peak_bytes"], rel=1e-9), row
        assert row["peak_bytes"] >= 16 * params, row


@pytest.mark.slow
def test_overhead_benchmark_writes_every_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "overhead.json"
    import_module("overhead").main(["--sizes", "tiny", "--steps", "2", "--warmup", "1", "--every", "4",
                                "--breakdown-repeats", "1", "--probe-repeats", "1", "--spike-steps", "6", "--out", str(out)])
    result = json.loads(out.read_text())

    (tiny,) = result["overhead"]
    assert tiny["size"] == "tiny" and tiny["params"] == TINY_PARAMS
    assert (tiny["hidden"], tiny["layers"], tiny["heads"], tiny["vocab"]) == (32, 2, 4, 256)
    expected = ["plain", *(f"{m}/{e}/every{k}" for m in MODES for e in ESTIMATORS for k in (1, 4))]
    assert [row["setting"] for row in tiny["rows"]] == expected
    assert_step_costs(tiny["rows"], steps=2, params=TINY_PARAMS)
    assert all(row["probed_fraction"] == 1.0 for row in tiny["rows"][1:] if row.get("every") == 1)

    pieces = result["breakdown"]["pieces"]
    assert [piece["piece"] for piece in pieces] == [
        "plain step (forward, backward, AdamW)", "snapshot copy", "update and its norm", "forward without tangents, sdpa",
        "forward without tangents, eager attention", "probe, jvp", "probe, fd"]
    assert pieces[0]["steps"] == 1.0  # "plain steps" are the pieces' ms over the plain step's
    assert [piece["steps"] for piece in pieces] == pytest.approx([piece["ms"] / pieces[0]["ms"] for piece in pieces], rel=1e-9)

    probe = {row["setting"]: row for row in result["probe"]["rows"]}
    assert list(probe) == ["forward+backward", "jvp output", "jvp output+attention", "jvp output+attention+ffn",
                           "fd output+attention", "fd output+attention, watching ffn+ffn_activation"]
    # each ratio is the median of its own timings over forward+backward's (one timing each here)
    base = statistics.median(probe["forward+backward"]["times_ms"])
    for row in probe.values():
        assert len(row["times_ms"]) == 1 and row["median_ms"] == statistics.median(row["times_ms"]), row
        assert row["ratio"] == pytest.approx(row["median_ms"] / base, rel=1e-9), row
    assert probe["forward+backward"]["ratio"] == 1.0
    # jvp and fd estimate the same output + attention radius along the same direction
    assert probe["fd output+attention"]["rho"] == pytest.approx(probe["jvp output+attention"]["rho"], rel=1e-2)

    accuracy = {row["setting"]: row for row in result["accuracy"]}
    assert {"AdamW, no control", "clip/jvp/every1 (exact)", "clip/fd/every1", "clip/jvp/every4"} <= accuracy.keys()
    assert accuracy["clip/fd/every1"]["r_error_max"] < 0.05  # fd against the oracle's jvp
    assert not accuracy["AdamW, no control"]["survived"] and accuracy["clip/jvp/every1 (exact)"]["survived"]

    printed = capsys.readouterr().out
    assert "| setting | tiny (" in printed and "| measurement | median ms |" in printed and f"wrote {out}" in printed


def test_tiny_size_parameter_count_by_hand() -> None:
    """GPT-NeoX, hidden 32, FFN 128, 2 layers, vocabulary 256, untied: the count the smoke test expects."""
    hidden, ffn, layers, vocab = 32, 128, 2, 256
    per_layer = 2 * 2 * hidden + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden)  # 2 LayerNorms, qkv, dense
    per_layer += (hidden * ffn + ffn) + (ffn * hidden + hidden)  # FFN in and out
    total = vocab * hidden + layers * per_layer + 2 * hidden + vocab * hidden  # embed_in, layers, final norm, embed_out
    assert total == TINY_PARAMS
    model = import_module("harness").SIZES["tiny"].model()
    assert sum(p.numel() for p in model.parameters()) == total


def test_oracle_measures_the_radius_along_the_update_the_optimizer_made() -> None:
    """The oracle's ``|u|`` and ``rho`` against float64 central differences at the old weights along AdamW's step;
    it leaves AdamW's step as it was."""
    accuracy = import_module("accuracy")
    model = tiny_causal_lm("gpt_neox", seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    oracle = accuracy.oracle(model, optimizer, ("output",))
    batch = token_batch(batch=2, length=12)
    reference = float64_copy(model)  # the old weights
    old = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(**batch).loss.backward()
    oracle.observe(batch)
    optimizer.step()
    update = {name: p.detach().double() - old[name].double() for name, p in model.named_parameters()}

    norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
    slopes = reference_logit_slopes(reference, batch, update)
    spread = slopes.amax(-1) - slopes.amin(-1)
    rho = math.pi / float(spread[causal_output_positions(batch["labels"])].max())
    assert oracle.last.update_norm == pytest.approx(norm, rel=1e-5)
    assert oracle.last.rho == pytest.approx(rho, rel=1e-4)
    assert accuracy.exact_r(oracle) == pytest.approx(norm / rho, rel=1e-4)
    plain = tiny_causal_lm("gpt_neox", seed=4)  # the same step without the oracle
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    plain(**batch).loss.backward()
    plain_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))


@pytest.mark.slow
def test_gpu_check_script_runs_to_the_end_on_cpu(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.sh`` in its CPU form (what CI can run): every part but the CUDA-only tests runs and
    succeeds, the JSON lands in the results folder and in $OUT, and nothing imports wandb (a stand-in module that
    leaves a mark when imported shadows it)."""
    import os
    import subprocess

    fake = tmp_path / "fake"
    fake.mkdir()
    mark = tmp_path / "wandb_was_imported"
    (fake / "wandb.py").write_text(f"open({str(mark)!r}, 'w').close()\nraise ImportError('wandb must not be imported')\n")
    env = {**os.environ, "GPU_CHECK_RESULTS": str(tmp_path / "results"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "PYTHONPATH": os.pathsep.join([str(fake), str(BENCHMARKS.parent)]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "NO CUDA on this machine" in done.stdout and "== gpu_check summary" in done.stdout
    result = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == result
    parts = result["parts"]
    assert {name: entry["status"] for name, entry in parts.items()} == {
        "env": "ok", "overhead": "ok", "finetune": "ok", "breakdown": "ok", "recipe": "ok", "tests": "skipped"}
    assert parts["env"]["result"]["wandb_imported_by_hf_ghosts"] is False
    for part, scenario in (("overhead", "pretrain"), ("finetune", "finetune")):
        measured = parts[part]["result"]
        assert measured["scenario"] == scenario
        rows = {row["setting"]: row for row in measured["rows"]}
        assert list(rows) == ["plain", "default", "jvp-bf16/every1", "fd-fp32/every1"]
        assert (rows["default"]["probe"], rows["jvp-bf16/every1"]["probe"]) == ("fd/float32", "jvp/bfloat16")
        assert rows["default"]["default"]
        assert_step_costs(measured["rows"], steps=2, params=TINY_PARAMS)
    assert parts["finetune"]["result"]["lr"] < parts["finetune"]["result"]["pretrain_lr"]
    breakdown = {row["piece"]: row for row in parts["breakdown"]["result"]["rows"]}
    assert breakdown["probe jvp bf16, output + attention"]["plain_steps"] > 0
    assert "aten::" in parts["breakdown"]["result"]["profile_top"]
    assert parts["recipe"]["result"]["steps"] == 2
    assert not mark.exists(), "something imported wandb with report_to none"


def test_topk_radius_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "topk.json"
    result = import_module("topk_radius").main(
        ["--vocabs", "600", "--ks", "0", "2", "--tokens", "6", "--repeats", "1", "--exact-rows", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    zero, two = result["rows"]
    assert zero["radius_over_bound"] == pytest.approx(1.0, rel=1e-6)  # k = 0 is pi / max Delta (float32 inputs)
    assert 1.0 <= two["radius_over_bound"] <= two["ceiling_spread_ratio"] * (1 + 1e-6)
    (check,) = result["certified_vs_exact"]
    assert 0.5 < check["certified_over_exact"] <= 1.0


@pytest.mark.slow
def test_gpu_breakdown_smoke_form_times_every_piece(tmp_path: Path) -> None:
    """``benchmarks/gpu_breakdown.py --tiny`` (its CPU form): one row per piece, the plain step first, each piece's
    "plain steps" its ms over the plain step's, and the profile table of the probe names aten ops (no timing asserts)."""
    import subprocess
    import sys

    out = tmp_path / "breakdown.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_breakdown.py"), "--tiny", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    pieces = [row["piece"] for row in result["rows"]]
    assert len(pieces) == 6 and pieces[0].startswith("plain step")
    assert result["rows"][0]["plain_steps"] == 1.0
    plain_ms = result["rows"][0]["ms"]
    assert [row["plain_steps"] for row in result["rows"]] == pytest.approx(
        [row["ms"] / plain_ms for row in result["rows"]], rel=1e-9)
    assert "aten::" in result["profile_top"]


@pytest.mark.slow
def test_block_cost_benchmark_times_both_granularities(tmp_path: Path) -> None:
    out = tmp_path / "block_cost.json"
    import_module("block_cost").main(["--sizes", "tiny", "--steps", "4", "--warmup", "1", "--lr", "0.3",
                                         "--out", str(out)])
    (tiny,) = json.loads(out.read_text())["sizes"]
    assert tiny["size"] == "tiny" and tiny["params"] == TINY_PARAMS
    flat, blocks = tiny["global"], tiny["blocks"]
    assert flat["steps"] == blocks["steps"] == 4 and flat["clipped_fraction"] == 1.0
    assert flat["probes_per_clipped_step"] == 1.0  # one measurement of u per clipped step
    assert blocks["probes_per_clipped_step"] > 2.0  # u, then the blocks where due and the applied step
    assert tiny["ratio"] == pytest.approx(blocks["after_step_s"] / flat["after_step_s"], rel=1e-12)
