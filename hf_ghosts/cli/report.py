"""The files and the terminal summary of ``hf-ghosts diagnose``: ``diagnosis.json``, ``diagnosis.md``, the heatmap."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from hf_ghosts.plots import head_radii_heatmap
from hf_ghosts.settings import RADIUS_FIELDS

__all__ = ["HEATMAP", "markdown_report", "number", "share", "summary", "write_json", "write_report"]

HEATMAP = "rho_attn_heads.png"


def share(fraction: float | None) -> str:
    """A fraction of the batches as a percentage (``None``: nothing measured)."""
    return "n.a." if fraction is None else f"{fraction:.0%}"


def number(value: float | None, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits; ``None`` (inf, NaN or not measured) as ``inf / n.a.``."""
    if value is None:
        return "inf / n.a."
    return f"{value:.{digits}g}"


def _code(text: str) -> str:
    """``text`` as a markdown code span that survives a table cell (newlines shown as ⏎, pipes escaped)."""
    text = text.replace("\r", "").replace("\n", "⏎").replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _verdict(result: Mapping[str, Any]) -> str:
    """The worst batch's verdict, with the share of batches outside."""
    r = result["r"]
    if r is None:
        return "not measured"
    if result["learning_rate"] == 0:
        return "the step is a no-op (learning rate 0)"
    measured = result["batches_measured"]
    if r < 1:
        return f"inside the radius (r < 1) on all {measured} batch(es)"
    outside = measured - round(result["fraction_inside"] * measured)
    return f"OUTSIDE the radius (r >= 1) on {outside} of {measured} batch(es): no convergence guarantee"


def _rate_lines(result: Mapping[str, Any]) -> list[str]:
    """Where the update measured ran at another rate than the next step: which, and why (else nothing)."""
    if result["measured_learning_rate_why"] is None:
        return []
    return [f"| learning rate of the update measured | {result['measured_learning_rate']:.4g} "
            f"({result['measured_learning_rate_source']}) |",
            f"| r at that rate (worst / median batch) | **{number(result['r_at_measured_rate'])}** / "
            f"{number(result['r_median_at_measured_rate'])}; max / min {number(result['r_max_over_min'], 3)}; "
            f"{share(result['fraction_inside_at_measured_rate'])} of the batches inside |"]


def markdown_report(result: Mapping[str, Any], heatmap: str | None) -> str:
    """``diagnosis.md``: the table, the per-batch rows, the heatmap link and the fragile tokens."""
    step = "" if result["step"] is None else f" (step {result['step']})"
    rate = f", at lr {result['measured_learning_rate']:.4g}" if result["measured_learning_rate_why"] else ""
    what = {"adamw": "the saved AdamW (optimizer.pt)", "sgd": "SGD along the gradient (no optimizer state used)"}.get(
        result["direction"], f"the saved {result['direction']} (optimizer.pt)")
    lines = [
        f"# hf-ghosts diagnosis: {os.path.basename(os.path.normpath(result['checkpoint']))}{step}",
        "",
        f"The next update proposed by {what} at learning rate {result['learning_rate']:.4g} "
        f"({result['learning_rate_source']}), not applied; every radius measured along it ({result['estimator']}) on "
        f"{result['batches']} batch(es) of {result['batch_size']} x {result['block_size']} tokens.",
        "",
        *([f"The update was measured at learning rate {result['measured_learning_rate']:.4g}: "
           f"{result['measured_learning_rate_why']}.", ""] if result["measured_learning_rate_why"] else []),
        "| quantity | value |",
        "|---|---|",
        f"| r = \\|u\\| / rho (worst batch) | **{number(result['r'])}**: {_verdict(result)} |",
        *(_rate_lines(result) or [
            f"| r over the batches | median {number(result['r_median'])}, least {number(result['r_min'])}, max / min "
            f"{number(result['r_max_over_min'], 3)}; {share(result['fraction_inside'])} of the batches inside |"]),
        f"| rho (binding radius) | {number(result['rho'])} ({result['bottleneck']}) |",
    ]
    for name in result["radii_measured"]:
        key = RADIUS_FIELDS[name]
        extra = ""
        if name == "attention" and result["worst_batch"] is not None:
            head = result["per_batch"][result["worst_batch"]].get("attention_head")
            extra = "" if head is None else f" (min over heads: layer {head[0]}, head {head[1]})"
        lines.append(f"| {key} | {number(result.get(key))}{extra} |")
    lines += [
        f"| \\|u\\| (update norm{rate}) | {number(result['update_norm'])} |",
        f"| learning rate of the next step | {result['learning_rate']:.4g} ({result['learning_rate_source']}) |",
        f"| safe learning rate (r = {result['r_target']:g}, worst batch) | **{number(result['safe_learning_rate'])}**"
        + ("" if result["safe_lr_factor"] is None else f" (x{number(result['safe_lr_factor'], 3)} the next step's)") + " |",
        f"| direction | {result['direction']} |",
        "",
    ]
    several = len(result["per_batch"]) > 1
    if several:
        key = "r_at_measured_rate" if result["measured_learning_rate_why"] else "r"
        lines += [f"r, rho and the radii above are those of batch {result['worst_batch']}, the one with the largest r; "
                  "the safe learning rate keeps every batch's step inside its radius.", "",
                  f"| batch | r{rate.replace(',', '')} | rho | bottleneck | rho_out | \\|u\\| | loss | max token spread |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in result["per_batch"]:
            rho_out = (entry.get("radii") or {}).get("output")
            lines.append(f"| {entry['batch']} | {number(entry.get(key))} | {number(entry.get('rho'))} | "
                         f"{entry.get('bottleneck', '-')} | {number(rho_out)} | {number(entry['update_norm'])} | "
                         f"{number(entry['loss'])} | {number(entry.get('out_spread'))} |")
        lines.append("")
    if heatmap is not None:
        lines += ["## Attention radius per head", "",
                  f"`rho_attn[layer, head]` along the step (batch {result['worst_batch']}); the smallest binds.", "",
                  f"![rho_attn per head]({heatmap})", ""]
    if result["fragile_tokens"]:
        lines += [
            f"## The {len(result['fragile_tokens'])} most fragile tokens",
            "",
            "Positions whose next-token logits move most along the step: spread `Delta = max_k a_k - min_k a_k` of "
            "the logit slopes, own radius `pi / Delta` (the largest spread sets `rho_out`), and margin = top-1 minus "
            "top-2 logit. A small margin with a large spread is a prediction near a decision flip and highly sensitive "
            "to the step." + (f" In batch {result['worst_batch']}, the worst." if several else ""),
            "",
            "| # | spread Delta | pi / Delta | margin | context (ends at the position) | next token | predicted |",
            "|---|---|---|---|---|---|---|",
        ]
        for rank, token in enumerate(result["fragile_tokens"], 1):
            lines.append(
                f"| {rank} | {token['spread']:.4g} | {number(token['radius'])} | {token['margin']:.3g} | "
                f"{_code(token['context'])} | {_code(json.dumps(token['next_token'], ensure_ascii=False))} | "
                f"{_code(json.dumps(token['predicted'], ensure_ascii=False))} |"
            )
        lines.append("")
    if result["notes"]:
        lines += ["## Notes", "", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_json(path: str, payload: Any) -> None:
    """Strict JSON (NaN and inf as ``null``), indented."""
    with open(path, "w") as handle:
        json.dump(_jsonable(payload), handle, indent=2, allow_nan=False, ensure_ascii=False)
        handle.write("\n")


def write_report(result: Mapping[str, Any], output_dir: str) -> list[str]:
    """Write ``diagnosis.json``, ``diagnosis.md`` and (with attention radii) ``rho_attn_heads.png``; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    heatmap = None
    if result["rho_attn_heads"] is not None:
        step = "" if result["step"] is None else f", step {result['step']}"
        head_radii_heatmap(result["rho_attn_heads"], os.path.join(output_dir, HEATMAP),
                           f"rho_attn per head{step} (r = {number(result['r'], 3)})")
        heatmap = HEATMAP
    paths = [os.path.join(output_dir, "diagnosis.json"), os.path.join(output_dir, "diagnosis.md")]
    write_json(paths[0], result)
    with open(paths[1], "w") as handle:
        handle.write(markdown_report(result, heatmap))
    written += paths + ([os.path.join(output_dir, HEATMAP)] if heatmap else [])
    return written


def summary(result: Mapping[str, Any]) -> str:
    """The short summary printed to the terminal."""
    step = "" if result["step"] is None else f" (step {result['step']})"
    lines = [f"hf-ghosts diagnose {result['checkpoint']}{step}",
             f"  next step: {result['direction']}, lr {result['learning_rate']:.3g} ({result['learning_rate_source']}), "
             f"{result['batches']} batch(es) of {result['batch_size']} x {result['block_size']} tokens, {result['estimator']}"]
    if result["measured_learning_rate_why"]:
        lines.append(f"  measured at lr {result['measured_learning_rate']:.3g} ({result['measured_learning_rate_source']}): "
                     "the scheduled rate is 0, the step a no-op")
    if result["r"] is None:
        lines.append("  nothing measured: " + result["notes"][-1])
        return "\n".join(lines)
    radii_text = ", ".join(f"{name} {number(result.get(RADIUS_FIELDS[name]), 3)}" for name in result["radii_measured"])
    factor = result["safe_lr_factor"]
    lines += [
        f"  r = {result['r']:.4g} (worst batch): {_verdict(result)}",
        *([f"  r at lr {result['measured_learning_rate']:.3g} (worst / median batch): "
           f"{number(result['r_at_measured_rate'])} / {number(result['r_median_at_measured_rate'], 3)}, max / min "
           f"{number(result['r_max_over_min'], 3)}; {share(result['fraction_inside_at_measured_rate'])} of the batches inside"]
          if result["measured_learning_rate_why"] else
          [f"  r over the batches: median {number(result['r_median'], 3)}, max / min {number(result['r_max_over_min'], 3)}; "
           f"{share(result['fraction_inside'])} inside"]),
        f"  rho = {number(result['rho'])} (bottleneck: {result['bottleneck']}; {radii_text}), |u| = {number(result['update_norm'])}",
        f"  safe learning rate (r = {result['r_target']:g}): {number(result['safe_learning_rate'])}"
        + ("" if factor is None else f" (x{number(factor, 3)} the next step's)"),
    ]
    if result["fragile_tokens"]:
        token = result["fragile_tokens"][0]
        context = token["context"].replace("\n", "⏎")
        lines.append(f"  most fragile token: {context!r} -> {token['next_token']!r}: spread {token['spread']:.3g}, "
                     f"margin {token['margin']:.3g}")
    return "\n".join(lines)
