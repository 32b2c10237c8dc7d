"""Is rho-set learning-rate-free? Set mode against a tuned AdamW, Prodigy, schedule-free AdamW and Trainer's defaults.

The paper's Table 3: setting the step length from the radius (``rho_mode="set"``, ``|u| = r* rho``,
no base learning rate) beat the best fixed learning rate on a ResNet. This recipe measures it on
language models against what users already have, on the same data, steps, initial weights and
data order (one per seed), for every preset in ``--presets`` (a target that works for one family
and size but not another is not learning-rate-free):

=================  =======================================================================================
method             optimizer and schedule
=================  =======================================================================================
``adamw lr=X``     AdamW at each ``--learning_rates`` value, cosine decay after ``--warmup_fraction`` linear
                   warm-up, no gradient clipping (the sweep a user would tune)
``rho-set r*=X``   ``RhoTrainer(rho_mode="set")`` at each ``--rho_targets`` value: AdamW gives the direction,
                   the length is ``r*(t) rho`` with ``r*(t) = r* lr(t) / lr_peak`` following the same cosine
                   with warm-up; AdamW's ``lr`` (``--rho_learning_rate``) then drops out (the direction of
                   AdamW's update does not depend on it)
``prodigy``        ``prodigyopt.Prodigy`` at its usual ``lr = 1`` (it estimates the step size ``d`` itself) and the
                   package's defaults (``d0 = 1e-6``; no ``safeguard_warmup``, no ``use_bias_correction``: with both
                   on, ``d`` stayed below 2.3e-4 in 200 steps on pythia-tiny), the same cosine with warm-up
``schedule-free``  ``optim="schedule_free_adamw"`` (``schedulefree.AdamWScheduleFree``) at ``--schedule_free_lr``
                   (the package's default), a constant schedule with the same warm-up steps inside the optimizer,
                   as it is meant to be used; Trainer switches it to its averaged weights for evaluation
``adamw-default``  what Trainer gives without tuning: ``TrainingArguments``' default ``learning_rate`` (5e-5),
                   linear decay, no warm-up, ``max_grad_norm`` 1.0
=================  =======================================================================================

The rho-set target list marks the controller's default ``rho_target`` ("(default)"). With
``--spike_factor F --spike_at K`` every method's learning rate is multiplied by ``F`` from optimizer
step ``K`` (0-based) to the end, on top of its own schedule (:func:`presets.spiked`, ``spike_how="multiply"``);
in set mode that multiplies ``r*(t)`` too, since the target follows the schedule.

    python recipes/lr_free.py              # pythia-tiny + llama-tiny, 11 methods, seed 0: 22 runs, about a third of the next
    python recipes/lr_free.py --seeds 0 1 2   # docs/results.md's table: 66 runs, 22 min on 2 busy CPU cores
    python recipes/lr_free.py --presets pythia-tiny   # the quick look: 11 runs
    python recipes/lr_free.py --spike_factor 100 --seeds 0 --output_dir outputs/lr_free_spike100         # 10 min
    python recipes/lr_free.py --presets pythia-14m llama-14m --max_steps 300 --learning_rates 1e-3 3e-3 1e-2 \\
        --seeds 0 --output_dir outputs/lr_free_14m                                                       # 28 min
    python recipes/lr_free.py --presets llama-tiny --methods rho-set --rho_targets 0.25 4 --output_dir outputs/lr_free_llama_more_r
    python recipes/lr_free.py --replot     # tables, plot and summary again from outputs/lr_free/*.csv (same options)

Batch arithmetic of the default: 8 sequences x 128 tokens = 1,024 tokens per step, 200 steps =
205k tokens (~1.7 epochs of the 118k-token pydoc training split), evaluated on 64 x 128 held-out
tokens every 20 steps. Set mode probes every step (two fp32 forwards, about one more plain step on
CPU), so its wall time is reported next to the loss. Writes to ``--output_dir`` (default
``outputs/lr_free``): ``lr_free_runs.csv`` / ``.md`` (one row per run), ``lr_free_table.md`` / ``.csv``
(per preset and method: final eval loss mean, std over seeds (ddof=1) and min-max, training seconds
per run, steps probed), ``lr_free_curves.csv`` (eval loss against tokens, every run),
``lr_free.png`` (top: seed-mean eval loss against tokens; bottom: final loss against AdamW's
learning rate, the other methods as horizontal lines) and ``summary.json`` (per preset the best
AdamW and best rho-set, and the r* with the least mean loss relative to the tuned AdamW across
presets). W&B stays off unless ``--report_to wandb``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from common import DataArguments, load_data, write_json, write_table
from presets import MODEL_PRESETS, build_model, spiked
from transformers import HfArgumentParser, PrinterCallback, Trainer, TrainingArguments, default_data_collator

from hf_ghosts import RhoTrainer, RhoTrainingArguments
from hf_ghosts.plots import save_figure
from hf_ghosts.settings import DEFAULT_TARGETS

KINDS = ("adamw", "rho-set", "prodigy", "schedule-free", "adamw-default")
COLORS = {"adamw": "tab:red", "rho-set": "tab:blue", "prodigy": "tab:green", "schedule-free": "tab:purple",
          "adamw-default": "tab:gray"}
DEFAULT_TARGET = DEFAULT_TARGETS["set"]  # rho_target=None in set mode
TRAINER_DEFAULTS = {name: TrainingArguments.__dataclass_fields__[name].default
                    for name in ("learning_rate", "lr_scheduler_type", "max_grad_norm")}


@dataclass
class LrFreeArguments:
    """The comparison: presets, methods, their settings, steps, seeds, and an optional learning-rate spike."""

    output_dir: str = field(default="outputs/lr_free", metadata={"help": "Where the tables and the plot go."})
    presets: list[str] = field(
        default_factory=lambda: ["pythia-tiny", "llama-tiny"],
        metadata={"help": "Model presets (family and size).", "choices": list(MODEL_PRESETS)},
    )
    methods: list[str] = field(default_factory=lambda: list(KINDS), metadata={"help": "Methods.", "choices": list(KINDS)})
    learning_rates: list[float] = field(
        default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], metadata={"help": "AdamW's sweep (cosine, warm-up)."}
    )
    rho_targets: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0], metadata={"help": "Set mode's r* values (the default is added if missing)."}
    )
    rho_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW's lr under set mode (only its schedule matters)."})
    rho_radii: list[str] = field(default_factory=lambda: ["output", "attention"], metadata={"help": "Set mode's radii."})
    schedule_free_lr: float = field(default=2.5e-3, metadata={"help": "Schedule-free AdamW's lr (schedulefree's default)."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps per run."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step (of --block_size tokens)."})
    warmup_fraction: float = field(default=0.1, metadata={"help": "Warm-up steps as a fraction of --max_steps."})
    eval_points: int = field(default=10, metadata={"help": "Evaluations per run (the last at --max_steps)."})
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Seeds of initial weights and data order (docs/results.md's tables: 0 1 2)."},
    )
    spike_factor: float = field(default=1.0, metadata={"help": "Learning-rate multiplier from --spike_at on (1: none)."})
    spike_at: int | None = field(default=None, metadata={"help": "0-based optimizer step of the spike (default: mid-run)."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trainer's report_to (default: none)."})
    replot: bool = field(
        default=False,
        metadata={"help": "No training: rebuild the tables, the plot and the summary from <output_dir>/lr_free_runs.csv and "
                  "lr_free_curves.csv (give the run's other options)."},
    )

    def __post_init__(self) -> None:
        if self.spike_at is None:
            self.spike_at = self.max_steps // 2
        if not 1 <= self.spike_at < self.max_steps:  # step 0's rate is set when the schedule is built, before the spike
            raise ValueError(f"--spike_at must lie in [1, --max_steps); got {self.spike_at} and {self.max_steps}")
        if not (self.spike_factor > 0 and math.isfinite(self.spike_factor)):
            raise ValueError(f"--spike_factor must be a finite number > 0; got {self.spike_factor}")
        if not 0 <= self.warmup_fraction < 1 or not 1 <= self.eval_points <= self.max_steps:
            raise ValueError(f"need 0 <= --warmup_fraction < 1 and 1 <= --eval_points <= --max_steps; got "
                             f"{self.warmup_fraction}, {self.eval_points}")
        if not self.seeds:
            raise ValueError("--seeds: give at least one")
        if DEFAULT_TARGET not in self.rho_targets:
            self.rho_targets = sorted([*self.rho_targets, DEFAULT_TARGET])

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.max_steps)


def method_grid(spec: LrFreeArguments) -> list[dict[str, Any]]:
    """``[{"label", "kind", "value"}]``: one entry per AdamW rate, per r*, and per other method, in ``spec.methods`` order."""
    grid = []
    for kind in spec.methods:
        if kind == "adamw":
            grid += [{"label": f"adamw lr={lr:g}", "kind": kind, "value": lr} for lr in spec.learning_rates]
        elif kind == "rho-set":
            grid += [{"label": f"rho-set r*={r:g}" + (" (default)" if r == DEFAULT_TARGET else ""), "kind": kind, "value": r}
                     for r in spec.rho_targets]
        else:
            grid.append({"label": kind, "kind": kind, "value": math.nan})
    return grid


def training_arguments(spec: LrFreeArguments, method: dict[str, Any], seed: int, output_dir: str) -> TrainingArguments:
    """The run's arguments: shared data, steps and evaluation; the method's rate, schedule, clipping (and set mode's
    ``rho_*`` fields: ``RhoTrainingArguments`` for rho-set, plain ``TrainingArguments`` for the others)."""
    eval_steps = max(1, spec.max_steps // spec.eval_points)
    shared = dict(
        output_dir=output_dir, max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=16, eval_strategy="steps", eval_steps=eval_steps, logging_steps=eval_steps,
        logging_nan_inf_filter=False, save_strategy="no", report_to=spec.report_to, disable_tqdm=True, seed=seed,
        data_seed=seed, run_name=f"{method['label']} seed {seed}",
    )
    cosine = dict(lr_scheduler_type="cosine", warmup_steps=spec.warmup_steps, max_grad_norm=0.0)
    kind = method["kind"]
    if kind == "adamw":
        return TrainingArguments(**shared, **cosine, learning_rate=method["value"])
    if kind == "rho-set":
        return RhoTrainingArguments(**shared, **cosine, learning_rate=spec.rho_learning_rate, rho_mode="set",
                                    rho_target=method["value"], rho_radii=spec.rho_radii)
    if kind == "prodigy":
        return TrainingArguments(**shared, **cosine, learning_rate=1.0)
    if kind == "schedule-free":  # warm-up inside the optimizer (Trainer passes warmup_steps), constant schedule
        return TrainingArguments(**shared, optim="schedule_free_adamw", learning_rate=spec.schedule_free_lr,
                                 lr_scheduler_type="constant", warmup_steps=spec.warmup_steps, max_grad_norm=0.0)
    return TrainingArguments(**shared, **TRAINER_DEFAULTS)  # adamw-default


def spike_kwargs(spec: LrFreeArguments) -> dict[str, Any]:
    """The :func:`~presets.spiked` trainer's arguments: every method's own schedule, x ``spike_factor`` from
    optimizer step ``spike_at`` (0-based) to the end."""
    return dict(spike_start=spec.spike_at, spike_factor=spec.spike_factor, spike_how="multiply")


def run_one(spec: LrFreeArguments, preset: str, method: dict[str, Any], seed: int, data: dict[str, Any],
            scratch: str) -> dict[str, Any]:
    """Train one (preset, method, seed) from the seed's initial weights; evaluation loss every ``eval_steps``."""
    model = build_model(preset, vocab_size=data["vocab"], seed=seed)
    args = training_arguments(spec, method, seed, os.path.join(scratch, f"{preset}-{method['label']}-{seed}"))
    extra: dict[str, Any] = {}
    if method["kind"] == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise ImportError("lr_free.py --methods prodigy needs prodigyopt: pip install prodigyopt") from error
        extra["optimizer_cls_and_kwargs"] = (Prodigy, {"weight_decay": args.weight_decay})
    trainer_cls = spiked(RhoTrainer if method["kind"] == "rho-set" else Trainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
                          data_collator=default_data_collator, **spike_kwargs(spec), **extra)
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    history = trainer.state.log_history
    curve = [(h["step"], float(h["eval_loss"])) for h in history if "eval_loss" in h]
    if not curve or curve[-1][0] != spec.max_steps:
        curve.append((spec.max_steps, float(trainer.evaluate()["eval_loss"])))
    eval_seconds = sum(h["eval_runtime"] for h in history if "eval_runtime" in h)
    controller = getattr(trainer, "rho_controller", None)
    final = curve[-1][1]
    return {
        "preset": preset, "method": method["label"], "kind": method["kind"], "value": method["value"], "seed": seed,
        "final_eval_loss": final, "collapsed": not math.isfinite(final) or final > math.log(data["vocab"]),
        "train_seconds": round(seconds - eval_seconds, 2), "eval_seconds": round(eval_seconds, 2),
        "probed_steps": controller.probes if controller is not None else math.nan,
        "curve": [(step * data["tokens_per_step"], loss) for step, loss in curve],
    }


def spread(values: list[float]) -> dict[str, float]:
    """``mean``, ``std`` (ddof=1; 0 for one value), ``min`` and ``max`` of the seeds' final losses."""
    array = np.array(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max())}


def summarize(rows: list[dict[str, Any]], spec: LrFreeArguments) -> list[dict[str, Any]]:
    """One row per (preset, method): the final loss over seeds, seconds per run, probed steps per run."""
    table = []
    for preset in spec.presets:
        for method in method_grid(spec):
            mine = [r for r in rows if r["preset"] == preset and r["method"] == method["label"]]
            loss = spread([r["final_eval_loss"] for r in mine])
            table.append({
                "preset": preset, "method": method["label"], "kind": method["kind"], "value": method["value"],
                "seeds": len(mine), "loss_mean": loss["mean"], "loss_std": loss["std"], "loss_min": loss["min"],
                "loss_max": loss["max"], "collapsed_runs": sum(r["collapsed"] for r in mine),
                "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
                "probed_steps": float(np.mean([r["probed_steps"] for r in mine])),
            })
    return table


def table_markdown(table: list[dict[str, Any]], spec: LrFreeArguments) -> str:
    """Per preset: method, final eval loss ``mean ± std (min-max)``, seconds per run, probed steps; best AdamW and
    best non-sweep method in bold."""
    spike = f", lr x{spec.spike_factor:g} from step {spec.spike_at + 1}" if spec.spike_factor != 1.0 else ""
    parts = []
    for preset in spec.presets:
        mine = [row for row in table if row["preset"] == preset]
        sweep = [row for row in mine if row["kind"] == "adamw"]
        others = [row for row in mine if row["kind"] != "adamw"]
        best = {min(group, key=lambda row: _finite(row["loss_mean"]))["method"] for group in (sweep, others) if group}
        lines = [f"**{preset}**: final eval loss over {len(spec.seeds)} seed(s), mean ± std (ddof=1) (min-max); {spec.max_steps} "
                 f"steps of {spec.batch_size} x 128 tokens{spike}", "",
                 "| method | final eval loss | train s / run | probed steps |", "|---|---|---|---|"]
        for row in mine:
            cell = f"{row['loss_mean']:.3f} ± {row['loss_std']:.3f} ({row['loss_min']:.3f}-{row['loss_max']:.3f})"
            if row["collapsed_runs"]:
                cell += f", {row['collapsed_runs']} collapsed"
            probed = f"{row['probed_steps']:.0f} / {spec.max_steps}" if math.isfinite(row["probed_steps"]) else "-"
            name = f"**{row['method']}**" if row["method"] in best else row["method"]
            lines.append(f"| {name} | {cell} | {row['train_seconds']:.1f} | {probed} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def verdict(table: list[dict[str, Any]], spec: LrFreeArguments) -> dict[str, Any]:
    """Per preset the tuned AdamW (least mean loss over the sweep) and each r*'s gap to it; the recommended r* is the one
    with the least mean gap over the presets. ``beyond_spread``: its mean gap beats the default's by more than the mean
    over presets of the larger seed std of the two (else the data do not tell them apart; ``None`` with one seed)."""
    per_preset, gaps, stds = {}, {}, {}
    for preset in spec.presets:
        mine = [row for row in table if row["preset"] == preset]
        sweep = [row for row in mine if row["kind"] == "adamw"]
        tuned = min(sweep, key=lambda row: _finite(row["loss_mean"])) if sweep else None
        entry: dict[str, Any] = {"methods": {row["method"]: row["loss_mean"] for row in mine}}
        if tuned is not None:
            entry["tuned_adamw"] = {"lr": tuned["value"], "loss": tuned["loss_mean"]}
            for row in mine:
                if row["kind"] == "rho-set":
                    gap = row["loss_mean"] - tuned["loss_mean"]
                    gaps.setdefault(row["value"], []).append(gap)
                    stds.setdefault(row["value"], []).append(row["loss_std"])
                    entry.setdefault("rho_set_minus_tuned_adamw", {})[f"{row['value']:g}"] = gap
        per_preset[preset] = entry
    mean_gap = {r: float(np.mean(g)) for r, g in gaps.items()}
    recommended = min(mean_gap, key=lambda r: _finite(mean_gap[r])) if mean_gap else None
    beyond = None
    if recommended is not None and DEFAULT_TARGET in mean_gap and len(spec.seeds) > 1:  # one seed: no spread to judge by
        noise = float(np.mean(np.maximum(stds[recommended], stds[DEFAULT_TARGET])))
        beyond = bool(mean_gap[DEFAULT_TARGET] - mean_gap[recommended] > noise)
    return {"presets": per_preset, "rho_set_mean_gap": {f"{r:g}": g for r, g in mean_gap.items()},
            "recommended_r_target": recommended, "default_r_target": DEFAULT_TARGET, "beyond_spread": beyond}


def plot_lr_free(rows: list[dict[str, Any]], table: list[dict[str, Any]], spec: LrFreeArguments, path: str) -> str:
    """Top: seed-mean eval loss against tokens (the tuned AdamW, every r*, the other methods). Bottom: final loss against
    AdamW's learning rate (mean, min-max bar), the other methods as horizontal lines."""
    figure, axes = plt.subplots(2, len(spec.presets), figsize=(6 * len(spec.presets), 9), squeeze=False)
    targets = [r for r in spec.rho_targets]
    shades = {r: plt.cm.Blues(0.45 + 0.5 * i / max(1, len(targets) - 1)) for i, r in enumerate(targets)}
    styles = {"rho-set": "-", "prodigy": "--", "schedule-free": "-.", "adamw-default": ":"}
    finite = [r["final_eval_loss"] for r in rows if math.isfinite(r["final_eval_loss"])]
    ceiling = max(finite, default=10.0) * 1.2
    for column, preset in enumerate(spec.presets):
        top, bottom = axes[0, column], axes[1, column]
        mine = [row for row in table if row["preset"] == preset]
        sweep = [row for row in mine if row["kind"] == "adamw"]
        shown = [row for row in mine if row["kind"] != "adamw"]
        if sweep:
            shown.insert(0, min(sweep, key=lambda row: _finite(row["loss_mean"])))
        for row in shown:
            runs = [r for r in rows if r["preset"] == preset and r["method"] == row["method"]]
            tokens = [t for t, _ in runs[0]["curve"]]
            curves = np.array([[loss for _, loss in r["curve"]] for r in runs], dtype=float)
            color = shades[row["value"]] if row["kind"] == "rho-set" else COLORS[row["kind"]]
            label = f"{row['method']} (best of the sweep)" if row["kind"] == "adamw" else row["method"]
            top.plot(tokens, np.minimum(curves.mean(0), ceiling), color=color, ls=styles.get(row["kind"], "-"), lw=1.6,
                     label=label)
            if row["kind"] != "adamw":
                bottom.axhline(min(row["loss_mean"], ceiling), color=color, ls=styles[row["kind"]], lw=1.3, label=row["method"])
        if sweep:
            lrs = np.array([row["value"] for row in sweep])
            means = np.minimum([row["loss_mean"] for row in sweep], ceiling)
            low = means - np.minimum([row["loss_min"] for row in sweep], ceiling)
            high = np.minimum([row["loss_max"] for row in sweep], ceiling) - means
            bottom.errorbar(lrs, means, yerr=[low, high], color=COLORS["adamw"], marker="o", capsize=3,
                            label="AdamW (cosine) sweep, min-max over seeds")
            bottom.set_xscale("log")
        spike = f", lr x{spec.spike_factor:g} from step {spec.spike_at + 1}" if spec.spike_factor != 1.0 else ""
        seeds = f"mean of {len(spec.seeds)} seeds" if len(spec.seeds) > 1 else f"seed {spec.seeds[0]}"
        top.set_title(f"{preset}: eval loss ({seeds}){spike}")
        top.set_xlabel("training tokens")
        top.set_ylabel("eval loss")
        bottom.set_title(f"{preset}: final eval loss after {spec.max_steps} steps")
        bottom.set_xlabel("AdamW peak learning rate")
        bottom.set_ylabel("final eval loss (seed mean)")
        for axis in (top, bottom):
            if spec.spike_factor != 1.0:
                axis.set_yscale("log")  # collapsed runs end far above the others
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (preset, method, seed); write the tables, the curves, the plot and the summary; return the summary."""
    spec, data_args = HfArgumentParser((LrFreeArguments, DataArguments)).parse_args_into_dataclasses(args=argv)
    os.makedirs(spec.output_dir, exist_ok=True)
    if spec.replot:
        rows = read_runs(spec)
        previous = os.path.join(spec.output_dir, "summary.json")
        wall = json.load(open(previous)).get("wall_seconds") if os.path.exists(previous) else None
        return report(rows, spec, wall)
    rows, started = train_all(spec, data_args), time.perf_counter()
    return report(rows, spec, time.perf_counter() - started)


def train_all(spec: LrFreeArguments, data_args: DataArguments) -> list[dict[str, Any]]:
    """Every (preset, seed, method) run's row, in that order."""
    tokenizer, train, evaluation = load_data(data_args)
    # 8 sequences x 128 tokens = 1,024 tokens per optimizer step by default
    data = {"train": train, "eval": evaluation, "vocab": len(tokenizer),
            "tokens_per_step": spec.batch_size * data_args.block_size}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for preset in spec.presets:
            for seed in spec.seeds:
                for method in method_grid(spec):
                    row = run_one(spec, preset, method, seed, data, scratch)
                    rows.append(row)
                    print(f"{preset:>12} seed {seed} {row['method']:>26}: eval loss {row['final_eval_loss']:8.4f}"
                          f"{'  COLLAPSED' if row['collapsed'] else ''} ({row['train_seconds']:.1f} s train, "
                          f"{row['eval_seconds']:.1f} s eval)", flush=True)
    return rows


def read_runs(spec: LrFreeArguments) -> list[dict[str, Any]]:
    """The rows :func:`train_all` returned, read back from ``lr_free_runs.csv`` and ``lr_free_curves.csv``."""
    methods = {method["label"]: method for method in method_grid(spec)}
    with open(os.path.join(spec.output_dir, "lr_free_curves.csv")) as handle:
        curves = list(csv.DictReader(handle))
    with open(os.path.join(spec.output_dir, "lr_free_runs.csv")) as handle:
        rows = [{**row, "seed": int(row["seed"]), "collapsed": row["collapsed"] == "True",
                 **{key: float(row[key]) for key in ("final_eval_loss", "train_seconds", "eval_seconds", "probed_steps")}}
                for row in csv.DictReader(handle)]
    for row in rows:
        row.update(kind=methods[row["method"]]["kind"], value=methods[row["method"]]["value"])
        row["curve"] = [(int(c["tokens"]), float(c["eval_loss"])) for c in curves
                        if (c["preset"], c["method"], int(c["seed"])) == (row["preset"], row["method"], row["seed"])]
    return rows


def report(rows: list[dict[str, Any]], spec: LrFreeArguments, wall_seconds: float | None) -> dict[str, Any]:
    """Write the run and curve tables, the per-method table, the plot and the summary; print the table; return the summary."""
    columns = ["preset", "method", "seed", "final_eval_loss", "collapsed", "train_seconds", "eval_seconds", "probed_steps"]
    write_table(rows, os.path.join(spec.output_dir, "lr_free_runs"), columns)
    curves = [{"preset": r["preset"], "method": r["method"], "seed": r["seed"], "tokens": t, "eval_loss": loss}
              for r in rows for t, loss in r["curve"]]
    write_table(curves, os.path.join(spec.output_dir, "lr_free_curves"))
    table = summarize(rows, spec)
    write_table(table, os.path.join(spec.output_dir, "lr_free_table"))
    markdown = table_markdown(table, spec)
    with open(os.path.join(spec.output_dir, "lr_free_table.md"), "w") as handle:
        handle.write(markdown)
    plot_lr_free(rows, table, spec, os.path.join(spec.output_dir, "lr_free.png"))
    summary = {**verdict(table, spec), "settings": dataclasses.asdict(spec), "wall_seconds": wall_seconds, "runs": len(rows)}
    write_json(os.path.join(spec.output_dir, "summary.json"), summary)
    print("\n" + markdown)
    print(f"recommended r* (least mean gap to the tuned AdamW over {', '.join(spec.presets)}): "
          f"{summary['recommended_r_target']} (beyond the seed spread: {summary['beyond_spread']}); default {DEFAULT_TARGET}")
    print(f"wrote {spec.output_dir}/: lr_free_table.md/.csv, lr_free_runs.csv/.md, lr_free_curves.csv, lr_free.png, "
          "summary.json")
    return summary


if __name__ == "__main__":
    main()
