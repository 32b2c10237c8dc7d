"""``hf-ghosts diagnose``: the convergence radius of the step a checkpoint's optimizer would take next.

For each of ``--batches`` batches (:mod:`hf_ghosts.cli.data`), the update ``u`` is the one the saved optimizer
proposes next (:class:`~hf_ghosts.cli.proposal.StepProposer`: the gradient as ``Trainer`` computes it, one
``optimizer.step()`` from the saved moments, the weights put back). Every radius is measured along ``u`` at the
checkpoint's weights with :class:`~hf_ghosts.probe.RadiusProbe`, and ``r = |u| / rho``. The radius moves by
orders of magnitude from batch to batch, so several batches are measured (:data:`~hf_ghosts.cli.data.DEFAULT_BATCHES`): the
verdict and ``safe_learning_rate = lr r_target / r`` come from the worst batch, beside the median, the least
``r``, ``max / min`` and the fraction of batches inside. The fragile tokens are the worst batch's positions of
largest logit-slope spread (:meth:`~hf_ghosts.probe.RadiusProbe.logit_slopes`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_ghosts import radii
from hf_ghosts._optional import require
from hf_ghosts.cli.checkpoint import Checkpoint, find_checkpoints, has_model, load_checkpoint
from hf_ghosts.cli.data import build_batches, check_data_options
from hf_ghosts.cli.errors import CliError
from hf_ghosts.cli.proposal import StepProposer
from hf_ghosts.cli.report import number, summary, write_json, write_report
from hf_ghosts.plots import checkpoints_figure
from hf_ghosts.probe import RadiusProbe, output_positions
from hf_ghosts.settings import RADIUS_FIELDS

__all__ = ["diagnose", "run_diagnose", "token_table"]

CONTEXT_TOKENS = 12  # tokens of context shown before a fragile position
CAUSAL = True  # diagnose loads causal LMs: logits at t predict the label at t + 1


# --------------------------------------------------------------------------------------------- per-token spreads
def token_table(probe: RadiusProbe, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Per position: the spread ``Delta = max_k a_k - min_k a_k`` of the logit slopes ``a = J v`` along
    ``v = direction / |direction|`` (:meth:`RadiusProbe.logit_slopes`, one sequence at a time so that only one
    row of ``[length, vocab]`` logits exists), its radius ``pi / Delta``, the margin (top-1 minus top-2 logit)
    and the predicted token. The largest ``Delta`` over ``valid`` positions is the probe's ``out_spread``.

    Returns:
        ``{"spread", "radius", "margin", "predicted", "valid"}``, each ``[batch, length]``; ``valid`` marks the
        softmax samples (:func:`~hf_ghosts.probe.output_positions`: ``labels[:, t + 1] != -100``).
    """
    rows = int(batch["input_ids"].shape[0])
    spreads, margins, predicted = [], [], []
    estimator, fd_step = probe.slope_estimator(batch, direction)  # fd: the step its control checks on this batch
    for row in range(rows):
        inputs = {key: value[row : row + 1] if torch.is_tensor(value) and value.dim() else value
                  for key, value in batch.items()}
        logits, slopes = probe.logit_slopes(inputs, direction, estimator=estimator, fd_step=fd_step)
        spreads.append(radii.spread(slopes.float(), dim=-1)[0])
        top = logits[0].float().topk(2, dim=-1)
        margins.append(top.values[:, 0] - top.values[:, 1])
        predicted.append(top.indices[:, 0])
    spread = torch.stack(spreads)
    valid = output_positions(batch, spread.shape, shift_labels=CAUSAL, device=spread.device)
    return {"spread": spread, "radius": radii.rho_bound(spread), "margin": torch.stack(margins),
            "predicted": torch.stack(predicted), "valid": valid}


def _fragile_tokens(tokenizer: Any, batch: Mapping[str, torch.Tensor], table: Mapping[str, torch.Tensor],
                    index: int, count: int) -> list[dict]:
    """The ``count`` valid positions of largest spread, largest first, with their context."""
    masked = torch.where(table["valid"], table["spread"], torch.full_like(table["spread"], -math.inf))
    top = masked.flatten().topk(min(count, int(table["valid"].sum())))
    ids, length = batch["input_ids"], masked.shape[1]
    tokens = []
    for flat in top.indices.tolist():
        row, position = divmod(flat, length)
        start = max(0, position + 1 - CONTEXT_TOKENS)
        tokens.append({
            "batch": index, "row": row, "position": position, "spread": float(table["spread"][row, position]),
            "radius": _finite(table["radius"][row, position]), "margin": float(table["margin"][row, position]),
            "token": tokenizer.decode([int(ids[row, position])]),
            "next_token": tokenizer.decode([int(ids[row, position + 1])]),
            "predicted": tokenizer.decode([int(table["predicted"][row, position])]),
            "context": ("…" if start > 0 else "") + tokenizer.decode(ids[row, start : position + 1].tolist()),
        })
    return tokens


# --------------------------------------------------------------------------------------------- diagnose
def _probe(model: torch.nn.Module, wanted: Sequence[str], estimator: str) -> RadiusProbe:
    """The probe, or a :class:`CliError` that names the radius the model cannot give in ``--radii`` spelling."""
    try:
        return RadiusProbe(model, tuple(wanted), estimator, shift_labels=CAUSAL)
    except ValueError as error:
        failing, usable = [], []
        for name in wanted:
            try:
                RadiusProbe(model, (name,), estimator, shift_labels=CAUSAL)
                usable.append(name)
            except ValueError as reason:
                failing.append((name, reason))
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        name, reason = failing[0] if failing else ("/".join(wanted), error)
        fix = f"Pass --radii {','.join(usable)}" if usable else "hf_ghosts cannot measure this model"
        reason = str(reason).split(" Pass radii=")[0].rstrip(". ")
        raise CliError(f"--radii {','.join(wanted)}: cannot measure the {name} radius of {model_type} "
                       f"({type(model).__name__}): {reason}. {fix}") from error


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _measure_batch(probe: RadiusProbe, proposer: StepProposer, index: int, batch: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], Any, dict[str, torch.Tensor] | None]:
    """``(per-batch entry, report or None, update)`` of one batch; ``r`` at the scheduled rate and the measured one."""
    proposal = proposer.propose(batch)
    entry: dict[str, Any] = {"batch": index, "loss": _finite(proposal.loss), "grad_norm": _finite(proposal.grad_norm),
                             "update_norm": _finite(proposal.norm), "finite": False}
    if not math.isfinite(proposal.norm) or proposal.norm == 0:
        return entry, None, None
    try:
        report = probe.measure({k: v.to(proposer.device) for k, v in batch.items()}, proposal.update)
        rho = radii.check_radius(float(report.rho), "RadiusProbe.measure")  # NaN: NaN or inf in the slopes
    except ValueError as error:
        if all(bool(torch.isfinite(p).all()) for p in probe.model.parameters()):
            raise CliError(f"the probe failed on batch {index}: {error}") from error
        return entry, None, None  # NaN/inf weights: the run had already diverged
    measured = float(radii.normalized_step(proposal.norm, rho))
    entry.update(
        r=_finite(measured * proposer.rates.scale), r_at_measured_rate=_finite(measured), rho=_finite(rho),
        bottleneck=report.bottleneck, finite=math.isfinite(measured),
        radii={name: _finite(value) for name, value in report.radii().items()},
        out_spread=None if report.out_spread is None else _finite(report.out_spread),
        output_tokens=None if report.output_tokens is None else int(report.output_tokens),
    )
    if report.attn_spread is not None:
        heads = report.rho_attn.float().cpu()
        entry["attention_head"] = list(divmod(int(heads.argmin()), heads.shape[1]))
    return entry, report, proposal.update


def _over_batches(measured: Sequence[dict], key: str) -> dict[str, float | None]:
    """The worst (largest), median and least ``key`` over the measured batches, and the fraction below 1."""
    values = [math.inf if e[key] is None else e[key] for e in measured]
    if not values:
        return {"max": None, "median": None, "min": None, "inside": None}
    return {"max": _finite(max(values)), "median": _finite(statistics.median(values)), "min": _finite(min(values)),
            "inside": sum(v < 1 for v in values) / len(values)}


def diagnose(checkpoint: Checkpoint, batches: Sequence[Mapping[str, torch.Tensor]], *, radii_names: Sequence[str],
             estimator: str = "jvp", r_target: float = 1.0, learning_rate: float | None = None,
             max_grad_norm: float | None = None, top_tokens: int = 10, device: str = "cpu", seed: int = 0) -> dict:
    """Measure ``r`` of the next step on each batch; return the diagnosis as a JSON-ready dict (see docs/diagnose.md).

    ``r`` is at the next step's learning rate, ``r_at_measured_rate`` at the rate of the update measured (they
    differ only where the scheduled rate is 0: :func:`~hf_ghosts.cli.proposal.choose_rates`). The verdict
    (``inside``: ``r < 1``), the radii, the heads and the fragile tokens are those of the worst batch;
    ``safe_learning_rate = measured_lr * r_target / r_at_measured_rate``.
    """
    proposer = StepProposer(checkpoint, learning_rate, max_grad_norm, device, seed)
    try:
        model = proposer.model
        probe = _probe(model, radii_names, estimator)
        per_batch, worst = [], None
        for index, batch in enumerate(batches):
            entry, report, update = _measure_batch(probe, proposer, index, batch)
            per_batch.append(entry)
            if entry["finite"] and (worst is None or entry["r_at_measured_rate"] > worst[0]["r_at_measured_rate"]):
                worst = (entry, report, update)
        fragile = []
        if worst is not None and top_tokens > 0 and "output" in radii_names:
            index = worst[0]["batch"]
            batch = {k: v.to(proposer.device) for k, v in batches[index].items()}
            table = token_table(probe, batch, worst[2])
            fragile = _fragile_tokens(checkpoint.tokenizer, batches[index], table, index, top_tokens)
    finally:
        proposer.close()
    rates = proposer.rates
    measured = [e for e in per_batch if e["finite"]]
    scheduled, at_rate = _over_batches(measured, "r"), _over_batches(measured, "r_at_measured_rate")
    entry, report = (None, None) if worst is None else worst[:2]
    r, r_measured = scheduled["max"], at_rate["max"]
    least = at_rate["min"]
    notes = list(checkpoint.notes) + proposer.notes
    if worst is None:
        notes.append("the proposed update is non-finite or zero on every batch: nothing to measure (a diverged run "
                     "has NaN weights or moments)")
    heads = None if report is None or report.attn_spread is None else report.rho_attn.float().cpu().tolist()
    return {
        "checkpoint": checkpoint.source,
        "step": checkpoint.step,
        "model_type": getattr(model.config, "model_type", None),
        "direction": proposer.direction,
        "learning_rate": rates.learning_rate,
        "learning_rate_source": rates.source,
        "measured_learning_rate": rates.measured_rate,
        "measured_learning_rate_source": rates.measured_source,
        "measured_learning_rate_why": rates.why,
        "max_grad_norm": proposer.max_grad_norm,
        "estimator": estimator,
        "radii_measured": list(radii_names),
        "r_target": r_target,
        "batches": len(batches),
        "batches_measured": len(measured),
        "batch_size": int(batches[0]["input_ids"].shape[0]),
        "block_size": int(batches[0]["input_ids"].shape[1]),
        "r": r,
        "r_median": scheduled["median"],
        "r_min": scheduled["min"],
        "r_max_over_min": None if r_measured is None or not least else r_measured / least,
        "fraction_inside": scheduled["inside"],
        "inside": None if worst is None else r is not None and r < 1.0,
        "r_at_measured_rate": r_measured,
        "r_median_at_measured_rate": at_rate["median"],
        "fraction_inside_at_measured_rate": at_rate["inside"],
        "rho": None if entry is None else entry["rho"],
        "update_norm": None if entry is None else entry["update_norm"],
        **{RADIUS_FIELDS[name]: None if entry is None else entry["radii"].get(name) for name in radii_names},
        "bottleneck": None if entry is None else entry["bottleneck"],
        "worst_batch": None if entry is None else entry["batch"],
        "safe_learning_rate": None if not r_measured else rates.measured_rate * r_target / r_measured,
        "safe_lr_factor": None if not r else r_target / r,
        "per_batch": per_batch,
        "rho_attn_heads": None if heads is None else [[_finite(v) for v in row] for row in heads],
        "fragile_tokens": fragile,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------- the command
def _defaults(args: argparse.Namespace, checkpoint: Checkpoint) -> tuple[int, int]:
    """``(block_size, batch_size)`` from the options, else the checkpoint's training arguments and config."""
    saved = checkpoint.training_args
    batch_size = args.batch_size
    if batch_size is None:
        per_device = getattr(saved, "per_device_train_batch_size", None)
        batch_size = per_device * getattr(saved, "gradient_accumulation_steps", 1) if per_device else 8
    limit = getattr(checkpoint.model.config, "max_position_embeddings", None)
    block_size = args.block_size or (min(128, limit) if limit else 128)
    if limit and block_size > limit:
        raise CliError(f"--block_size {block_size} exceeds the model's max_position_embeddings {limit}")
    return block_size, batch_size


def _device(requested: str | None) -> str:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device here; pass --device cpu")
    return device


def _diagnose_one(args: argparse.Namespace, source: str, data: tuple | None = None) -> tuple[dict, tuple]:
    """Diagnose ``source``; ``data`` is ``(batches, description, notes)`` from :func:`build_batches` (built if ``None``)."""
    checkpoint = load_checkpoint(source, args.tokenizer, args.ignore_optimizer, trust_checkpoint=args.trust_checkpoint,
                                 arguments_required=args.max_grad_norm is None)
    if data is None:
        block_size, batch_size = _defaults(args, checkpoint)
        data = build_batches(args, checkpoint.tokenizer, block_size, batch_size)
    batches, described, data_notes = data
    checkpoint.notes.extend(data_notes)
    result = diagnose(checkpoint, batches, radii_names=args.radii, estimator=args.estimator, r_target=args.r_target,
                      learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm, top_tokens=args.top_tokens,
                      device=_device(args.device), seed=args.seed)
    result["data"] = described
    return result, data


def run_diagnose(args: argparse.Namespace) -> None:
    """``hf-ghosts diagnose``: one checkpoint, or with ``--all`` every checkpoint of a run."""
    from transformers.utils import logging as hf_logging

    datasets = require("datasets", extra="cli")

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        _device(args.device)
        check_data_options(args)
        if args.all:
            _run_all(args)
            return
        output_dir = args.output_dir or (os.path.join(args.checkpoint, "ghosts_diagnosis") if os.path.isdir(args.checkpoint)
                                         else "ghosts_diagnosis")
        result, *_ = _diagnose_one(args, args.checkpoint)
        written = write_report(result, output_dir)
        print(summary(result))
        print(f"  wrote {', '.join(written)}")
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def _run_all(args: argparse.Namespace) -> None:
    """``--all``: the same batches through every ``checkpoint-*`` of the run; a table and a figure of r and the safe LR."""
    run_dir = args.checkpoint
    if not os.path.isdir(run_dir):
        raise CliError(f"--all expects a run directory; {run_dir} is not a directory")
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        hint = " (it is a checkpoint itself: drop --all)" if has_model(run_dir) else ""
        raise CliError(f"--all: {run_dir} holds no checkpoint-* folders{hint}. Pass the Trainer's output_dir")
    output_dir = args.output_dir or os.path.join(run_dir, "ghosts_diagnosis")
    rows, data = [], None
    for step, path in checkpoints:
        result, data = _diagnose_one(args, path, data)  # the same batches for every checkpoint
        write_report(result, os.path.join(output_dir, os.path.basename(path)))
        rows.append({"checkpoint": os.path.basename(path), "step": result["step"] if result["step"] is not None else step,
                     **{key: result[key] for key in ("r", "r_median", "fraction_inside", "rho", "bottleneck",
                                                     "update_norm", "learning_rate", "safe_learning_rate", "direction")}})
        print(f"{os.path.basename(path):>20}: r = {number(rows[-1]['r'])}, rho = {number(rows[-1]['rho'])} "
              f"({rows[-1]['bottleneck']}), lr {rows[-1]['learning_rate']:.3g}, safe lr {number(rows[-1]['safe_learning_rate'])}")
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "diagnosis_all.json"), {"run_dir": run_dir, "data": data[1],
                                                                "r_target": args.r_target, "checkpoints": rows})
    lines = [f"# hf-ghosts diagnosis of every checkpoint in {run_dir}", "",
             "| checkpoint | step | r (worst batch) | r (median) | batches inside | rho | bottleneck | learning rate | "
             "safe learning rate |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['checkpoint']} | {row['step']} | {number(row['r'])} | {number(row['r_median'])} | "
              f"{number(row['fraction_inside'], 3)} | {number(row['rho'])} | {row['bottleneck']} | "
              f"{row['learning_rate']:.4g} | {number(row['safe_learning_rate'])} |" for row in rows]
    lines += ["", "![r and the safe learning rate over the checkpoints](diagnosis_all.png)", ""]
    with open(os.path.join(output_dir, "diagnosis_all.md"), "w") as handle:
        handle.write("\n".join(lines))
    checkpoints_figure(rows, os.path.join(output_dir, "diagnosis_all.png"), f"{run_dir}: the next step of each checkpoint")
    print(f"wrote {output_dir}/: diagnosis_all.json, diagnosis_all.md, diagnosis_all.png and one folder per checkpoint")
