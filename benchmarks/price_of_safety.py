"""The price of safety: what the controller costs in eval loss and time against plain AdamW, by setting.

    python benchmarks/price_of_safety.py                        # 42M (the 40m size), 60 steps, every setting
    python benchmarks/price_of_safety.py --steps 200 --settings plain topk_exact
    python benchmarks/price_of_safety.py --size tiny --steps 6 --out /tmp/p.json   # smoke run
    python benchmarks/price_of_safety.py --from_json benchmarks/results/price_of_safety_40m_60.json --png docs/figures/price_of_safety.png

Every setting trains a copy of the same initial weights on the same batches (byte-level tokens of the
English text that ships with Python, as :mod:`harness`), AdamW at the size's learning rate (Pythia-160m's
6e-4 at 40m) with a cosine schedule and 10% warm-up, then evaluates on held-out blocks. The trainers
take turns step by step in one process (:func:`harness.run_interleaved`), so that whatever else loads
the machine hits all of them alike; the time per step is the mean over all steps (probes included),
as a ratio to plain AdamW's. Per step it keeps the proposed ``r``, the applied ``r`` and whether the
step was probed and clipped, for the question "does the clip feed itself" (is the proposed ``r`` of a
clipped trajectory larger than plain AdamW's). Writes one JSON (``--out``).

The settings (``RhoTrainingArguments`` fields; every other field at its default):
``bound`` (``pi / max Delta``, ``r* = 1``), ``topk_exact`` (``rho_radius="topk_exact"``), ``bound_r2``,
``bound_r3``, ``bound_r4``, ``topk_exact_r2``, ``topk_exact_r3`` (``rho_target`` 2, 3 and 4), ``bound_moments`` and ``topk_exact_moments``
(``rho_rescale_moments=True``: the first moment scaled with the step), ``bound_r2_global`` and ``bound_r2_blocks``
(``r* = 2`` with ``rho_granularity`` "global" and "blocks", whatever the default).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from harness import (
    SIZES,
    Blocks,
    RoundRobin,
    StepTimer,
    fmt,
    markdown_table,
    run_info,
    run_interleaved,
    token_blocks,
    write_result,
)
from transformers import Trainer, TrainingArguments

from hf_ghosts import RhoTrainer, RhoTrainingArguments
from hf_ghosts.plots import save_figure

SETTINGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "bound": {},
    "topk_exact": {"rho_radius": "topk_exact"},
    "bound_r2": {"rho_target": 2.0},
    "bound_r3": {"rho_target": 3.0},
    "bound_r4": {"rho_target": 4.0},
    "topk_exact_r2": {"rho_radius": "topk_exact", "rho_target": 2.0},
    "topk_exact_r3": {"rho_radius": "topk_exact", "rho_target": 3.0},
    "bound_r2_global": {"rho_target": 2.0, "rho_granularity": "global"},
    "bound_r2_blocks": {"rho_target": 2.0, "rho_granularity": "blocks"},
    "bound_moments": {"rho_rescale_moments": True},
    "topk_exact_moments": {"rho_radius": "topk_exact", "rho_rescale_moments": True},
}

# The StepRecord fields kept per step (|u| = r * rho).
RECORD_FIELDS = ("step", "r", "r_applied", "scale", "rho", "rho_out", "rho_out_bound", "rho_attn", "probed", "clipped")


class StepLog(StepTimer):
    """:class:`harness.StepTimer` that also keeps each step's :class:`~hf_ghosts.metrics.StepRecord` scalars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, **kwargs):
        controller = getattr(self.trainer, "rho_controller", None)
        if controller is not None and controller.last is not None:
            self.records.append({key: value for key, value in controller.last.scalars().items() if key in RECORD_FIELDS})
        return super().on_step_end(args, state, control, **kwargs)


def train_all(size_name: str, names: Sequence[str], steps: int, eval_blocks: int, workdir: str) -> list[dict[str, Any]]:
    """Train every setting in ``names`` interleaved; one row each: eval loss, time, probed and clipped fractions."""
    size = SIZES[size_name]
    base = size.model()
    train = Blocks(token_blocks(size.batch * steps, size.seq, seed=0))
    held_out = Blocks(token_blocks(eval_blocks, size.seq, seed=1))
    turns = RoundRobin(list(names))
    trainers: dict[str, Trainer] = {}
    logs: dict[str, StepLog] = {}
    for index, name in enumerate(names):
        common = dict(
            output_dir=f"{workdir}/{index}", per_device_train_batch_size=size.batch, per_device_eval_batch_size=size.batch,
            max_steps=steps, learning_rate=size.lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
            logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=0, data_seed=0,
            dataloader_num_workers=0, use_cpu=size.device == "cpu",
        )
        fields = SETTINGS[name]
        args = TrainingArguments(**common) if fields is None else RhoTrainingArguments(**common, **fields)
        log = StepLog(name, turns, size.device)
        trainer = (Trainer if fields is None else RhoTrainer)(model=copy.deepcopy(base), args=args, train_dataset=train,
                                                              callbacks=[log])
        log.trainer = trainer
        trainers[name], logs[name] = trainer, log
    del base
    run_interleaved(trainers, turns)
    plain_time = statistics.fmean(logs[names[0]].times)
    rows = []
    for name in names:
        log = logs[name]
        eval_loss = float(trainers[name].evaluate(held_out)["eval_loss"])
        probed = [record for record in log.records if record.get("probed")]
        rows.append({
            "setting": name, "fields": SETTINGS[name] or {}, "eval_loss": eval_loss,
            "step_s": statistics.fmean(log.times), "time_ratio": statistics.fmean(log.times) / plain_time,
            "probed_fraction": len(probed) / steps if SETTINGS[name] is not None else 0.0,
            "clipped_fraction": sum(bool(r.get("clipped")) for r in log.records) / steps if SETTINGS[name] is not None else 0.0,
            "records": log.records,
        })
    trainers.clear()
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Eval loss (and against plain), time per step / plain, fractions probed and clipped, largest proposed ``r``."""
    plain = next((row["eval_loss"] for row in rows if row["setting"] == "plain"), math.nan)
    body = []
    for row in rows:
        proposed = [record["r"] for record in row["records"] if record.get("probed")]
        gain = [record["rho_out"] / record["rho_out_bound"] for record in row["records"] if record.get("rho_out_bound")]
        body.append([
            row["setting"], fmt(row["eval_loss"], 3), f"{100 * (row['eval_loss'] / plain - 1):+.1f}%",
            fmt(row["time_ratio"]) + "x", f"{100 * row['probed_fraction']:.0f}%", f"{100 * row['clipped_fraction']:.0f}%",
            fmt(max(proposed)) if proposed else "-", fmt(statistics.median(gain)) if gain else "-",
        ])
    header = ["setting", "eval loss", "vs plain", "time / plain", "probed", "clipped", "max proposed r", "rho_out / bound (median)"]
    return markdown_table(header, body)


def plot(rows: Sequence[dict[str, Any]], path: str, title: str) -> str:
    """Proposed ``r`` on probed steps (left) and the applied scale (right) against the step, one line per setting."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in rows:
        probed = [record for record in row["records"] if record.get("probed")]
        if not probed:
            continue
        left.plot([r["step"] for r in probed], [r["r"] for r in probed], marker=".", lw=1, label=row["setting"])
        right.plot([r["step"] for r in row["records"]], [r.get("scale", 1.0) for r in row["records"]], lw=1,
                   label=row["setting"])
    left.axhline(1.0, color="gray", ls="--", lw=1)
    left.set_yscale("log")
    left.set_ylabel("proposed r = |u| / rho (probed steps, each setting's own rho)")
    right.set_ylabel("scale applied to AdamW's update")
    for axis in (left, right):
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40m", choices=[name for name, size in SIZES.items() if size.device == "cpu"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="plain AdamW always runs first (the reference)")
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--from_json", default=None, help="no training: the table and --png from a result JSON written before")
    parser.add_argument("--png", default=None, help="also draw proposed r and the scale per step into this PNG")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/price_of_safety_<size>_<steps>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        names = ["plain", *[name for name in args.settings if name != "plain"]]
        with tempfile.TemporaryDirectory() as workdir:
            rows = train_all(args.size, names, args.steps, args.eval_blocks, workdir)
        result = {**run_info(argv), "size": args.size, **SIZES[args.size].describe(), "steps": args.steps, "rows": rows}
        result["table"] = table(rows)
    print(result["table"])
    if args.png:
        title = (f"{result['size']}: {result['steps']} steps of {result['batch']} x {result['seq']} tokens, "
                 f"lr {result['lr']:g}, cosine")
        plot(result["rows"], args.png, title)
    if not args.from_json:
        write_result(result, args.out or f"benchmarks/results/price_of_safety_{args.size}_{args.steps}.json")
    return result


if __name__ == "__main__":
    main()
