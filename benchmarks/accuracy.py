"""How accurate RhoTrainer's cheaper settings are, and who survives a learning-rate spike.

    python benchmarks/accuracy.py                                            # tiny, 90 steps; a few minutes on CPU
    python benchmarks/accuracy.py --spike-size 5m --spike-steps 60 --spike-lr 6e-4     # docs/cost.md's table
    python benchmarks/accuracy.py --spike-steps 6 --out /tmp/accuracy.json   # smoke run, seconds

(``python benchmarks/overhead.py --parts accuracy ...`` runs the same with the same options.)

A plain PyTorch loop (:func:`presets.spike_loop` (``recipes/presets.py``)), AdamW at ``--spike-lr`` with the LR
multiplied by ``--spike-factor`` (x1000) for the middle third of the steps, on ``--spike-size``
(default tiny). Every controller setting runs beside an :func:`oracle`, a ``RhoController(mode="monitor",
every=1, estimator="jvp")`` on the optimizer's hooks that measures the exact, full-batch radius along the very
update of the very step; the setting's ``r`` is compared with it.
Plain AdamW (and AdamW with gradient-norm clipping) show what the spike does without control.
Writes one JSON (``--out``, default ``outputs/accuracy.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from harness import (
    SIZES,
    Setting,
    Size,
    batch_of,
    check_devices,
    fmt,
    markdown_table,
    run_info,
    token_blocks,
    write_result,
)
from presets import spike_loop

from hf_ghosts import RhoController
from hf_ghosts.settings import DEFAULT_EVERY


def accuracy_settings(every_k: int) -> list[Setting]:
    return [
        Setting("clip/jvp/every1 (exact)", mode="clip", estimator="jvp", every=1),
        Setting("clip/fd/every1", mode="clip", estimator="fd", every=1),
        Setting(f"clip/jvp/every{every_k}", mode="clip", estimator="jvp", every=every_k),
        Setting(f"clip/fd/every{every_k}", mode="clip", estimator="fd", every=every_k),
        Setting(f"clip/fd/every{every_k}, clip_reused", mode="clip", estimator="fd", every=every_k, clip_reused=True),
        Setting(f"clip/jvp/every{every_k}, no triggers", mode="clip", estimator="jvp", every=every_k,
                trigger_r=math.inf, trigger_growth=math.inf),
    ]


class ReuseClipController(RhoController):
    """An alternative evaluated against the r-trigger, and rejected: a step between probes whose ``r``
    estimated with the last ``rho`` exceeds ``trigger_r * r*`` is clipped to ``trigger_r * r*`` with that
    ``rho`` instead of being measured (``every`` and the growth trigger still probe). It would cap the probe
    cost at ``1/every`` however often a run is clipped; it is safe only while the radius along the step stays
    above ``trigger_r`` times the last one measured, which the accuracy table shows it does not.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cap = min(1.0, self.schedule.trigger_r) * self.r_target
        self.schedule = dataclasses.replace(self.schedule, trigger_r=math.inf)  # no r trigger: reused steps are clipped

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        record = self.last
        if self.mode != "clip" or record.probed or record.skipped or record.r_applied <= self.cap:
            return
        scale = self.cap * record.rho / record.update_norm  # old + scale * u, from old + record.scale * u
        torch._foreach_lerp_(self._shards(), self._old, 1.0 - scale / record.scale)
        self.last = dataclasses.replace(record, scale=scale, r_applied=record.r * scale, clipped=True)


def controller_for(setting: Setting, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   **kwargs: Any) -> RhoController:
    cls = ReuseClipController if setting.clip_reused else RhoController
    return cls(model, optimizer, **setting.controller_kwargs(), **kwargs)


def oracle(model: torch.nn.Module, optimizer: torch.optim.Optimizer, radii: tuple[str, ...]) -> RhoController:
    """The exact radius along the optimizer's real update: a ``"monitor"`` controller probing every step with the
    exact JVP on the full batch, attached to ``optimizer``'s step hooks (it sees ``u`` before any controller
    rescales it, and changes nothing). ``observe(batch)`` before each step; then ``last`` holds ``|u|``, ``rho``, ``r``.
    """
    monitor = RhoController(model, optimizer, mode="monitor", every=1, estimator="jvp", radii=radii)
    monitor.attach()
    return monitor


def exact_r(monitor: RhoController) -> float:
    """``|u| / rho`` of the step the oracle just saw; NaN where it measured no finite radius (a zero, non-finite or
    skipped update, or rho = inf)."""
    record = monitor.last
    return record.r if record.probed and math.isfinite(record.rho) else math.nan


def spike_run(size: Size, setting: Setting | None, steps: int, lr: float, factor: float, radii: tuple[str, ...],
              grad_clip: float | None = None) -> dict[str, Any]:
    """Train ``steps`` steps with the LR x ``factor`` in the middle third; per-step loss, r and the oracle's r."""
    model = size.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    exact = oracle(model, optimizer, radii) if setting is not None else None
    controller = controller_for(setting, model, optimizer, radii=radii) if setting else None
    blocks = token_blocks(size.batch * steps, size.seq, seed=1).view(steps, size.batch, size.seq)

    def controlled_step(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        exact.observe(batch)
        last = controller.step(batch)
        r = exact_r(exact)
        scale = math.nan if last.skipped else last.scale
        return dict(r=math.nan if last.skipped else last.r, exact_r=r, probed=last.probed, scale=scale,
                    exact_r_applied=scale * r)

    rows = spike_loop(model, optimizer, (batch_of(ids, size.device) for ids in blocks), start=steps // 3,
                      stop=2 * steps // 3, factor=factor, step=controlled_step if controller else None,
                      max_grad_norm=grad_clip)
    records = [{"step": row["step"], "loss": row["loss"], "spike": row["spike"], **(row["record"] or {})} for row in rows]
    return {"records": records, "probes": controller.probes if controller else 0}


def summarize_spike(name: str, run: dict[str, Any], steps: int, r_target: float = 1.0) -> dict[str, Any]:
    records = run["records"]
    start = steps // 3
    losses = [r["loss"] for r in records]
    pre = statistics.fmean(losses[max(0, start - 5) : start]) if start else losses[0]
    after = losses[start:]
    finite_after = [x for x in after if math.isfinite(x)]
    summary: dict[str, Any] = {
        "setting": name,
        "loss_before_spike": pre,
        "max_loss_from_spike": max(finite_after) if len(finite_after) == len(after) else math.inf,
        "final_loss": statistics.fmean(losses[-5:]),
    }
    summary["survived"] = bool(math.isfinite(summary["max_loss_from_spike"]) and summary["max_loss_from_spike"] < pre + 1.0)
    controlled = [r for r in records if "exact_r" in r and math.isfinite(r["exact_r"]) and r["exact_r"] > 0]
    if controlled:
        errors = [abs(r["r"] / r["exact_r"] - 1) for r in controlled]
        probed = [e for e, r in zip(errors, controlled, strict=True) if r["probed"]]
        reused = [e for e, r in zip(errors, controlled, strict=True) if not r["probed"]]
        summary.update(
            probed_fraction=run["probes"] / len(records),
            r_error_median=statistics.median(errors),
            r_error_max=max(errors),
            r_error_max_probed=max(probed) if probed else math.nan,
            r_error_max_reused=max(reused) if reused else math.nan,
            within_5pct=sum(e <= 0.05 for e in errors) / len(errors),
            # how far the true radius fell below the reused one: max of exact r / estimated r on reused steps
            worst_reused_underestimate=max((r["exact_r"] / r["r"] for r in controlled if not r["probed"]), default=math.nan),
            max_exact_r_applied=max(r["exact_r_applied"] for r in controlled),
            steps_over_target=sum(r["exact_r_applied"] > r_target * (1 + 1e-6) for r in controlled),
        )
    return summary


def run_accuracy(name: str, size: Size, settings: Sequence[Setting], steps: int, lr: float, factor: float,
                 radii: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = [summarize_spike("AdamW, no control", spike_run(size, None, steps, lr, factor, radii), steps),
            summarize_spike("AdamW + grad-norm clip 1.0", spike_run(size, None, steps, lr, factor, radii, 1.0), steps)]
    for setting in settings:
        rows.append(summarize_spike(setting.name, spike_run(size, setting, steps, lr, factor, radii), steps))
        rows[-1]["default"] = setting.is_default()
    for row in rows:
        row["size"] = name
    return rows


def accuracy_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["setting", "probed", "r error median", "r error max (probed / reused)", "within 5%",
              "max exact / estimated r, reused", "max exact r_applied", "steps over r*", "loss before spike",
              "max loss from spike", "survived"]
    lines = []
    for row in rows:
        if "r_error_median" in row:
            cells = [f"{row['probed_fraction']:.0%}", f"{row['r_error_median']:.1e}",
                     f"{row['r_error_max']:.1e} ({row['r_error_max_probed']:.1e} / {fmt(row['r_error_max_reused'], 3)})",
                     f"{row['within_5pct']:.0%}", fmt(row["worst_reused_underestimate"]), fmt(row["max_exact_r_applied"], 3),
                     str(row["steps_over_target"])]
        else:
            cells = ["-"] * 7
        cells += [fmt(row["loss_before_spike"]), fmt(row["max_loss_from_spike"]), "yes" if row["survived"] else "**no**"]
        lines.append([row["setting"] + (" **(default)**" if row.get("default") else ""), *cells])
    return markdown_table(header, lines)


# --------------------------------------------------------------------------------------------- main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--spike-*`` options (shared with ``benchmarks/overhead.py --parts accuracy``)."""
    parser.add_argument("--spike-size", default="tiny", choices=list(SIZES))
    parser.add_argument("--spike-steps", type=int, default=90, help="steps of the spike run; the LR spikes in the middle third")
    parser.add_argument("--spike-lr", type=float, default=1e-3)
    parser.add_argument("--spike-factor", type=float, default=1000.0)
    parser.add_argument("--spike-radii", nargs="+", default=["output", "attention"])


def every_k(every: int | None) -> int:
    """k of the every-k settings: ``--every``, else rho_every's default (16 if that is 1)."""
    k = every or DEFAULT_EVERY
    return 16 if k == 1 else k


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The accuracy table for parsed ``args`` (``--spike-*``, ``--every``); printed and returned."""
    size = SIZES[args.spike_size]
    rows = run_accuracy(args.spike_size, size, accuracy_settings(every_k(args.every)), args.spike_steps,
                        args.spike_lr, args.spike_factor, tuple(args.spike_radii))
    print(f"accuracy and LR spike on {args.spike_size}: AdamW lr {args.spike_lr}, x{args.spike_factor:g} for steps "
          f"{args.spike_steps // 3}-{2 * args.spike_steps // 3 - 1} of {args.spike_steps}")
    print(accuracy_table(rows), "\n", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--every", type=int, default=None, help="k of the every-k rows (default: rho_every's default)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", default="outputs/accuracy.json")
    args = parser.parse_args(argv)
    check_devices(parser, [args.spike_size])
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")
    result = run_info(argv, every_k=every_k(args.every))
    result["accuracy"] = run(args)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
