"""Phase transition at r ~ 1 (the paper's Fig. 7/8): single steps of length r * rho along fixed directions.

A model is trained briefly (``--train_steps`` AdamW steps, or ``--model_name_or_path`` loads
one, e.g. the output of ``pythia_finetune.py``). On one evaluation batch, for the descent
direction ``-grad`` and ``--random_directions`` Gaussian directions ``v`` (unit length), it
measures the radius ``rho`` along ``v`` with :class:`hf_ghosts.RadiusProbe` (``--radii``, the
binding one is used) and takes single steps ``theta + r rho v`` for ``r`` from ``--r_min`` to
``--r_max``: the loss ratio ``L(theta + r rho v) / L(theta)`` and the fraction of next-token
predictions (argmax) that flip.

It also measures how far the true nearest singularity of the output softmax lies beyond the
bound ``pi / Delta``: :func:`hf_ghosts.radii.exact_radius` on the ``--exact_tokens``
highest-spread tokens (it costs ``O(vocabulary x radius)`` per token, hence a few dozen). Any
other token has ``Delta`` no larger than theirs, so its exact radius is at least ``pi / Delta`` of
the next token down: the batch's exact radius lies between that (or the smallest exact radius
found, if lower: then it is "certified" exact) and the smallest exact radius found.

    python recipes/phase_transition.py                       # ~2 min on 2 idle CPU cores
    python recipes/phase_transition.py --model_name_or_path outputs/pythia_finetune --train_steps 0
    python recipes/phase_transition.py --preset llama-tiny --random_directions 8 --r_points 41
    python recipes/phase_transition.py --radius topk_exact --output_dir outputs/phase_transition_topk   # r in the tighter units

Writes to ``--output_dir`` (default ``outputs/phase_transition``): ``phase_transition.png``
(loss ratio and flipped fraction against r; dotted lines at each direction's exact radius in
units of rho), ``phase_curves.csv`` (every step), ``phase_directions.csv`` / ``.md`` (per
direction: radii, exact vs bound, and where things turn: ``r_descent_ends``, the first r at
which a loss that had dropped is back at its start (the -grad direction); ``r_loss_x1.1``, where
the loss is 10% up; ``r_flip_50pct``, where half the predictions have flipped) and ``summary.json``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from common import load_model, parse_and_load, probe_batch, unit_directions, write_json, write_table
from torch.func import functional_call
from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

from hf_ghosts import RadiusProbe
from hf_ghosts.plots import save_figure
from hf_ghosts.radii import check_radius, exact_radius, spread, topk_exact_radius
from hf_ghosts.settings import DEFAULT_RADIUS, DEFAULT_TOPK, RADIUS_KINDS


@dataclass
class PhaseArguments:
    """The sweep: how long to train first, which directions, which step lengths."""

    output_dir: str = field(default="outputs/phase_transition", metadata={"help": "Where the plot and tables go."})
    train_steps: int = field(default=150, metadata={"help": "AdamW steps before the sweep (0: use the model as loaded)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the brief training."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per training step."})
    probe_blocks: int = field(default=16, metadata={"help": "Evaluation blocks in the batch that is measured and stepped on."})
    random_directions: int = field(default=4, metadata={"help": "Gaussian directions besides -grad."})
    radii: list[str] = field(default_factory=lambda: ["output", "attention"], metadata={"help": "Radii measured; r is in units of their minimum."})
    radius: str = field(
        default=DEFAULT_RADIUS,
        metadata={"help": "The output radius r is measured in: 'bound' (pi / max Delta) or 'topk_exact' (certified exact "
                  "radii of the --topk widest tokens, capped by pi / Delta of the next).", "choices": list(RADIUS_KINDS)},
    )
    topk: int = field(default=DEFAULT_TOPK, metadata={"help": "Tokens given an exact radius with --radius topk_exact."})
    r_min: float = field(default=0.1, metadata={"help": "Smallest normalized step."})
    r_max: float = field(default=10.0, metadata={"help": "Largest normalized step."})
    r_points: int = field(default=21, metadata={"help": "Steps, log-spaced from r_min to r_max."})
    exact_tokens: int = field(default=32, metadata={"help": "Highest-spread tokens whose exact radius is computed."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the data order and the random directions."})

    def __post_init__(self) -> None:
        if not 0 < self.r_min < self.r_max or self.r_points < 2:
            raise ValueError(f"need 0 < r_min < r_max and r_points >= 2; got {self.r_min}, {self.r_max}, {self.r_points}")


def brief_training(model: torch.nn.Module, spec: PhaseArguments, train: Any, scratch: str) -> None:
    """``spec.train_steps`` steps of AdamW (cosine schedule, 10% warm-up), in place."""
    args = TrainingArguments(
        output_dir=scratch,
        max_steps=spec.train_steps,
        learning_rate=spec.learning_rate,
        warmup_steps=max(1, spec.train_steps // 10),
        lr_scheduler_type="cosine",
        per_device_train_batch_size=spec.batch_size,
        logging_steps=max(1, spec.train_steps // 5),
        save_strategy="no",
        report_to=[],
        seed=spec.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def step_outcome(model: torch.nn.Module, batch: dict[str, torch.Tensor], unit: dict[str, torch.Tensor], length: float):
    """Loss and next-token predictions at ``theta + length * v`` (the model itself is not changed)."""
    weights = {name: p.detach() + length * unit[name] for name, p in model.named_parameters() if name in unit}
    output = functional_call(model, weights, args=(), kwargs={**_inputs(batch), "labels": batch["labels"]}, strict=False)
    return float(output.loss), output.logits[:, :-1].argmax(-1)


def exact_vs_bound(logits: torch.Tensor, slopes: torch.Tensor, valid: torch.Tensor, tokens: int) -> dict[str, Any]:
    """Exact radius of the ``tokens`` highest-spread positions against their bound ``pi / Delta``."""
    per_token = spread(slopes)[valid]
    flat_logits, flat_slopes = logits[valid], slopes[valid]
    order = per_token.argsort(descending=True)
    top = order[:tokens]
    exact = exact_radius(flat_logits[top].double(), flat_slopes[top].double()).float()
    bound = math.pi / per_token[top]
    ratio = exact / bound
    next_bound = math.pi / float(per_token[order[tokens]]) if order.numel() > tokens else math.inf
    batch_exact = float(exact.min())
    # min(certified exact radii of the `tokens` widest, pi / Delta of the next): every class kept exactly (no bins)
    lower = topk_exact_radius(logits.double(), slopes.double(), tokens, valid, exact_classes=logits.shape[-1])
    return {
        "rho_bound": float(bound.min()),  # pi / max Delta over the batch (eq. 14)
        "rho_exact": batch_exact,  # nearest zero over the top tokens: the batch's exact radius is at most this ...
        "rho_exact_lower": float(lower),  # ... and at least this (every other token's bound)
        "exact_over_bound": batch_exact / float(bound.min()),
        "token_ratio_min": float(ratio.min()),
        "token_ratio_median": float(ratio.median()),
        "token_ratio_max": float(ratio.max()),
        "certified": batch_exact <= next_bound,
    }


def first_crossing(r_values: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """Smallest grid ``r`` at which ``values`` reaches ``threshold`` (NaN if never)."""
    hits = np.nonzero(values >= threshold)[0]
    return float(r_values[hits[0]]) if hits.size else math.nan


def descent_ends(r_values: np.ndarray, ratios: np.ndarray) -> float:
    """First grid ``r`` at which a loss that had dropped (ratio < 1) is back at or above its start (NaN if never)."""
    below = np.nonzero(ratios < 1.0)[0]
    if not below.size:
        return math.nan
    return first_crossing(r_values[below[0]:], ratios[below[0]:], 1.0)


def plot_phase(curves: list[dict[str, Any]], rows: list[dict[str, Any]], path: str, title: str) -> str:
    """Loss ratio (log) and flipped fraction against r (log); r = 1 and each direction's exact radius marked."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, row in enumerate(rows):
        mine = [c for c in curves if c["direction"] == row["direction"]]
        r_values = [c["r"] for c in mine]
        color = "black" if row["direction"] == "-grad" else palette[index % len(palette)]
        width = 2.2 if row["direction"] == "-grad" else 1.2
        left.plot(r_values, [c["loss_ratio"] for c in mine], color=color, lw=width, label=row["direction"])
        right.plot(r_values, [c["flipped"] for c in mine], color=color, lw=width, label=row["direction"])
        for axis in (left, right):
            axis.axvline(row["r_exact"], color=color, ls=":", lw=1)
    for axis in (left, right):
        axis.axvline(1.0, color="gray", ls="--", lw=1)
        axis.set_xscale("log")
        axis.set_xlabel("r = step length / rho   (dashed: r = 1; dotted: exact output radius)")
    left.axhline(1.0, color="lightgray", lw=1)
    left.set_yscale("log")
    left.set_ylabel("loss ratio L(theta + r rho v) / L(theta)")
    right.set_ylabel("fraction of next-token predictions flipped")
    left.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train briefly, sweep r along each direction, write the plot, the tables and the summary."""
    spec, model_args, tokenizer, train, evaluation = parse_and_load(PhaseArguments, argv)
    model = load_model(model_args, len(tokenizer), spec.seed)
    if spec.train_steps > 0:
        with tempfile.TemporaryDirectory() as scratch:
            brief_training(model, spec, train, scratch)
    model.eval()
    batch, valid = probe_batch(evaluation, spec.probe_blocks)  # valid: position t predicts label t + 1

    probe = RadiusProbe(model, radii=spec.radii, radius=spec.radius, topk=spec.topk)
    base_loss, base_predictions = step_outcome(model, batch, {}, 0.0)
    r_values = np.geomspace(spec.r_min, spec.r_max, spec.r_points)
    rows, curves = [], []
    for name, unit in unit_directions(model, batch, spec.random_directions, spec.seed, descent=True).items():
        report = probe.measure(batch, unit)
        radii = {key: float(value) for key, value in report.radii().items()}
        rho = check_radius(float(report.rho), "phase_transition")
        logits, slopes = probe.logit_slopes(batch, unit)  # full logits z and a = J v: one forward-mode JVP
        exact = exact_vs_bound(logits, slopes, valid, spec.exact_tokens)
        losses, flipped = [], []
        for r in r_values:
            loss, predictions = step_outcome(model, batch, unit, float(r) * rho)
            losses.append(loss / base_loss)
            flipped.append(float((predictions != base_predictions)[valid[:, :-1]].float().mean()))
            curves.append({"direction": name, "r": float(r), "step_length": float(r) * rho, "loss_ratio": losses[-1],
                           "flipped": flipped[-1]})
        rows.append({
            "direction": name,
            **{f"rho_{key}": value for key, value in radii.items()},
            "bottleneck": report.bottleneck,
            "rho": rho,
            **exact,
            "r_exact": exact["rho_exact"] / rho,  # where the output softmax's nearest ghost really is, in units of rho
            "r_descent_ends": descent_ends(r_values, np.array(losses)),
            "r_loss_x1.1": first_crossing(r_values, np.array(losses), 1.1),
            "r_flip_50pct": first_crossing(r_values, np.array(flipped), 0.5),
            "loss_ratio_at_r1": float(np.interp(0.0, np.log(r_values), np.array(losses))),
            "flipped_at_r1": float(np.interp(0.0, np.log(r_values), np.array(flipped))),
        })
        print(f"{name:>9}: rho={rho:.4g} ({report.bottleneck}), output bound {exact['rho_bound']:.4g}, exact "
              f"{exact['rho_exact']:.4g} (x{exact['exact_over_bound']:.2f}{', certified' if exact['certified'] else ''}); "
              f"descent ends at r={rows[-1]['r_descent_ends']:.3g}, loss x1.1 at r={rows[-1]['r_loss_x1.1']:.3g}, "
              f"50% flipped at r={rows[-1]['r_flip_50pct']:.3g}")

    columns = list(rows[0].keys())
    table = write_table(rows, os.path.join(spec.output_dir, "phase_directions"), columns)
    write_table(curves, os.path.join(spec.output_dir, "phase_curves"))
    title = (f"{model_args.model_name_or_path or model_args.preset} after {spec.train_steps} steps: "
             f"{len(batch['input_ids'])} x {batch['input_ids'].shape[1]} tokens, loss {base_loss:.3f}, rho: {spec.radius}")
    figure = plot_phase(curves, rows, os.path.join(spec.output_dir, "phase_transition.png"), title)
    summary = {"model": model_args.model_name_or_path or model_args.preset, "train_steps": spec.train_steps,
               "base_loss": base_loss, "radii": spec.radii, "directions": rows, "figure": figure}
    write_json(os.path.join(spec.output_dir, "summary.json"), summary)
    print("\n" + table)
    print(f"wrote {spec.output_dir}/: phase_transition.png, phase_directions.csv/.md, phase_curves.csv, summary.json")
    return summary


if __name__ == "__main__":
    main()
