"""The tables and figures of ``recipes/lr_sensitivity.py``: the sensitivity measure, a run's clipping summary from its
logged ``ghosts/*`` keys, the per-method table, the loss pivot, the two figures and ``summary.json``, all from the run
records. No training here: ``--replot`` runs only this.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from common import write_json, write_table
from lr_free import spread

from hf_ghosts.plots import save_figure

STYLES = {
    "adamw": ("tab:red", "-"), "adamw+clip": ("tab:orange", "--"), "adamw+zloss": ("tab:purple", "-."),
    "qk-norm": ("tab:green", "-"), "qk-norm+zloss": ("tab:olive", "-."), "rho": ("tab:blue", "-"),
    "rho+zloss": ("tab:cyan", "-."), "rho+qk-norm": ("navy", "--"), "rho-best": ("black", "-"),
    "zclip": ("tab:brown", "--"), "skip-step": ("tab:pink", ":"), "rho-blocks": ("tab:gray", "-"),
    "rho-blocks+qk-norm": ("dimgray", "--"),
}


def lr_sensitivity(losses: Sequence[float], initial_loss: float) -> float:
    """Wortsman et al. (2023), Section 3.1: ``mean_lr min(loss(lr), loss_0) - min_lr loss(lr)``.

    A loss that is not finite counts as ``loss_0`` in the mean and is left out of the minimum (NaN if none is
    finite). Example: ``lr_sensitivity([3.0, 2.0, nan, 6.0], 5.0) = (3 + 2 + 5 + 5) / 4 - 2 = 1.75``.
    """
    values = np.asarray(losses, dtype=float)
    if values.size == 0:
        raise ValueError("lr_sensitivity: expects at least one loss; got none")
    finite = np.isfinite(values)
    capped = np.where(finite, np.minimum(values, initial_loss), initial_loss)
    return float(capped.mean() - values[finite].min()) if finite.any() else math.nan


def mean_regret(losses: Sequence[float], initial_loss: float, best: float) -> float:
    """Issue 30's measure: ``mean_lr min(loss(lr), loss_0) - best``, with ``best`` one common reference (the best loss
    of ANY method on the preset and seed), so a method that lowers its own best is not counted as more sensitive
    (Wortsman's sensitivity, :func:`lr_sensitivity`, compares each method with its own best). A loss that is not
    finite counts as ``loss_0``.

    >>> mean_regret([3.0, 2.0, float("nan"), 6.0], 5.0, 1.5)
    2.25
    """
    values = np.asarray(losses, dtype=float)
    if values.size == 0:
        raise ValueError("mean_regret: expects at least one loss; got none")
    capped = np.where(np.isfinite(values), np.minimum(values, initial_loss), initial_loss)
    return float(capped.mean() - best)


def ghosts_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """From the ``ghosts/*`` entries of a ``log_history``: ``probed_fraction`` (probed / measured steps),
    ``clipped_fraction`` (clipped / probed), ``binding_radius`` (the limiting radius that bound most probed steps),
    ``bottleneck_counts``, ``skipped_steps``, ``r_max`` and ``rho_min``; NaN / ``""`` for a run without them; with
    block-wise steps (``rho_granularity="blocks"``) also ``block_probes_per_step`` (their extra measurements per step).

    Each log covers the steps since the previous one; its fractions are of the steps that were not skipped
    (``ghosts/skipped_nonfinite``, ``ghosts/would_skip``), as :class:`hf_ghosts.metrics.MetricWindow` reduces them.
    """
    previous, measured, probed, clipped, skipped = 0, 0, 0, 0, 0
    block_probes: list[float] = []
    bottleneck: Counter[str] = Counter()
    r_max, rho_min = -math.inf, math.inf
    for entry in history:
        if "ghosts/skipped_nonfinite" not in entry:
            continue
        window = entry["step"] - previous
        previous = entry["step"]
        lost = int(entry["ghosts/skipped_nonfinite"] + entry.get("ghosts/would_skip", 0.0))
        skipped += lost
        measured += window - lost
        here = round(entry.get("ghosts/probed", 0.0) * (window - lost))
        probed += here
        clipped += round(entry.get("ghosts/clipped", 0.0) * here)
        for key, value in entry.items():
            if key.startswith("ghosts/bottleneck/"):
                bottleneck[key.removeprefix("ghosts/bottleneck/")] += int(value)
        r_max = max(r_max, entry.get("ghosts/r", -math.inf))
        rho_min = min(rho_min, entry.get("ghosts/rho", math.inf))
        block_probes += [entry["ghosts/block_probes"]] if "ghosts/block_probes" in entry else []
    if not previous:
        return {"probed_fraction": math.nan, "clipped_fraction": math.nan, "binding_radius": "", "bottleneck_counts": {},
                "skipped_steps": math.nan, "r_max": math.nan, "rho_min": math.nan}
    return {
        "probed_fraction": probed / measured if measured else math.nan,
        "clipped_fraction": clipped / probed if probed else math.nan,
        "binding_radius": max(bottleneck, key=bottleneck.get) if sum(bottleneck.values()) else "none",
        "bottleneck_counts": dict(bottleneck), "skipped_steps": skipped,
        "r_max": r_max if math.isfinite(r_max) else math.nan, "rho_min": rho_min if math.isfinite(rho_min) else math.nan,
        **({"block_probes_per_step": sum(block_probes) / measured if measured else math.nan} if block_probes else {}),
    }


# --------------------------------------------------------------------------------------------- tables and figures
def summarize(rows: list[dict[str, Any]], spec: Any) -> list[dict[str, Any]]:
    """Per (preset, method): the sensitivity of each seed's sweep (its ``loss_0``: the mean initial eval loss of the
    seed's runs, identical weights), mean ± std (ddof=1) over seeds; the seed-mean best loss and its rate; ratios
    to AdamW's; diverged runs; the largest logits; mean clipped and probed fractions."""
    table = []
    for preset in spec.presets:
        for method in spec.methods:
            mine = [r for r in rows if (r["preset"], r["method"]) == (preset, method)]
            if not mine:
                continue
            seeds = sorted({r["seed"] for r in mine})
            per_seed = [[r for r in mine if r["seed"] == seed] for seed in seeds]
            values = [lr_sensitivity([r["final_eval_loss"] for r in runs], float(np.mean([r["initial_eval_loss"] for r in runs])))
                      for runs in per_seed]
            best = [_finite_min([r["final_eval_loss"] for r in runs]) for runs in per_seed]
            lrs = sorted({r["learning_rate"] for r in mine})
            mean_loss = {lr: float(np.mean([r["final_eval_loss"] for r in mine if r["learning_rate"] == lr])) for lr in lrs}
            sensitivity = spread(values)
            # one reference per seed: the best loss of any method of the table on this preset and seed
            common = [_finite_min([r["final_eval_loss"] for r in rows if (r["preset"], r["seed"]) == (preset, seed)
                                   and r["method"] in spec.methods]) for seed in seeds]
            regrets = spread([mean_regret([r["final_eval_loss"] for r in runs],
                                          float(np.mean([r["initial_eval_loss"] for r in runs])), reference)
                              for runs, reference in zip(per_seed, common, strict=True)])
            table.append({
                "regret_mean": regrets["mean"], "regret_std": regrets["std"], "loss_by_lr": mean_loss,
                "preset": preset, "method": method, "seeds": len(seeds), "learning_rates": len(lrs),
                "sensitivity_mean": sensitivity["mean"], "sensitivity_std": sensitivity["std"],
                "best_loss_mean": float(np.mean(best)),
                "best_lr": min(lrs, key=lambda lr: mean_loss[lr] if math.isfinite(mean_loss[lr]) else math.inf),
                "diverged_runs": sum(bool(r["diverged"]) for r in mine), "runs": len(mine),
                "max_attention_logit": float(np.nanmax([r["max_attention_logit"] for r in mine])),
                "max_output_logit": float(np.nanmax([r["max_output_logit"] for r in mine])),
                "clipped_fraction": float(np.mean([r["clipped_fraction"] for r in mine])),
                "probed_fraction": float(np.mean([r["probed_fraction"] for r in mine])),
                "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
            })
    for row in table:
        adamw = next((r for r in table if (r["preset"], r["method"]) == (row["preset"], "adamw")), None)
        row["sensitivity_vs_adamw"] = _ratio(row["sensitivity_mean"], adamw["sensitivity_mean"]) if adamw else math.nan
        row["best_vs_adamw"] = _ratio(row["best_loss_mean"], adamw["best_loss_mean"]) - 1 if adamw else math.nan
        row["regret_vs_adamw"] = _ratio(row["regret_mean"], adamw["regret_mean"]) if adamw else math.nan
        # the rate where the method is furthest above AdamW's loss (seed means; rates both ran)
        shared = [lr for lr in row["loss_by_lr"] if adamw and lr in adamw["loss_by_lr"]]
        row["worst_rate_vs_adamw"] = max((row["loss_by_lr"][lr] / adamw["loss_by_lr"][lr] - 1 for lr in shared),
                                         default=math.nan)
    for row in table:
        del row["loss_by_lr"]
    return table


def _finite_min(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.nan


def _ratio(top: float, bottom: float) -> float:
    return top / bottom if bottom != 0 and math.isfinite(bottom) else math.nan


def losses_markdown(rows: list[dict[str, Any]], spec: Any) -> str:
    """Per preset, method x learning rate: final eval loss, seed mean ± std (diverged runs counted)."""
    parts = []
    for preset in spec.presets:
        lrs = spec.learning_rates_of(preset)
        lines = [f"**{preset}**: final eval loss after {spec.max_steps} steps, mean ± std over seeds (diverged runs: D)",
                 "", "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for method in spec.methods:
            cells = []
            for lr in lrs:
                runs = [r for r in rows if (r["preset"], r["method"], r["learning_rate"]) == (preset, method, lr)]
                if not runs:
                    cells.append("-")
                    continue
                loss = spread([r["final_eval_loss"] for r in runs])
                diverged = sum(bool(r["diverged"]) for r in runs)
                cells.append(f"{loss['mean']:.3f} ± {loss['std']:.3f}" + (f" ({diverged} D)" if diverged else ""))
            if any(cell != "-" for cell in cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _by_lr(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Learning rates, and per rate the seed mean, min and max of ``key``."""
    lrs = np.array(sorted({r["learning_rate"] for r in rows}))
    values = [np.array([r[key] for r in rows if r["learning_rate"] == lr], dtype=float) for lr in lrs]
    return lrs, *(np.array([f(v) for v in values]) for f in (np.mean, np.min, np.max))


def _capped(values: np.ndarray, ceiling: float) -> np.ndarray:
    return np.where(np.isfinite(values), np.minimum(values, ceiling), ceiling)


def plot_losses(rows: list[dict[str, Any]], table: list[dict[str, Any]], spec: Any, path: str) -> str:
    """Per preset: final eval loss against the learning rate (log x), seed mean and min-max band per method, the
    initial loss dotted; a seed mean above it or not finite is drawn as x at the ceiling (Wortsman et al.'s Figure 1)."""
    presets = [p for p in spec.presets if any(r["preset"] == p for r in rows)]
    figure, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4.5), squeeze=False)
    for axis, preset in zip(axes[0], presets, strict=True):
        mine = [r for r in rows if r["preset"] == preset]
        initial = float(np.mean([r["initial_eval_loss"] for r in mine]))
        ceiling = initial * 1.02
        for method in spec.methods:
            runs = [r for r in mine if r["method"] == method]
            if not runs:
                continue
            lrs, mean, low, high = _by_lr(runs, "final_eval_loss")
            color, style = STYLES[method]
            row = next(t for t in table if (t["preset"], t["method"]) == (preset, method))
            axis.plot(lrs, _capped(mean, ceiling), color=color, ls=style, marker="o", ms=3,
                      label=f"{method} (LR sens. {row['sensitivity_mean']:.3f})")
            axis.fill_between(lrs, _capped(low, ceiling), _capped(high, ceiling), color=color, alpha=0.12)
            above = ~np.isfinite(mean) | (mean > initial)
            axis.plot(lrs[above], np.full(above.sum(), ceiling), "x", color=color, ms=9, mew=2)
        axis.axhline(initial, color="gray", ls=":", lw=1, label=f"loss at initialization ({initial:.2f})")
        axis.set_xscale("log")
        axis.set_xlabel("peak learning rate")
        axis.set_ylabel("final eval loss (seed mean, min-max band; x: above loss_0)")
        axis.set_title(f"{preset}, {spec.max_steps} steps")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return save_figure(figure, path)


def plot_logits(rows: list[dict[str, Any]], spec: Any, path: str) -> str:
    """Top: max attention logit; bottom: max output logit; against the learning rate, per preset (log-log)."""
    presets = [p for p in spec.presets if any(r["preset"] == p for r in rows)]
    figure, axes = plt.subplots(2, len(presets), figsize=(5.5 * len(presets), 8), squeeze=False)
    for column, preset in enumerate(presets):
        for row_index, (key, label) in enumerate((("max_attention_logit", "max attention logit"),
                                                  ("max_output_logit", "max |output logit|"))):
            axis = axes[row_index, column]
            for method in spec.methods:
                runs = [r for r in rows if (r["preset"], r["method"]) == (preset, method)]
                if runs:
                    lrs, mean, low, high = _by_lr(runs, key)
                    color, style = STYLES[method]
                    axis.plot(lrs, mean, color=color, ls=style, marker="o", ms=3, label=method)
                    axis.fill_between(lrs, low, high, color=color, alpha=0.12)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel("peak learning rate")
            axis.set_ylabel(f"{label} over training")
            axis.set_title(f"{preset}: {label}")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    return save_figure(figure, path)


RUN_COLUMNS = ["preset", "method", "learning_rate", "seed", "initial_eval_loss", "final_eval_loss", "diverged",
               "max_train_loss", "max_attention_logit", "max_output_logit", "probed_fraction", "clipped_fraction",
               "binding_radius", "r_max", "rho_min", "skipped_steps", "train_seconds", "eval_seconds"]
TABLE_COLUMNS = ["preset", "method", "seeds", "learning_rates", "regret_mean", "regret_std", "regret_vs_adamw",
                 "worst_rate_vs_adamw", "sensitivity_mean", "sensitivity_std", "sensitivity_vs_adamw",
                 "best_loss_mean", "best_vs_adamw", "best_lr", "diverged_runs", "runs", "max_attention_logit",
                 "max_output_logit", "clipped_fraction", "probed_fraction", "train_seconds"]


def report(rows: list[dict[str, Any]], spec: Any, expected: int) -> dict[str, Any]:
    """Write the run table, the sensitivity table, the loss pivot, both figures and the summary (``expected``: the runs
    of the grid, found or not); return the summary."""
    summary: dict[str, Any] = {"runs": len(rows), "missing_runs": expected - len(rows), "settings": dataclasses.asdict(spec)}
    if not rows:
        write_json(os.path.join(spec.output_dir, "summary.json"), summary)
        print(f"no run files under {spec.output_dir}/runs for this grid")
        return summary
    out = os.path.join(spec.output_dir, "lr_sensitivity")
    write_table(rows, f"{out}_runs", RUN_COLUMNS)
    table = summarize(rows, spec)
    markdown = write_table(table, f"{out}_table", TABLE_COLUMNS)
    losses = losses_markdown(rows, spec)
    with open(f"{out}_losses.md", "w") as handle:
        handle.write(losses)
    summary.update(table=table, train_seconds=float(sum(r["train_seconds"] + r["eval_seconds"] for r in rows)),
                   figures=[plot_losses(rows, table, spec, f"{out}.png"), plot_logits(rows, spec, f"{out}_logits.png")])
    write_json(os.path.join(spec.output_dir, "summary.json"), summary)
    print("\n" + losses + "\n" + markdown)
    print(f"wrote {spec.output_dir}/: lr_sensitivity_runs.csv/.md, lr_sensitivity_table.csv/.md, lr_sensitivity_losses.md, "
          f"lr_sensitivity.png, lr_sensitivity_logits.png, summary.json ({len(rows)} of {expected} runs)")
    return summary
