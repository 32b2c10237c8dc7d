"""Smoke test of benchmarks/overhead.py: the tiny size, a few steps, every part; no timing asserts."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from hf_ghosts.settings import ESTIMATORS, MODES

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_writes_every_row_with_finite_ratios(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_benchmark()
    out = tmp_path / "overhead.json"
    bench.main(["--sizes", "tiny", "--steps", "2", "--warmup", "1", "--every", "4", "--breakdown-repeats", "1",
                "--spike-steps", "6", "--out", str(out)])
    result = json.loads(out.read_text())

    (tiny,) = result["overhead"]
    assert tiny["size"] == "tiny" and tiny["params"] > 0
    expected = ["plain", *(f"{m}/{e}/every{k}" for m in MODES for e in ESTIMATORS for k in (1, 4))]
    assert [row["setting"] for row in tiny["rows"]] == expected
    for row in tiny["rows"]:
        assert row["steps"] == 2
        assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0, row
        assert math.isfinite(row["peak_ratio"]) and row["peak_ratio"] > 0, row
        assert row["peak_bytes"] > 0
    assert tiny["rows"][0]["time_ratio"] == 1.0 and tiny["rows"][0]["peak_ratio"] == 1.0
    assert all(row["probed_fraction"] == 1.0 for row in tiny["rows"][1:] if row.get("every") == 1)

    pieces = {piece["piece"]: piece for piece in result["breakdown"]["pieces"]}
    assert {"snapshot copy", "probe, jvp", "probe, fd"} <= pieces.keys()
    assert all(math.isfinite(piece["ms"]) and piece["ms"] >= 0 for piece in pieces.values())

    accuracy = {row["setting"]: row for row in result["accuracy"]}
    assert {"AdamW, no control", "clip/jvp/every1 (exact)", "clip/fd/every1", "clip/jvp/every4"} <= accuracy.keys()
    exact = accuracy["clip/jvp/every1 (exact)"]
    assert exact["r_error_max"] < 1e-5  # the oracle repeats the exact measurement
    assert exact["steps_over_target"] == 0
    assert accuracy["clip/fd/every1"]["r_error_max"] < 0.05
    assert not accuracy["AdamW, no control"]["survived"] and exact["survived"]

    printed = capsys.readouterr().out
    assert "| setting | tiny (" in printed and f"wrote {out}" in printed
