"""Temperature (the paper's Fig. 9 on language models): does the collapse onset move with T in step units, in r units?

    python recipes/temperature.py                                   # pythia-tiny, ~2.5 min on 2 CPU cores
    python recipes/temperature.py --preset pythia-14m --output_dir outputs/temperature_14m   # 11 CPU-min
    python recipes/temperature.py --temperatures 0.1 0.3 1 3 10 --threshold 1.5 --random_directions 2
    python recipes/temperature.py --train_at_temperature --train_steps 100   # one model trained at each T (5x the training)

A model is trained briefly at temperature 1 (``--train_steps`` AdamW steps, as
``phase_transition.py`` does; ``--model_name_or_path`` loads one instead; with
``--train_at_temperature``, one model per ``T``, from the same initialization and data order, is
trained at that ``T``). Then, on one evaluation batch and for each temperature ``T`` in
``--temperatures``, the logits become ``z / T``: a forward hook on the LM head divides its
output, so the loss, its gradient and the JVP all see the scaled logits (without
``--train_at_temperature`` the weights ``theta`` are the same for every ``T``). Along the unit
direction ``v = g / |g|``, ``g`` the gradient of the batch loss at that temperature (and
``--random_directions`` Gaussian ones), the recipe

* measures ``Delta = max_k a_k - min_k a_k`` of the slopes ``a = J v`` of the scaled logits per
  token (:meth:`hf_ghosts.RadiusProbe.logit_slopes`, one forward-mode JVP) and
  ``rho = pi / max Delta`` over the batch's predicted positions (eq. 14);
* finds the collapse onset: the smallest step ``t`` with ``L(theta - t v) / L(theta) >
  --threshold``, first on a geometric grid of ``t`` (``--t_min`` .. ``--t_max``,
  ``--t_points``), then by ``--bisect_steps`` log-space bisections inside the first bracketing cell;
* reports it in raw step units (``onset_t``) and in units of rho (``onset_r = onset_t / rho``),
  and the spread across temperatures of each: ``std(ln onset)`` (population std, natural log).
  The paper found 0.992 (raw) -> 0.164 (r units).

Writes to ``--output_dir`` (default ``outputs/temperature``): ``temperature.png`` (loss ratio
against ``t`` and against ``r``, one curve per ``T``, the threshold and each onset marked),
``temperature_onsets.csv`` / ``.md`` (one row per temperature and direction),
``temperature_spread.csv`` / ``.md`` (per direction: the spread in each unit),
``temperature_curves.csv`` (every grid step) and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from common import load_model, parse_and_load, probe_batch, save_figure, unit_directions, write_json, write_table
from phase_transition import brief_training, step_outcome

from hf_ghosts import RadiusProbe
from hf_ghosts.radii import check_radius, rho_bound, spread


@dataclass
class TemperatureArguments:
    """The sweep: how long to train first, which temperatures, which directions, what counts as collapse."""

    output_dir: str = field(default="outputs/temperature", metadata={"help": "Where the plot and tables go."})
    temperatures: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0], metadata={"help": "Logits are divided by each T."}
    )
    threshold: float = field(default=2.0, metadata={"help": "Collapse: L(theta - t v) / L(theta) above this."})
    train_steps: int = field(default=150, metadata={"help": "AdamW steps at T = 1 before the sweep (0: the model as loaded)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the brief training."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per training step."})
    probe_blocks: int = field(default=16, metadata={"help": "Evaluation blocks in the batch that is measured and stepped on."})
    random_directions: int = field(default=0, metadata={"help": "Gaussian directions besides the gradient."})
    t_min: float = field(default=1e-3, metadata={"help": "Smallest raw step length of the grid."})
    t_max: float = field(default=1e4, metadata={"help": "Largest raw step length of the grid."})
    t_points: int = field(default=57, metadata={"help": "Grid steps, log-spaced from t_min to t_max (8 a decade by default)."})
    train_at_temperature: bool = field(
        default=False,
        metadata={"help": "Train a fresh model (same init and data) at each T, instead of one at T = 1 for all."},
    )
    bisect_steps: int = field(default=20, metadata={"help": "Log-space bisections of the first grid cell that crosses."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the data order and the random directions."})

    def __post_init__(self) -> None:
        if not self.temperatures or any(not (t > 0 and math.isfinite(t)) for t in self.temperatures):
            raise ValueError(f"TemperatureArguments: temperatures must be finite and > 0; got {self.temperatures}")
        if not 0 < self.t_min < self.t_max or self.t_points < 2:
            raise ValueError(f"need 0 < t_min < t_max and t_points >= 2; got {self.t_min}, {self.t_max}, {self.t_points}")
        if not self.threshold > 1.0:
            raise ValueError(f"TemperatureArguments: threshold must be > 1 (a loss increase); got {self.threshold}")
        if self.bisect_steps < 0 or self.random_directions < 0:
            raise ValueError(f"bisect_steps and random_directions must be >= 0; got {self.bisect_steps}, "
                             f"{self.random_directions}")


@contextlib.contextmanager
def temperature(model: torch.nn.Module, value: float) -> Iterator[None]:
    """Inside the block the model's logits are ``z / value``: a forward hook on the LM head (removed on exit).

    Every forward sees it (the model's own loss, backward, functional calls, forward-mode AD), and the
    parameters are untouched, so ``theta`` is the same at every temperature.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"temperature: {type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    handle = head.register_forward_hook(lambda module, args, output: output / value)
    try:
        yield
    finally:
        handle.remove()


def loss_ratio(model: torch.nn.Module, batch: dict[str, torch.Tensor], unit: dict[str, torch.Tensor], base_loss: float,
               t: float) -> float:
    """``L(theta - t v) / L(theta)``: a step of length ``t`` against ``v`` (down the gradient when ``v = g / |g|``)."""
    return step_outcome(model, batch, unit, -t)[0] / base_loss


def collapse_onset(ratio_at, t_grid: np.ndarray, threshold: float, bisect_steps: int) -> tuple[float, list[float]]:
    """Smallest ``t`` with ``ratio_at(t) > threshold``: first grid crossing, then log-space bisection of that cell.

    Returns the onset (NaN if no grid step crosses; ``t_grid[0]`` if the first one does) and the
    ratios on the grid. The bisection keeps ``ratio(low) <= threshold < ratio(high)`` and returns ``high``.
    """
    ratios = [ratio_at(float(t)) for t in t_grid]
    above = np.nonzero(np.array(ratios) > threshold)[0]
    if not above.size:
        return math.nan, ratios
    k = int(above[0])
    if k == 0:
        return float(t_grid[0]), ratios
    low, high = float(t_grid[k - 1]), float(t_grid[k])
    for _ in range(bisect_steps):
        middle = math.sqrt(low * high)
        if ratio_at(middle) > threshold:
            high = middle
        else:
            low = middle
    return high, ratios


def log_spread(values: list[float]) -> float:
    """``std(ln x)`` over the finite values (population std, ``ddof=0``); NaN below two of them."""
    finite = np.array([v for v in values if math.isfinite(v) and v > 0])
    return float(np.std(np.log(finite))) if finite.size >= 2 else math.nan


def plot_onsets(curves: list[dict[str, Any]], rows: list[dict[str, Any]], threshold: float, path: str, title: str) -> str:
    """Loss ratio against raw ``t`` (left) and ``r = t / rho`` (right), one colour per T, onsets as dots."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    palette = plt.cm.plasma(np.linspace(0.0, 0.85, len({row["T"] for row in rows})))
    colors = {temp: palette[i] for i, temp in enumerate(sorted({row["T"] for row in rows}))}
    for row in rows:
        mine = [c for c in curves if c["T"] == row["T"] and c["direction"] == row["direction"]]
        gradient = row["direction"] == "grad"
        style = dict(color=colors[row["T"]], lw=2.0 if gradient else 1.0, ls="-" if gradient else ":")
        label = f"T = {row['T']:g}" if gradient else None
        ratios = [c["loss_ratio"] for c in mine]
        left.plot([c["t"] for c in mine], ratios, label=label, **style)
        right.plot([c["r"] for c in mine], ratios, label=label, **style)
        if gradient and math.isfinite(row["onset_t"]):
            left.plot(row["onset_t"], threshold, "o", color=colors[row["T"]], ms=5)
            right.plot(row["onset_r"], threshold, "o", color=colors[row["T"]], ms=5)
    for axis, unit in ((left, "raw step length t"), (right, "r = t / rho   (rho = pi / max Delta at that T)")):
        axis.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold x{threshold:g}")
        axis.axhline(1.0, color="lightgray", lw=1)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(unit)
        axis.set_ylabel("loss ratio L(theta - t v) / L(theta)")
    right.axvline(1.0, color="gray", ls=":", lw=1)
    left.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train briefly, then per temperature and direction: rho, the loss curve and the onset; tables, plot, summary."""
    started = time.perf_counter()
    spec, model_args, tokenizer, train, evaluation = parse_and_load(TemperatureArguments, argv)

    def trained(temp: float) -> torch.nn.Module:
        """The model (same initialization, same data order), ``spec.train_steps`` AdamW steps at temperature ``temp``."""
        model = load_model(model_args, len(tokenizer), spec.seed)
        if spec.train_steps > 0:
            with tempfile.TemporaryDirectory() as scratch, temperature(model, temp):
                brief_training(model, spec, train, scratch)
        return model.eval()

    shared = None if spec.train_at_temperature else trained(1.0)
    batch, valid = probe_batch(evaluation, spec.probe_blocks)  # valid: position t predicts label t + 1
    t_grid = np.geomspace(spec.t_min, spec.t_max, spec.t_points)

    rows, curves = [], []
    for temp in spec.temperatures:
        model = shared if shared is not None else trained(temp)
        probe = RadiusProbe(model, radii=("output",))
        with temperature(model, temp):
            base_loss, _ = step_outcome(model, batch, {}, 0.0)
            for name, unit in unit_directions(model, batch, spec.random_directions, spec.seed).items():
                _, slopes = probe.logit_slopes(batch, unit)  # slopes a = J v of the scaled logits: one JVP
                max_delta = float(spread(slopes.float())[valid].max())
                rho = check_radius(float(rho_bound(torch.tensor(max_delta))), "temperature")  # NaN: NaN/inf slopes

                ratio_at = partial(loss_ratio, model, batch, unit, base_loss)
                onset_t, ratios = collapse_onset(ratio_at, t_grid, spec.threshold, spec.bisect_steps)
                curves += [{"T": temp, "direction": name, "t": float(t), "r": float(t) / rho, "loss_ratio": ratio}
                           for t, ratio in zip(t_grid, ratios, strict=True)]
                rows.append({
                    "T": temp, "direction": name, "base_loss": base_loss, "max_delta": max_delta, "rho": rho,
                    "onset_t": onset_t, "onset_r": onset_t / rho,
                    "ratio_at_onset": ratio_at(onset_t) if math.isfinite(onset_t) else math.nan,
                    "min_ratio": float(min(ratios)),
                })
                print(f"T={temp:<5g} {name:>8}: loss {base_loss:.4f}, max Delta {max_delta:.4g}, rho {rho:.4g}; "
                      f"onset (x{spec.threshold:g}) at t = {onset_t:.4g} = {onset_t / rho:.4g} rho")
    missing = [(row["T"], row["direction"]) for row in rows if not math.isfinite(row["onset_t"])]
    if missing:
        print(f"WARNING: no collapse up to t_max = {spec.t_max:g} for {missing}; widen --t_max or lower --threshold")

    spreads = []
    for name in dict.fromkeys(row["direction"] for row in rows):
        mine = [row for row in rows if row["direction"] == name]
        spreads.append({
            "direction": name, "temperatures": len(mine),
            "spread_raw": log_spread([row["onset_t"] for row in mine]),  # std of ln(onset_t) across T
            "spread_r": log_spread([row["onset_r"] for row in mine]),  # std of ln(onset_t / rho) across T
        })
    table = write_table(rows, os.path.join(spec.output_dir, "temperature_onsets"))
    spread_table = write_table(spreads, os.path.join(spec.output_dir, "temperature_spread"))
    write_table(curves, os.path.join(spec.output_dir, "temperature_curves"))
    model_name = model_args.model_name_or_path or model_args.preset
    gradient = spreads[0]
    trained_at = "at each T" if spec.train_at_temperature else "at T = 1"
    shape = f"{len(batch['input_ids'])} x {batch['input_ids'].shape[1]}"
    title = (f"{model_name} after {spec.train_steps} steps {trained_at}, {shape} tokens; std of ln(onset) across T: "
             f"{gradient['spread_raw']:.3f} raw -> {gradient['spread_r']:.3f} in r")
    figure = plot_onsets(curves, rows, spec.threshold, os.path.join(spec.output_dir, "temperature.png"), title)
    seconds = time.perf_counter() - started
    summary = {"model": model_name, "train_steps": spec.train_steps, "train_at_temperature": spec.train_at_temperature,
               "threshold": spec.threshold, "temperatures": spec.temperatures, "rows": rows, "spreads": spreads, "figure": figure,
               "wall_seconds": seconds, "torch_threads": torch.get_num_threads()}
    write_json(os.path.join(spec.output_dir, "summary.json"), summary)
    print("\n" + table + "\n" + spread_table)
    print(f"wrote {spec.output_dir}/: temperature.png, temperature_onsets.csv/.md, temperature_spread.csv/.md, "
          f"temperature_curves.csv, summary.json ({seconds:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
