"""The pieces of ``benchmarks/gpu_check.sh``: the environment, the overhead benchmark on a GPU, the summary.

Not meant to be run alone (``gpu_check.sh`` runs each piece in a process of its own, so that one failure keeps the
others' numbers)::

    python benchmarks/gpu_check.py env      --out DIR/env.json
    python benchmarks/gpu_check.py overhead --out DIR/overhead.json [--steps 12 --warmup 3]
    python benchmarks/gpu_check.py summary  --parts DIR --out benchmarks/results/gpu_check.json

``overhead``: on CUDA, Pythia-160m's shape (12 layers, hidden 768, 50k vocabulary), bf16, 8 x 1024 tokens per
step; a plain ``Trainer`` against ``RhoTrainer`` with the default settings (``rho_estimator`` and
``rho_probe_dtype`` "auto": a bf16 JVP there, every 16 steps + triggers), a bf16 JVP every step, and fp32
central differences every step; interleaved one step at a time (``harness.RoundRobin``). Time per step and
first-step peak memory (``torch.cuda.max_memory_allocated``), each as a ratio to plain. Without CUDA: the tiny
size, fp32, 2 steps (a smoke run). Goals (``GOALS``): default <= 1.10x, jvp-bf16 every step <= 1.6x, the probe's
peak memory <= 1.3x plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOALS = {  # setting -> (quantity, at most)
    "default": [("time_ratio", 1.10), ("peak_ratio", 1.3)],
    "jvp-bf16/every1": [("time_ratio", 1.6), ("peak_ratio", 1.3)],
}


def settings() -> list[Any]:
    from harness import Setting

    return [
        Setting("default"),  # RhoTrainingArguments' defaults: estimator and probe dtype "auto"
        Setting("jvp-bf16/every1", mode="clip", estimator="jvp", every=1, probe_dtype="bfloat16"),
        Setting("fd-fp32/every1", mode="clip", estimator="fd", every=1, probe_dtype="float32"),
    ]


def env(out: Path) -> dict[str, Any]:
    """Versions, the device, which optional packages import, and whether importing hf_ghosts imported wandb."""
    import hf_ghosts

    wandb_imported = "wandb" in sys.modules  # before anything else is imported here
    found = {}
    for name in ("transformers", "accelerate", "datasets", "evaluate", "peft", "matplotlib", "flash_attn"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:  # any failure to import is the answer
            found[name] = f"missing ({type(error).__name__})"
    result = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "hf_ghosts": hf_ghosts.__file__, "packages": found,
        "wandb_installed": importlib.util.find_spec("wandb") is not None,
        "wandb_imported_by_hf_ghosts": wandb_imported,
    }
    return result


def overhead(out: Path, steps: int | None, warmup: int | None) -> dict[str, Any]:
    from harness import SIZES
    from overhead import run_overhead, step_table

    cuda = torch.cuda.is_available()
    if cuda:
        size = dataclasses.replace(SIZES["pythia-160m"], seq=1024)  # 8 x 1024 = 8,192 tokens per step
        steps, warmup = steps or 12, warmup or 3
    else:
        print("gpu_check overhead: no CUDA here: the smoke form (tiny size, fp32, 2 steps); numbers mean nothing")
        size = SIZES["tiny"]
        steps, warmup = steps or 2, warmup or 1
    with tempfile.TemporaryDirectory() as workdir:
        result = run_overhead("pythia-160m" if cuda else "tiny", size, settings(), steps, warmup, cuda, workdir)
    result["bf16"] = cuda
    result["goals"] = goals(result["rows"]) if cuda else "not checked without CUDA"
    print(step_table(result), flush=True)
    return result


def goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {row["setting"]: row for row in rows}
    checks = []
    for name, limits in GOALS.items():
        for quantity, limit in limits:
            value = by_name.get(name, {}).get(quantity)
            checks.append({"setting": name, "quantity": quantity, "value": value, "at_most": limit,
                           "met": value is not None and value <= limit})
    return checks


def summary(parts: Path, out: Path) -> dict[str, Any]:
    """Merge every part's JSON and status into one file; print a table of the parts and of the overhead."""
    result: dict[str, Any] = {"parts": {}}
    for status in sorted(parts.glob("*.status")):
        name = status.stem
        fields = dict(line.split("=", 1) for line in status.read_text().splitlines() if "=" in line)
        entry: dict[str, Any] = {"status": fields.get("status", "?"), "rc": int(fields.get("rc", -1)),
                                 "seconds": float(fields.get("seconds", "nan")), "note": fields.get("note", "")}
        data = parts / f"{name}.json"
        if data.exists():
            try:
                entry["result"] = json.loads(data.read_text())
            except json.JSONDecodeError as error:
                entry["result_error"] = str(error)
        junit = parts / f"{name}.xml"
        if junit.exists():  # pytest's counts
            import xml.etree.ElementTree as ET

            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            entry["result"] = counts
            entry["note"] += "; " + ", ".join(f"{value} {key}" for key, value in counts.items())
        log = parts / f"{name}.log"
        if log.exists() and entry["status"] == "failed":
            entry["log_tail"] = log.read_text(errors="replace")[-4000:]
        result["parts"][name] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print("\n== gpu_check summary")
    print(f"{'part':<12} {'status':<8} {'seconds':>8}  note")
    for name, entry in result["parts"].items():
        print(f"{name:<12} {entry['status']:<8} {entry['seconds']:>8.0f}  {entry['note']}")
    measured = result["parts"].get("overhead", {}).get("result")
    if measured:
        print(f"\noverhead: {measured['size']}, {measured['batch']} x {measured['seq']} tokens, bf16={measured['bf16']}, "
              f"{measured['steps']} timed steps after {measured['warmup']}")
        print(f"{'setting':<18} {'probe':<14} {'time/plain':>10} {'probed':>7} {'peak/plain':>10} {'plain ms':>9}")
        plain_ms = measured["rows"][0]["cost_s"] * 1e3
        for row in measured["rows"]:
            print(f"{row['setting']:<18} {row.get('probe') or '-':<14} {row['time_ratio']:>10.3f} "
                  f"{row['probed_fraction']:>7.0%} {row['peak_ratio']:>10.3f} {plain_ms:>9.1f}")
        if isinstance(measured.get("goals"), list):
            print("\ngoals:")
            for check in measured["goals"]:
                value = "n/a" if check["value"] is None else f"{check['value']:.3f}"
                print(f"  {check['setting']:<18} {check['quantity']:<10} {value:>7} <= {check['at_most']}: "
                      f"{'MET' if check['met'] else 'NOT MET'}")
    print(f"\nwrote {out}")
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, target / out.name)
        print(f"copied to {target / out.name}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["env", "overhead", "summary"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", type=Path, help="summary: the folder of the parts' .status/.json/.log files")
    parser.add_argument("--steps", type=int, default=None, help="overhead: timed steps (default 12 on CUDA, 2 without)")
    parser.add_argument("--warmup", type=int, default=None, help="overhead: untimed first steps (default 3 / 1)")
    args = parser.parse_args(argv)
    if args.part == "summary":
        summary(args.parts, args.out)
        return
    result = env(args.out) if args.part == "env" else overhead(args.out, args.steps, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
