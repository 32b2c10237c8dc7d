"""The pieces of ``benchmarks/gpu_check.sh``: the environment, the overhead benchmark on a GPU, the summary.

Not meant to be run alone (``gpu_check.sh`` runs each piece in a process of its own, so that one failure keeps the
others' numbers)::

    python benchmarks/gpu_check.py env      --out DIR/env.json
    python benchmarks/gpu_check.py overhead --out DIR/overhead.json [--steps 12 --warmup 3]
    python benchmarks/gpu_check.py finetune --out DIR/finetune.json [--steps 12 --warmup 3]
    python benchmarks/gpu_check.py summary  --parts DIR --out benchmarks/results/gpu_check.json

``overhead``: on CUDA, Pythia-160m's shape (12 layers, hidden 768, 50k vocabulary), bf16, 8 x 1024 tokens per
step; a plain ``Trainer`` against ``RhoTrainer`` with the default settings (``rho_estimator`` and
``rho_probe_dtype`` "auto": a bf16 JVP there, every 16 steps + triggers), a bf16 JVP every step, and fp32
central differences every step; interleaved one step at a time (``harness.RoundRobin``). Time per step and
first-step peak memory (``torch.cuda.max_memory_allocated``), each as a ratio to plain. Without CUDA: the tiny
size, fp32, 2 steps (a smoke run). This is the ``"pretrain"`` scenario: from random initialization at lr 6e-4.

``finetune``: the ``"finetune"`` scenario, what users fine-tuning a trained model see. The same shape is first trained
``PRETRAIN_STEPS`` plain bf16 steps at lr 6e-4 on the first 80% of the pydoc text (a manual loop, linear warm-up), then
the same four settings are timed fine-tuning it at ``FINETUNE_LR`` on the held-out last 20%.

Goals (``GOALS``, per scenario): pretrain: jvp-bf16 every step <= 1.6x and the probe's peak memory <= 1.3x plain;
finetune: the default <= 1.10x.
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

GOALS = {  # scenario -> setting -> (quantity, at most)
    "pretrain": {"jvp-bf16/every1": [("time_ratio", 1.6), ("peak_ratio", 1.3)], "default": [("peak_ratio", 1.3)]},
    "finetune": {"default": [("time_ratio", 1.10), ("peak_ratio", 1.3)]},
}
PRETRAIN_LR, FINETUNE_LR = 6e-4, 3e-5
PRETRAIN_STEPS = 300  # on CUDA: ~15 s at 8 x 1024 tokens; 3 in the CPU smoke form
TRAIN_SPAN, HELD_OUT_SPAN = (0.0, 0.8), (0.8, 1.0)


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
    for name in ("transformers", "accelerate", "datasets", "peft", "matplotlib", "flash_attn"):
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


def scenario_size(steps: int | None, warmup: int | None) -> tuple[str, Any, int, int, bool]:
    """``(name, size, steps, warmup, cuda)``: Pythia-160m's shape at 8 x 1024 on CUDA, else the tiny smoke form."""
    from harness import SIZES

    cuda = torch.cuda.is_available()
    if cuda:
        return "pythia-160m", dataclasses.replace(SIZES["pythia-160m"], seq=1024), steps or 12, warmup or 3, True
    print("gpu_check: no CUDA here: the smoke form (tiny size, fp32, 2 steps); numbers mean nothing")
    return "tiny", SIZES["tiny"], steps or 2, warmup or 1, False


def overhead(out: Path, steps: int | None, warmup: int | None) -> dict[str, Any]:
    """The ``"pretrain"`` scenario: every setting from the same random initialization at the size's lr (6e-4)."""
    from overhead import run_overhead, step_table

    name, size, steps, warmup, cuda = scenario_size(steps, warmup)
    with tempfile.TemporaryDirectory() as workdir:
        result = run_overhead(name, size, settings(), steps, warmup, cuda, workdir)
    return finished(result, "pretrain", cuda, step_table)


def pretrained(size: Any, steps: int, bf16: bool) -> torch.nn.Module:
    """The size's model after ``steps`` plain AdamW steps at ``PRETRAIN_LR`` (linear warm-up over the first tenth,
    bf16 autocast on CUDA) on ``TRAIN_SPAN`` of the pydoc text."""
    from harness import batch_of, token_blocks

    model = size.model()
    model.train()
    blocks = token_blocks(size.batch * steps, size.seq, seed=1, span=TRAIN_SPAN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm))
    for step in range(steps):
        batch = batch_of(blocks[step * size.batch : (step + 1) * size.batch], size.device)
        with torch.autocast(size.device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"gpu_check finetune: pretraining step {step}: loss {loss.item():.3f}", flush=True)  # host sync
    return model


def finetune(out: Path, steps: int | None, warmup: int | None) -> dict[str, Any]:
    """The ``"finetune"`` scenario: pretrain ``PRETRAIN_STEPS`` steps, then time every setting at ``FINETUNE_LR``
    on the held-out text."""
    from harness import Blocks, token_blocks
    from overhead import run_overhead, step_table

    name, size, steps, warmup, cuda = scenario_size(steps, warmup)
    base = pretrained(size, PRETRAIN_STEPS if cuda else 3, cuda)
    held_out = Blocks(token_blocks(size.batch * (steps + warmup), size.seq, seed=2, span=HELD_OUT_SPAN))
    with tempfile.TemporaryDirectory() as workdir:
        result = run_overhead(name, size, settings(), steps, warmup, cuda, workdir, base=base, data=held_out,
                              lr=FINETUNE_LR)
    result["pretrain_steps"], result["pretrain_lr"], result["lr"] = PRETRAIN_STEPS if cuda else 3, PRETRAIN_LR, FINETUNE_LR
    return finished(result, "finetune", cuda, step_table)


def finished(result: dict[str, Any], scenario: str, cuda: bool, step_table: Any) -> dict[str, Any]:
    result["scenario"], result["bf16"] = scenario, cuda
    result["goals"] = goals(result["rows"], scenario) if cuda else "not checked without CUDA"
    print(step_table(result), flush=True)
    return result


def goals(rows: Sequence[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    by_name = {row["setting"]: row for row in rows}
    checks = []
    for name, limits in GOALS[scenario].items():
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
    for part in ("overhead", "finetune"):
        print_overhead(result["parts"].get(part, {}).get("result"))
    breakdown = result["parts"].get("breakdown", {}).get("result")
    if breakdown:
        print(f"\nbreakdown ({breakdown['device']}, {breakdown['preset']}, {breakdown['batch']} x {breakdown['seq']}):")
        for row in breakdown["rows"]:
            print(f"  {row['piece']:<55} {row['ms']:9.1f} ms {row['plain_steps']:6.2f} plain steps")
    print(f"\nwrote {out}")
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, target / out.name)
        print(f"copied to {target / out.name}")
    return result


def print_overhead(measured: dict[str, Any] | None) -> None:
    """One scenario's table of settings and its goals."""
    if measured:
        print(f"\n{measured.get('scenario', 'overhead')}: {measured['size']}, {measured['batch']} x {measured['seq']} "
              f"tokens, bf16={measured['bf16']}, {measured['steps']} timed steps after {measured['warmup']}")
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["env", "overhead", "finetune", "summary"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", type=Path, help="summary: the folder of the parts' .status/.json/.log files")
    parser.add_argument("--steps", type=int, default=None, help="overhead: timed steps (default 12 on CUDA, 2 without)")
    parser.add_argument("--warmup", type=int, default=None, help="overhead: untimed first steps (default 3 / 1)")
    args = parser.parse_args(argv)
    if args.part == "summary":
        summary(args.parts, args.out)
        return
    if args.part == "env":
        result = env(args.out)
    else:
        result = (overhead if args.part == "overhead" else finetune)(args.out, args.steps, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
