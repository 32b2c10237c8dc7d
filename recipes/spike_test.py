"""Learning-rate spike test on language models (the paper's Table 1): who survives a sudden x10 ... x10,000?

At optimizer step ``--spike_step`` the learning rate is multiplied by a factor and held there
to the end. Every method sees the same data order, the same initial weights and the same
schedule: plain AdamW, AdamW with gradient-norm clipping (``max_grad_norm``), and ``RhoTrainer``
(AdamW proposes, the controller clips the step to ``r = |u| / rho <= 1``) by default; on request
(``--methods``) the peers users reach for instead, from their real packages at their published
defaults (``recipes/peers.py``): ``zclip`` (ZClip's adaptive clipping at ``on_pre_optimizer_step``)
and ``skip-step`` (OLMo-core's ``SkipStepAdamW``, fed the step's loss and gradient norm). They need
the ``[peers]`` extra, ``pip install -e ".[peers]"``; without it asking for them is an ImportError
with that line. ``skip-step``'s rule starts once it has 64 losses: at the default 60 steps it never
acts. Each runs on every preset in ``--presets`` (default a Pythia-style GPT-NeoX and a Llama) and
every factor (factor 1 is the no-spike reference). A run "collapsed" when its final evaluation loss is not
finite or worse than ``ln(vocabulary)``, the loss of a uniform guess.

    python recipes/spike_test.py                          # 2 presets x 3 methods x 5 factors, CPU
    python recipes/spike_test.py --presets pythia-14m --factors 1 100 10000 --max_steps 200 --spike_step 100
    python recipes/spike_test.py --rho_radii output attention ffn
    python recipes/spike_test.py --methods rho --rho_radius topk_exact --rho_target 2
    python recipes/spike_test.py --presets pythia-tiny llama-tiny qwen3-tiny --methods adamw rho rho-blocks  # issue 30
    python recipes/spike_test.py --presets pythia-tiny llama-tiny qwen3-tiny \
        --methods adamw adamw+clip rho zclip skip-step                # with the peers (pip install -e ".[peers]")

Batch arithmetic of the default: 4 sequences x 128 tokens = 512 tokens per step, 60 steps, spike
at step 30; 30 runs. Writes to ``--output_dir`` (default ``outputs/spike_test``): ``spike_runs.csv``
and ``.md`` (one row per run; ``zclip``: the fraction of steps ZClip clipped, ``skip-step``: the steps
skipped), ``spike_table.md`` (final eval loss and token accuracy, method x
factor, per preset) and ``spike_test.png`` (final loss against the factor; training loss
around the spike at the largest factor).

With the peers, ``--presets pythia-tiny llama-tiny qwen3-tiny --methods adamw adamw+clip rho zclip skip-step``
(75 runs) took 6 min 5 s on one thread on the shared 2 cores; the same with ``--max_steps 160 --spike_step 100``
(where skip-step's rule acts after the spike) 16 min 23 s.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from common import (
    DataArguments,
    argmax_logits,
    load_data,
    token_accuracy,
    write_table,
)
from peers import METHODS as PEER_METHODS
from peers import peer_summary, require, wire
from presets import MODEL_PRESETS, build_model, spiked
from transformers import HfArgumentParser, PrinterCallback, Trainer, default_data_collator

from hf_ghosts import RhoTrainer, RhoTrainingArguments
from hf_ghosts.plots import save_figure
from hf_ghosts.settings import DEFAULT_RADIUS, default_target

METHODS = {
    "adamw": "plain AdamW",
    "adamw+clip": "AdamW + max_grad_norm",
    "rho": "RhoTrainer (clip, global)",  # rho_granularity="global": one scale (the default before issue 30)
    "rho-blocks": "RhoTrainer (clip, block-wise)",  # rho_granularity="blocks": the default
    **PEER_METHODS,  # zclip, skip-step: on request (the [peers] extra)
}
DEFAULT_METHODS = ["adamw", "adamw+clip", "rho", "rho-blocks"]
METHOD_COLORS = {"adamw": "tab:red", "adamw+clip": "tab:orange", "rho": "tab:blue", "zclip": "tab:green",
                 "skip-step": "tab:purple", "rho-blocks": "tab:gray"}
RHO_METHODS = ("rho", "rho-blocks")  # RhoTrainer; each names its rho_granularity, whatever the default


@dataclass
class SpikeArguments:
    """The experiment: which models, methods and spike factors, and the training schedule."""

    output_dir: str = field(default="outputs/spike_test", metadata={"help": "Where the tables and the plot go."})
    presets: list[str] = field(
        default_factory=lambda: ["pythia-tiny", "llama-tiny"],
        metadata={"help": "Model presets (architectures) to test.", "choices": list(MODEL_PRESETS)},
    )
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               metadata={"help": "Methods (zclip and skip-step need the [peers] extra).", "choices": list(METHODS)})
    factors: list[float] = field(
        default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 10000.0],
        metadata={"help": "Learning-rate multipliers applied from --spike_step on (1 = no spike)."},
    )
    spike_step: int = field(default=30, metadata={"help": "Optimizer steps at the base rate before the spike."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps per run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Base AdamW learning rate (constant before the spike)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per step (of --block_size tokens)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm bound of the 'adamw+clip' method."})
    rho_target: float | None = field(default=None, metadata={"help": "RhoTrainer's target r* (None: clip's default)."})
    rho_radii: list[str] = field(default_factory=lambda: ["output", "attention"], metadata={"help": "RhoTrainer's radii."})
    rho_radius: str = field(default=DEFAULT_RADIUS, metadata={"help": "RhoTrainer's output radius: 'bound' or 'topk_exact'."})
    rho_rescale_moments: bool = field(default=False, metadata={"help": "RhoTrainer scales AdamW's first moment with the step."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights and of the data order (all runs)."})
    save_steps: int = field(
        default=0,
        metadata={
            "help": "Save a Trainer checkpoint every N optimizer steps under <output_dir>/checkpoints/<preset>-<method>-"
            "<factor>/ (0: none), e.g. to ask `hf-ghosts diagnose` about the step before and after the spike."
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.spike_step < self.max_steps:
            raise ValueError(f"--spike_step must lie in [0, --max_steps); got {self.spike_step} and {self.max_steps}")
        if self.save_steps < 0:
            raise ValueError(f"--save_steps must be >= 0 (0: no checkpoints); got {self.save_steps}")
        if any(not (factor > 0 and math.isfinite(factor)) for factor in self.factors):
            raise ValueError(f"--factors must be finite numbers > 0; got {self.factors}")
        require(self.methods)  # the peers' packages, now rather than mid-run


def method_label(method: str, spec: SpikeArguments) -> str:
    """``METHODS[method]``, and for ``"rho"`` / ``"rho-blocks"`` its settings: ``RhoTrainer (clip, r* = 2, bound, global)``."""
    if method not in RHO_METHODS:
        return METHODS[method]
    moments = ", moments rescaled" if spec.rho_rescale_moments else ""
    blocks = ", block-wise" if method == "rho-blocks" else ", global"
    target = default_target("clip") if spec.rho_target is None else spec.rho_target
    return f"RhoTrainer (clip, r* = {target:g}, {spec.rho_radius}{moments}{blocks})"


def run_one(spec: SpikeArguments, preset: str, method: str, factor: float, data: dict[str, Any], scratch: str) -> dict[str, Any]:
    """Train one (preset, method, factor) from the shared initial weights; evaluate at the end."""
    model = build_model(preset, vocab_size=data["vocab"], seed=spec.seed)
    run_name = f"{preset}-{method}-{factor:g}"
    kept = os.path.join(spec.output_dir, "checkpoints", run_name)  # only with --save_steps
    args = RhoTrainingArguments(
        output_dir=kept if spec.save_steps else os.path.join(scratch, run_name),
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=16,
        max_grad_norm=spec.max_grad_norm if method == "adamw+clip" else 0.0,
        logging_steps=1,
        logging_nan_inf_filter=False,  # show a diverging loss as it is
        save_strategy="steps" if spec.save_steps else "no",
        save_steps=spec.save_steps or 500,
        report_to=[],
        disable_tqdm=True,
        seed=spec.seed,
        rho_mode="clip",
        rho_target=spec.rho_target,
        rho_radii=spec.rho_radii,
        rho_radius=spec.rho_radius,
        rho_rescale_moments=spec.rho_rescale_moments,
        rho_granularity="blocks" if method == "rho-blocks" else "global",
    )
    trainer_cls, callbacks = wire(method, RhoTrainer if method in RHO_METHODS else Trainer)
    trainer = spiked(trainer_cls)(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=default_data_collator,
        compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
        # a constant rate, x factor from optimizer step spike_step (0-based) on: steps 1..spike_step (1-based) at the base rate
        spike_start=spec.spike_step,
        spike_factor=factor,
        spike_how="replace",
        processing_class=data["tokenizer"] if spec.save_steps else None,  # checkpoints carry their tokenizer
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - started
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    after = [loss for step, loss in losses if step > spec.spike_step]
    final = float(metrics["eval_loss"])
    row = {
        "preset": preset,
        "method": method,
        "factor": factor,
        "final_eval_loss": final,
        "eval_accuracy": float(metrics["eval_accuracy"]),
        "collapsed": not math.isfinite(final) or final > math.log(data["vocab"]),
        "loss_before_spike": next((loss for step, loss in losses if step == spec.spike_step), math.nan),
        "max_loss_after_spike": max(after) if after else math.nan,
        "seconds": round(seconds, 2),
        "losses": losses,
    }
    if method in RHO_METHODS:
        probed = [h for h in trainer.state.log_history if "ghosts/clipped" in h]
        row["clipped_fraction"] = float(np.mean([h["ghosts/clipped"] for h in probed])) if probed else math.nan
        row["max_r_proposed"] = max((h["ghosts/r"] for h in trainer.state.log_history if "ghosts/r" in h), default=math.nan)
    row.update(peer_summary(trainer))
    return row


def pivot_markdown(rows: list[dict[str, Any]], spec: SpikeArguments) -> str:
    """Per preset, a method x factor table of ``final eval loss / token accuracy`` (collapsed runs marked)."""
    parts = []
    for preset in spec.presets:
        header = "| method | " + " | ".join(f"x{factor:g}" for factor in spec.factors) + " |"
        lines = [f"**{preset}**: final eval loss / token accuracy (spike at step {spec.spike_step} of {spec.max_steps}; "
                 "collapsed runs in bold)", "", header, "|---|" + "---|" * len(spec.factors)]
        for method in spec.methods:
            cells = []
            for factor in spec.factors:
                row = next(r for r in rows if (r["preset"], r["method"], r["factor"]) == (preset, method, factor))
                cell = f"{row['final_eval_loss']:.3f} / {row['eval_accuracy']:.3f}"
                cells.append(f"**{cell}**" if row["collapsed"] else cell)
            lines.append(f"| {method_label(method, spec)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_spike(rows: list[dict[str, Any]], spec: SpikeArguments, vocab: int, path: str) -> str:
    """Top: final eval loss against the factor. Bottom: training loss at the largest factor. Log scales; NaN drawn as x on top."""
    figure, axes = plt.subplots(2, len(spec.presets), figsize=(5.5 * len(spec.presets), 7.5), squeeze=False)
    finite = [r["final_eval_loss"] for r in rows if math.isfinite(r["final_eval_loss"])]
    finite += [loss for r in rows for _, loss in r["losses"] if math.isfinite(loss)]
    ceiling = 2 * max(finite, default=10 * math.log(vocab))  # where a NaN / inf is drawn
    largest = max(spec.factors)
    styles = {"adamw": dict(lw=2.5, ls="-"), "adamw+clip": dict(lw=1.5, ls="--"), "rho": dict(lw=1.5, ls="-"),
              "zclip": dict(lw=1.5, ls="-."), "skip-step": dict(lw=1.5, ls=":"), "rho-blocks": dict(lw=1.5, ls="--")}
    for column, preset in enumerate(spec.presets):
        top, bottom = axes[0, column], axes[1, column]
        for method in spec.methods:
            mine = sorted((r for r in rows if r["preset"] == preset and r["method"] == method), key=lambda r: r["factor"])
            factors = np.array([r["factor"] for r in mine])
            losses = np.array([r["final_eval_loss"] for r in mine])
            bad = ~np.isfinite(losses)
            style = dict(color=METHOD_COLORS[method], **styles[method])
            top.plot(factors, np.where(bad, ceiling, losses), marker="o", label=method_label(method, spec), **style)
            top.plot(factors[bad], np.full(bad.sum(), ceiling), "x", color=METHOD_COLORS[method], ms=11, mew=2)
            run = next(r for r in mine if r["factor"] == largest)
            curve = np.array([loss for _, loss in run["losses"]], dtype=float)
            bottom.plot([step for step, _ in run["losses"]], np.where(np.isfinite(curve), curve, ceiling),
                        label=method_label(method, spec), **style)
        for axis in (top, bottom):
            axis.axhline(math.log(vocab), color="gray", ls=":", lw=1, label=f"ln V = {math.log(vocab):.2f} (uniform guess)")
            axis.set_yscale("log")
        top.set_xscale("log")
        top.set_xlabel("learning-rate factor after the spike")
        top.set_ylabel("final eval loss (x: NaN/inf)")
        top.set_title(f"{preset}: lr x factor from step {spec.spike_step + 1} of {spec.max_steps}")
        top.legend(fontsize=7)
        bottom.axvline(spec.spike_step + 0.5, color="black", ls=":", lw=1)
        bottom.set_xlabel("optimizer step")
        bottom.set_ylabel("training loss")
        bottom.set_title(f"{preset}: training loss at lr x{largest:g}")
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every (preset, method, factor); write the tables and the plot; return the rows."""
    spec, data_args = HfArgumentParser((SpikeArguments, DataArguments)).parse_args_into_dataclasses(args=argv)
    os.makedirs(spec.output_dir, exist_ok=True)
    tokenizer, train, evaluation = load_data(data_args)
    data = {"train": train, "eval": evaluation, "vocab": len(tokenizer), "tokenizer": tokenizer}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for preset in spec.presets:
            for factor in spec.factors:
                for method in spec.methods:
                    row = run_one(spec, preset, method, factor, data, scratch)
                    rows.append(row)
                    print(f"{preset:>12} x{factor:<7g} {method:>10}: eval loss {row['final_eval_loss']:8.4f}, accuracy "
                          f"{row['eval_accuracy']:.3f}{'  COLLAPSED' if row['collapsed'] else ''} ({row['seconds']:.0f} s)")
    columns = ["preset", "method", "factor", "final_eval_loss", "eval_accuracy", "collapsed", "loss_before_spike",
               "max_loss_after_spike", "clipped_fraction", "max_r_proposed", "seconds"]
    if any("skipped_steps" in row for row in rows):  # a skip-step run: one more column (other runs' files unchanged)
        columns.insert(-1, "skipped_steps")
    write_table(rows, os.path.join(spec.output_dir, "spike_runs"), columns)
    table = pivot_markdown(rows, spec)
    with open(os.path.join(spec.output_dir, "spike_table.md"), "w") as handle:
        handle.write(table)
    plot_spike(rows, spec, data["vocab"], os.path.join(spec.output_dir, "spike_test.png"))
    print("\n" + table)
    print(f"wrote {spec.output_dir}/: spike_table.md, spike_runs.csv, spike_runs.md, spike_test.png")
    return rows


if __name__ == "__main__":
    main()
