"""What a clipped step's measurements cost with ``granularity="blocks"`` against ``"global"`` (issue 30).

    python benchmarks/block_cost.py --threads 1                    # 5m and 40m on CPU, side by side (~10 min)
    python benchmarks/block_cost.py --sizes tiny --steps 3 --warmup 1   # smoke run (tests/test_benchmarks.py)

Two plain loops, ``RhoController(granularity="global")`` and ``RhoController(granularity="blocks")`` at their other
defaults (clip, ``r* = 2``, fd on CPU, ``block_refresh = 4``), train copies of the same initial weights on the same
batches (a size of ``benchmarks/harness.py``: GPT-NeoX in Pythia's layout, 8 x 128 tokens = 1,024 tokens/step) at a
learning rate that clips every step (``--lr``). Each round runs one optimizer step of each, in turn, the order
alternating, so whatever else loads the machine hits both alike. Timed per step: the forward and backward, and the
controller's ``after_step`` (the measurements, the rescale: everything the controller adds after AdamW). Warm-up
steps are dropped; only clipped steps are averaged.

Reported per size: ``after_step`` per clipped step (mean; for blocks also on the steps that measured the blocks and
on those that reused their spreads), its ratio blocks / global, the measurements per clipped step, and the forward +
backward (median) for scale. Writes ``--out`` (default ``outputs/block_cost.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from harness import SIZES, batch_of, check_devices, fmt, markdown_table, run_info, token_blocks, write_result

from hf_ghosts import RhoController

GRANULARITIES = ("global", "blocks")


def time_size(name: str, steps: int, warmup: int, lr: float) -> dict[str, Any]:
    """Interleaved clipped steps of both granularities on size ``name``; the timings and their summary."""
    size = SIZES[name]
    model = size.model()
    ids = token_blocks(warmup + steps, size.batch * size.seq).reshape(warmup + steps, size.batch, size.seq)
    runs = {}
    for granularity in GRANULARITIES:
        copy_ = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(copy_.parameters(), lr=lr)
        runs[granularity] = {"model": copy_, "optimizer": optimizer, "rows": [],
                             "controller": RhoController(copy_, optimizer, granularity=granularity)}
    for step in range(warmup + steps):
        order = GRANULARITIES if step % 2 == 0 else GRANULARITIES[::-1]
        batch = batch_of(ids[step], size.device)
        for granularity in order:
            run = runs[granularity]
            model_, optimizer, controller = run["model"], run["optimizer"], run["controller"]
            start = time.perf_counter()
            model_(**batch).loss.backward()
            between = time.perf_counter()
            controller.observe(batch)
            controller.before_step()
            optimizer.step()
            after = time.perf_counter()
            controller.after_step()
            end = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            record = controller.last
            if step >= warmup:
                run["rows"].append({"forward_backward_s": between - start, "after_step_s": end - after,
                                    "clipped": record.clipped, "probed": record.probed,
                                    "block_probes": record.block_probes or 0})
    return {"size": name, **size.describe(), "lr": lr, "params": sum(p.numel() for p in model.parameters()),
            **summarize({granularity: run["rows"] for granularity, run in runs.items()})}


def summarize(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per granularity: mean ``after_step`` over clipped steps, measurements per clipped step, clipped fraction, median
    forward + backward; for blocks the steps that measured the blocks (more than the applied step) apart; the ratio."""
    out: dict[str, Any] = {}
    for granularity, mine in rows.items():
        clipped = [row for row in mine if row["clipped"]]
        probes = [int(row["probed"]) + row["block_probes"] for row in clipped]
        out[granularity] = {
            "steps": len(mine), "clipped_fraction": len(clipped) / len(mine) if mine else float("nan"),
            "after_step_s": statistics.fmean(row["after_step_s"] for row in clipped) if clipped else float("nan"),
            "probes_per_clipped_step": statistics.fmean(probes) if probes else float("nan"),
            "forward_backward_s": statistics.median(row["forward_backward_s"] for row in mine),
        }
        if granularity == "blocks":
            for label, chosen in (("refresh", [r for r in clipped if r["block_probes"] > 1]),
                                  ("reuse", [r for r in clipped if r["block_probes"] == 1])):
                out[granularity][f"after_step_{label}_s"] = (
                    statistics.fmean(r["after_step_s"] for r in chosen) if chosen else float("nan"))
    out["ratio"] = out["blocks"]["after_step_s"] / out["global"]["after_step_s"]
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    """One row per size: after_step per clipped step, global and blocks (refresh / reuse), the ratio, probes."""
    rows = []
    for r in results:
        flat, blocks = r["global"], r["blocks"]
        rows.append([
            f"{r['size']} ({r['params'] / 1e6:.1f}M)", fmt(flat["forward_backward_s"] * 1e3, 0),
            f"{fmt(flat['after_step_s'] * 1e3, 0)} ({fmt(flat['probes_per_clipped_step'], 2)})",
            f"{fmt(blocks['after_step_s'] * 1e3, 0)} ({fmt(blocks['probes_per_clipped_step'], 2)})",
            f"{fmt(blocks['after_step_refresh_s'] * 1e3, 0)} / {fmt(blocks['after_step_reuse_s'] * 1e3, 0)}",
            f"**{fmt(r['ratio'], 2)}x**", f"{fmt(flat['clipped_fraction'], 2)} / {fmt(blocks['clipped_fraction'], 2)}",
        ])
    header = ["size", "fwd+bwd ms", "global: after_step ms (probes)", "blocks: after_step ms (probes)",
              "blocks: refresh / reuse ms", "blocks / global", "clipped (global / blocks)"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["5m", "40m"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=12, help="Timed steps per granularity (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--lr", type=float, default=3e-2, help="AdamW's rate: high enough that every step is clipped.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--out", default="outputs/block_cost.json")
    args = parser.parse_args(argv)
    check_devices(parser, args.sizes)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [time_size(name, args.steps, args.warmup, args.lr) for name in args.sizes]
    result = {**run_info(argv), "sizes": results, "table": table(results)}
    write_result(result, args.out)
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
