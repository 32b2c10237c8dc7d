"""The logged ``ghosts/*`` keys: one table, their aggregation between two logs, the W&B step metric.

:data:`LOGGED_KEYS` is the table (the README's "Logged keys" is tested against it). A
:class:`MetricWindow` takes the controller's per-step records (:class:`StepRecord`)
and reduces them as the table says; :meth:`MetricWindow.pop` is what ``Trainer.log`` receives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from hf_ghosts._optional import require
from hf_ghosts.architectures import BLOCK_KINDS
from hf_ghosts.settings import RADIUS_FIELDS, RADIUS_TABLE

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from hf_ghosts.probe import RadiusReport

__all__ = ["LOGGED_KEYS", "LoggedKey", "MetricWindow", "StepRecord", "define_wandb_metrics"]


_RADIUS_FIELD_NAMES = frozenset(RADIUS_FIELDS.values())
#: The report's position counts (``output_tokens``, ``attention_tokens``, ``ffn_tokens``): 0 means the radii taken
#: over them were not measured on that step, counted under ``ghosts/no_<count>``.
TOKEN_COUNTS = tuple(dict.fromkeys(radius.tokens for radius in RADIUS_TABLE if radius.tokens is not None))


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the controller saw it (:attr:`RhoController.last`).

    ``r = |u| / rho`` of the proposed update, ``r_applied = scale * r``; ``rho`` (the least LIMITING radius) is
    ``None`` until a radius was ever measured (a zero first update); ``target`` is the ``r*`` the step was held to
    (in ``"set"`` mode ``r_target * lr(t) / peak lr``). ``radii`` (limiting and watched, by field: ``record.rho_out``),
    ``bottleneck`` (the limiting radius that bound), ``would_bind`` (the watched radius below every limiting
    one, if any), ``would_clip`` (``r > r_target``), the position counts and ``rho_attn_heads``
    (``[layers, heads]``) only on probed steps. ``skipped`` names what was non-finite (``"gradient"``,
    ``"update"``, ``"radius"``) on a step the controller skipped; ``would_skip`` the same in ``"monitor"``
    mode, which skips nothing. ``output_tokens``, ``attention_tokens`` and ``ffn_tokens`` count the positions the
    output, attention and FFN radii were taken over (0: not measured, and left out of ``radii``); ``fd_step``, ``fd_error`` and ``fd_fallback`` are fd's step, its estimated relative error
    and whether jvp stood in for it (:class:`~hf_ghosts.probe.fd.FdStepControl`), on probed fd steps.
    A step taken block-wise (``granularity="blocks"``, :mod:`hf_ghosts.blocks`) has ``scale = |applied| / |u|`` (the
    fraction of the update kept), ``r_applied`` as measured along the applied step, ``block_probes`` (the
    measurements it took: blocks and the applied step) and ``block_scales`` (the scale applied to each block kind).
    """

    step: int
    update_norm: float
    r: float = 0.0
    r_applied: float = 0.0
    scale: float = 1.0
    rho: float | None = None
    probed: bool = False
    clipped: bool = False
    skipped: str | None = None
    radii: Mapping[str, float] | None = None
    rho_out_bound: float | None = None
    bottleneck: str | None = None
    would_bind: str | None = None
    would_clip: bool | None = None
    would_skip: str | None = None
    target: float | None = None
    output_tokens: int | None = None
    rho_attn_heads: torch.Tensor | None = None
    ffn_tokens: int | None = None
    fd_step: float | None = None
    fd_error: float | None = None
    fd_fallback: bool | None = None
    attention_tokens: int | None = None
    block_probes: int | None = None
    block_scales: Mapping[str, float] | None = None

    def __getattr__(self, name: str) -> float | None:
        """``record.rho_out``, ``record.rho_attn``, ...: a measured radius by its field (:data:`RADIUS_TABLE`), or
        ``None`` when it was not measured on this step."""
        if name in _RADIUS_FIELD_NAMES:
            return (self.__dict__.get("radii") or {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def scalars(self) -> dict[str, Any]:
        """The fields that are set, the radii by their fields, without the per-head tensor (JSON-ready)."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "radii":
                values.update(value or {})
            elif f.name == "block_scales":
                values.update({f"block_scale/{kind}": scale for kind, scale in (value or {}).items()})
            elif value is not None and f.name != "rho_attn_heads":
                values[f.name] = value
        return values

    def with_report(self, report: RadiusReport, limiting: tuple[str, ...] | None = None) -> StepRecord:
        """This record with what a probe measured: the radii, ``bottleneck`` among the ``limiting`` radii (default:
        all measured), ``would_bind`` (a watched radius below them), the position counts (a radius over none is left
        out, and so are its per-head radii or bound; ``rho`` is ``None`` when no limiting radius was measured),
        per-head radii, fd's step, error and fallback."""
        radii, unmeasured = report.radii(), report.unmeasured()
        measured = {RADIUS_FIELDS[name]: float(value) for name, value in radii.items() if name not in unmeasured}
        limiting = tuple(radii) if limiting is None else limiting
        least = report.bottleneck_of()
        would_bind = least if least not in limiting and least != "none" else None
        heads = None if report.attn_spread is None or "attention" in unmeasured else report.rho_attn.float().cpu()
        bound = None if report.out_radius is None or "output" in unmeasured else float(report.rho_out_bound)
        counts = {name: None if getattr(report, name) is None else int(getattr(report, name)) for name in TOKEN_COUNTS}
        fd = {name: None if getattr(report, name) is None else float(getattr(report, name))
              for name in ("fd_step", "fd_error", "fd_fallback")}
        rho = None if all(name in unmeasured for name in limiting) else self.rho  # nothing limiting was measured
        return replace(
            self, rho=rho, bottleneck=report.bottleneck_of(limiting), would_bind=would_bind, rho_attn_heads=heads,
            rho_out_bound=bound, radii=measured, **counts, fd_step=fd["fd_step"], fd_error=fd["fd_error"],
            fd_fallback=None if fd["fd_fallback"] is None else fd["fd_fallback"] > 0,
        )


@dataclass(frozen=True)
class LoggedKey:
    """One logged key: its name, meaning and aggregation as the README shows them.

    ``field``: the :class:`StepRecord` field that ``"max"`` / ``"min"`` reduce over
    the steps where it is set; ``None`` for the keys counted by :class:`MetricWindow` itself.
    """

    key: str
    meaning: str
    aggregation: str
    field: str | None = None


LOGGED_KEYS: tuple[LoggedKey, ...] = (
    LoggedKey("ghosts/r", "normalized step of the optimizer's proposed update, `|u| / rho`, before control", "max", "r"),
    LoggedKey("ghosts/r_applied", "normalized step actually applied, `scale * r` (block-wise: measured along it)", "max",
              "r_applied"),
    LoggedKey("ghosts/rho", "binding radius, min of the limiting radii (`rho_radii`)", "min", "rho"),
    *(LoggedKey(radius.key, radius.meaning, "min", radius.field) for radius in RADIUS_TABLE),
    LoggedKey(
        "ghosts/rho_out_bound", "`pi / max Delta_out`, with `rho_radius=\"topk_exact\"` (how much the exact radius gained)",
        "min", "rho_out_bound",
    ),
    LoggedKey(
        "ghosts/scale", "factor applied to the update (1.0 when not clipped); on a block-wise step the fraction kept, "
        "`|applied| / |u|`", "min", "scale",
    ),
    LoggedKey("ghosts/update_norm", "`|u|` of the proposed update", "max", "update_norm"),
    LoggedKey("ghosts/clipped", "fraction of probed steps that were clipped", "fraction"),
    LoggedKey("ghosts/probed", "fraction of steps measured afresh (the others reused the last `rho`)", "fraction"),
    LoggedKey("ghosts/skipped_nonfinite", "steps skipped because the gradient, update or radius was NaN/inf", "count"),
    LoggedKey(
        "ghosts/would_skip", "steps with a NaN/inf gradient, update or radius that monitoring let stand (clip or set would "
        "have skipped them)", "count",
    ),
    LoggedKey("ghosts/would_clip", "fraction of probed steps whose proposed `r` exceeds `rho_target`", "fraction"),
    LoggedKey("ghosts/bottleneck/{radius}", "probed steps on which this limiting radius bound (each of `rho_radii`)", "count"),
    LoggedKey(
        "ghosts/would_bind/{radius}", "probed steps on which this watched radius was below every limiting one (each of "
        "`rho_watch_radii`)", "count",
    ),
    LoggedKey(
        "ghosts/no_output_tokens", "probed steps whose batch had no label other than `-100` (output radius not measured: "
        "not logged, not limiting)", "count, when > 0",
    ),
    LoggedKey(
        "ghosts/no_attention_tokens", "probed steps whose batch had no unmasked position (attention radii not measured: "
        "not logged, not limiting)", "count, when > 0",
    ),
    LoggedKey(
        "ghosts/no_ffn_tokens", "probed steps whose batch had no unmasked position (FFN radii not measured: not logged, "
        "not limiting)", "count, when > 0",
    ),
    LoggedKey(
        "ghosts/fd_step", "step `h` of fd's central differences as its error check chose it (at most `rho_fd_step`, "
        "unless the rounding guard widened it)", "min", "fd_step",
    ),
    LoggedKey("ghosts/fd_error", "fd's estimated relative error of the spreads at that step (from its last check)", "max",
              "fd_error"),
    LoggedKey(
        "ghosts/fd_fallback", "probed steps measured by jvp because fd's estimated error exceeded 1% (warned once)",
        "count, with fd",
    ),
    LoggedKey(
        "ghosts/block_probes", "measurements spent on block-wise steps (each moving block's spreads where due, and the "
        "applied step), with `rho_granularity=\"blocks\"`", "count, with blocks",
    ),
    LoggedKey(
        "ghosts/block_scale/{kind}", "scale applied to this kind's part of the update on block-wise steps ("
        + ", ".join(f"`{kind}`" for kind in BLOCK_KINDS) + "; 0: left out)", "min",
    ),
    LoggedKey("ghosts/rho_attn/layer_{l}/head_{h}", "per-head radius, with `rho_log_per_head`", "min"),
)

_EXTREMA = tuple(key for key in LOGGED_KEYS if key.field is not None)


class MetricWindow:
    """The steps since the last log, reduced as :data:`LOGGED_KEYS` says.

    Skipped steps count only in ``skipped_nonfinite`` (``would_skip`` in monitor mode); ``clipped`` = clipped /
    probed steps, ``would_clip`` likewise, ``probed`` = probed / other steps; ``bottleneck/<radius>`` for each of
    ``radii`` and ``would_bind/<radius>`` for each of ``watch_radii`` count probed steps; per-head radii
    (``per_head``) are the elementwise min over the probed steps; with ``blocks``, ``block_probes`` is their sum and
    ``block_scale/<kind>`` the min over the block-wise steps.
    """

    def __init__(self, per_head: bool = False, radii: tuple[str, ...] = (), watch_radii: tuple[str, ...] = (),
                 blocks: bool = False) -> None:
        self.per_head, self.blocks = per_head, blocks
        self.radii, self.watch_radii = tuple(radii), tuple(watch_radii)
        self.reset()

    def reset(self) -> None:
        self.maxima: dict[str, float] = {}
        self.minima: dict[str, float] = {}
        self.head_minima: torch.Tensor | None = None
        self.steps = 0
        self.probed = 0
        self.clipped = 0
        self.skipped_nonfinite = 0
        self.not_measured = dict.fromkeys(TOKEN_COUNTS, 0)  # probed steps by the position count that was 0
        self.fd_probed = 0
        self.fd_fallback = 0
        self.would_skip = 0
        self.would_clip = 0
        self.bottleneck: dict[str, int] = {}
        self.would_bind: dict[str, int] = {}
        self.block_probes = 0
        self.block_scales: dict[str, float] = {}

    def add(self, record: StepRecord) -> None:
        """Take one optimizer step's record into the window."""
        if record.skipped is not None:
            self.skipped_nonfinite += 1
            return
        if record.would_skip is not None:
            self.would_skip += 1
            return
        self.steps += 1
        for spec in _EXTREMA:
            value = getattr(record, spec.field)
            if value is None:
                continue
            if spec.aggregation == "max":
                self.maxima[spec.field] = max(self.maxima.get(spec.field, -math.inf), value)
            else:
                self.minima[spec.field] = min(self.minima.get(spec.field, math.inf), value)
        if not record.probed:
            return
        self.block_probes += record.block_probes or 0
        for kind, scale in (record.block_scales or {}).items():
            self.block_scales[kind] = min(self.block_scales.get(kind, math.inf), scale)
        self.probed += 1
        self.clipped += int(record.clipped)
        self.would_clip += int(bool(record.would_clip))
        if record.bottleneck is not None:
            self.bottleneck[record.bottleneck] = self.bottleneck.get(record.bottleneck, 0) + 1
        if record.would_bind is not None:
            self.would_bind[record.would_bind] = self.would_bind.get(record.would_bind, 0) + 1
        for count in TOKEN_COUNTS:
            self.not_measured[count] += int(getattr(record, count) == 0)
        if record.fd_step is not None:
            self.fd_probed += 1
            self.fd_fallback += int(bool(record.fd_fallback))
        heads = record.rho_attn_heads
        if heads is not None:
            self.head_minima = heads if self.head_minima is None else torch.minimum(self.head_minima, heads)

    def pop(self) -> dict[str, float]:
        """The ``ghosts/*`` metrics of the window, then an empty window."""
        metrics = {}
        for spec in _EXTREMA:
            value = (self.maxima if spec.aggregation == "max" else self.minima).get(spec.field)
            if value is not None:
                metrics[spec.key] = value
        if self.probed:
            metrics["ghosts/clipped"] = self.clipped / self.probed
            metrics["ghosts/would_clip"] = self.would_clip / self.probed
            for name in self.radii:
                metrics[f"ghosts/bottleneck/{name}"] = float(self.bottleneck.get(name, 0))
            for name in self.watch_radii:
                metrics[f"ghosts/would_bind/{name}"] = float(self.would_bind.get(name, 0))
        if self.steps:
            metrics["ghosts/probed"] = self.probed / self.steps
        metrics["ghosts/skipped_nonfinite"] = float(self.skipped_nonfinite)
        metrics["ghosts/would_skip"] = float(self.would_skip)
        for count, steps in self.not_measured.items():
            if steps:
                metrics[f"ghosts/no_{count}"] = float(steps)
        if self.fd_probed:
            metrics["ghosts/fd_fallback"] = float(self.fd_fallback)
        if self.blocks:
            metrics["ghosts/block_probes"] = float(self.block_probes)
            metrics.update({f"ghosts/block_scale/{kind}": scale for kind, scale in self.block_scales.items()})
        if self.per_head and self.head_minima is not None:
            for layer, row in enumerate(self.head_minima.tolist()):
                for head, value in enumerate(row):
                    metrics[f"ghosts/rho_attn/layer_{layer}/head_{head}"] = value
        self.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The open window, JSON-ready (saved with the controller, so a resumed run logs what it would have); the
        block-wise keys only with ``blocks`` (a global run's state is what it was before they existed)."""
        return {
            "maxima": dict(self.maxima),
            "minima": dict(self.minima),
            "head_minima": None if self.head_minima is None else self.head_minima.tolist(),
            "steps": self.steps,
            "probed": self.probed,
            "clipped": self.clipped,
            "skipped_nonfinite": self.skipped_nonfinite,
            **{f"no_{count}": steps for count, steps in self.not_measured.items()},
            "fd_probed": self.fd_probed,
            "fd_fallback": self.fd_fallback,
            "would_skip": self.would_skip,
            "would_clip": self.would_clip,
            "bottleneck": dict(self.bottleneck),
            "would_bind": dict(self.would_bind),
            **({"block_probes": self.block_probes, "block_scales": dict(self.block_scales)} if self.blocks else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.maxima = dict(state["maxima"])
        self.minima = dict(state["minima"])
        heads = state["head_minima"]
        self.head_minima = None if heads is None else torch.tensor(heads, dtype=torch.float32)
        self.steps = state["steps"]
        self.probed = state["probed"]
        self.clipped = state["clipped"]
        self.skipped_nonfinite = state["skipped_nonfinite"]
        self.not_measured = {count: state[f"no_{count}"] for count in TOKEN_COUNTS}
        self.fd_probed, self.fd_fallback = state["fd_probed"], state["fd_fallback"]
        self.would_skip = state["would_skip"]
        self.would_clip = state["would_clip"]
        self.bottleneck = dict(state["bottleneck"])
        self.would_bind = dict(state["would_bind"])
        if self.blocks:
            self.block_probes, self.block_scales = state["block_probes"], dict(state["block_scales"])


def define_wandb_metrics(args: TrainingArguments) -> bool:
    """Plot ``train/ghosts/*`` against ``train/global_step`` in the active W&B run; True once done. wandb is imported
    only when ``args.report_to`` names it (the ``wandb`` extra)."""
    if "wandb" not in (args.report_to or []) or not args.should_log:
        return True
    wandb = require("wandb", extra="wandb")

    if wandb.run is None:
        return False
    wandb.define_metric("train/global_step")
    wandb.define_metric("train/ghosts/*", step_metric="train/global_step")
    return True
