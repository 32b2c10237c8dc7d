"""The benchmarks: a smoke run of benchmarks/overhead.py (every part, tiny size, no timing asserts) and the
accuracy study's oracle against an independent float64 reference."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import causal_output_positions, float64_copy, reference_logit_slopes, tiny_causal_lm, token_batch

from hf_ghosts.settings import ESTIMATORS, MODES

pytestmark = pytest.mark.usefixtures("single_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` the way ``python benchmarks/<name>.py`` sees its siblings."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.mark.slow
def test_overhead_benchmark_writes_every_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "overhead.json"
    benchmark("overhead").main(["--sizes", "tiny", "--steps", "2", "--warmup", "1", "--every", "4",
                                "--breakdown-repeats", "1", "--probe-repeats", "1", "--spike-steps", "6", "--out", str(out)])
    result = json.loads(out.read_text())

    (tiny,) = result["overhead"]
    assert tiny["size"] == "tiny" and tiny["params"] > 0
    assert (tiny["hidden"], tiny["layers"], tiny["heads"], tiny["vocab"]) == (32, 2, 4, 256)
    expected = ["plain", *(f"{m}/{e}/every{k}" for m in MODES for e in ESTIMATORS for k in (1, 4))]
    assert [row["setting"] for row in tiny["rows"]] == expected
    for row in tiny["rows"]:
        assert row["steps"] == 2
        assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0, row
        assert math.isfinite(row["peak_ratio"]) and row["peak_ratio"] > 0, row
        assert row["peak_bytes"] > 0
    assert all(row["probed_fraction"] == 1.0 for row in tiny["rows"][1:] if row.get("every") == 1)

    pieces = {piece["piece"]: piece for piece in result["breakdown"]["pieces"]}
    assert {"snapshot copy", "probe, jvp", "probe, fd"} <= pieces.keys()
    assert all(math.isfinite(piece["ms"]) and piece["ms"] >= 0 for piece in pieces.values())

    probe = {row["setting"]: row for row in result["probe"]["rows"]}
    assert list(probe) == ["forward+backward", "jvp output", "jvp output+attention", "jvp output+attention+ffn",
                           "fd output+attention", "fd output+attention, watching ffn+ffn_activation"]
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 and len(row["times_ms"]) == 1 for row in probe.values())
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
    assert total == 41856
    model = benchmark("harness").SIZES["tiny"].model()
    assert sum(p.numel() for p in model.parameters()) == total


def test_oracle_measures_the_radius_along_the_update_the_optimizer_made() -> None:
    """The oracle's ``|u|`` and ``rho`` against float64 central differences at the old weights along AdamW's step;
    it leaves AdamW's step as it was."""
    accuracy = benchmark("accuracy")
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
        "env": "ok", "overhead": "ok", "recipe": "ok", "tests": "skipped"}
    assert parts["env"]["result"]["wandb_imported_by_hf_ghosts"] is False
    rows = {row["setting"]: row for row in parts["overhead"]["result"]["rows"]}
    assert list(rows) == ["plain", "default", "jvp-bf16/every1", "fd-fp32/every1"]
    assert (rows["default"]["probe"], rows["jvp-bf16/every1"]["probe"]) == ("fd/float32", "jvp/bfloat16")
    assert rows["default"]["default"] and all(row["time_ratio"] > 0 for row in rows.values())
    assert parts["recipe"]["result"]["steps"] == 2
    assert not mark.exists(), "something imported wandb with report_to none"


def test_topk_radius_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "topk.json"
    result = benchmark("topk_radius").main(
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
    """``benchmarks/gpu_breakdown.py --tiny`` (its CPU form): one row per piece, the plain step first (1.0 plain
    steps), every time positive, and the profile table of the probe names aten ops (no timing asserts)."""
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
    assert result["rows"][0]["plain_steps"] == 1.0 and all(row["ms"] > 0 for row in result["rows"])
    assert "aten::" in result["profile_top"]
