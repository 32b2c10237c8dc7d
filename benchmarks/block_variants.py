"""The variants of ``benchmarks/block_study.py``: the product's block step (:class:`hf_ghosts.blocks.BlockStep`) with
another grouping, allocation rule, refresh period, mix or number of passes; everything else is the product's.

A variant is ``<grouping>-<rule>[-global][-r<N>][-p<P>][-m<percent>]`` (:meth:`Variant.parse`):

- grouping: ``kinds`` (the product's :meth:`~hf_ghosts.blocks.ParameterBlocks.of`: embeddings; q/k of all layers; v/o
  of all layers; MLP; the layers' norms; the final norm; the head), ``two`` (embeddings / the rest), ``layers`` (the
  kinds q/k, v/o, MLP and norms split per layer: ``L0.qk``, ...; 4 L + 3 blocks). A fused q/k/v projection is split
  by the product's table (:func:`~hf_ghosts.architectures.fused_qkv_split`) in every grouping but ``two``.
- rule, under the one constraint ``sum_b s_b C_b <= pi r*`` (``C_b = max_j D_bj``; ``d_b = -g . u_b``; blocks with
  ``d_b <= 0`` get 0): ``prop2`` the product's :func:`~hf_ghosts.radii.block_allocation` (``max sum_b d_b sqrt(s_b)``),
  ``knapsack`` (``max sum_b d_b s_b``: by ``d_b / C_b``, winner-take-all), ``prop`` (``max sum_b d_b log s_b``: budget
  shares by ``d_b``), ``sqrt`` (``max sum_b sqrt(d_b) log s_b``: budget shares by ``sqrt(d_b)``); ``prop``, ``sqrt``
  and ``prop2`` water-filled alike. ``lp``: ``max sum_b d_b s_b`` under one constraint per softmax instance
  (``scipy.optimize.linprog``; refused where scipy is not installed).
- ``global``: blocks with ``d_b <= 0`` get the global clip's scale, reserved from the budget first (else 0).
- ``r<N>``: the block spreads measured on every N-th block step (the product's ``block_refresh``; default 1).
- ``m<percent>``: the scales ``a s_global + (1 - a) s`` with ``a = percent / 100`` (the global clip's step and the block step;
  the spread is convex, so the mixture is within the budget before it is measured).
- ``p<P>``: ``P - 1`` extra passes: ``w`` measured, the spreads calibrated by ``r(w) / bound``, the scales chosen again.

``kinds-prop2-r<block_refresh>`` is the product's ``rho_granularity="blocks"`` step itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

import hf_ghosts.trainer as trainer_module
from hf_ghosts import RhoController
from hf_ghosts.blocks import BlockOutcome, BlockStep, ParameterBlocks
from hf_ghosts.policy import step_scale
from hf_ghosts.probe.blocks import block_estimate
from hf_ghosts.radii import block_allocation, normalized_step, spread_bound

GROUPINGS = ("two", "kinds", "layers")
RULES = ("knapsack", "lp", "prop", "sqrt", "prop2")
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")  # a parameter inside a numbered layer
PER_LAYER = ("qk", "vo", "mlp", "norm")  # the kinds ``layers`` splits per layer


# --------------------------------------------------------------------------------------------- groupings
def _two(name: str, kind: str) -> str:
    return "embed" if kind == "embed" else "rest"


def _layers(name: str, kind: str) -> str:
    found = LAYER.search(name)
    return f"L{found.group(1)}.{kind}" if kind in PER_LAYER and found else kind


def regroup(blocks: ParameterBlocks, label: Callable[[str, str], str]) -> ParameterBlocks:
    """``blocks`` (the product's, by kind) with each parameter's part of kind ``k`` put in block ``label(name, k)``;
    the labels in order of first appearance (a fused q/k/v: q/k first). Every element stays in exactly one block."""
    index: dict[str, int] = {}
    where: list[Any] = []
    for name, at in zip(blocks.names, blocks.where, strict=True):
        if isinstance(at, int):
            where.append(index.setdefault(label(name, blocks.kinds[at]), len(index)))
            continue
        new = {b: index.setdefault(label(name, blocks.kinds[b]), len(index)) for b in at.members}
        members = tuple(dict.fromkeys(new.values()))
        if len(members) == 1:
            where.append(members[0])
        else:  # the product's split of a fused projection, its slices relabelled
            lookup = torch.tensor([new.get(b, -1) for b in range(len(blocks.kinds))], device=at.index.device)
            where.append(replace(at, index=lookup[at.index], members=members))
    return ParameterBlocks(blocks.names, tuple(index), tuple(where))


def grouped(blocks: ParameterBlocks, grouping: str) -> ParameterBlocks:
    """The product's ``blocks`` (by kind) regrouped as ``grouping`` says (``kinds``: themselves)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouped: grouping {grouping!r}; expected one of {GROUPINGS}")
    return blocks if grouping == "kinds" else regroup(blocks, _two if grouping == "two" else _layers)


def grouping_blocks(model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                    grouping: str) -> ParameterBlocks:
    """The blocks of ``grouping`` over the parameters ``names`` (``params``) of ``model``."""
    return grouped(ParameterBlocks.of(model, names, params), grouping)


# --------------------------------------------------------------------------------------------- the rules (pure)
def knapsack_scales(values: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Fractional knapsack: blocks with ``values > 0`` in order of ``value / cost``, each taken up to 1 while the budget
    lasts (``sum_b s_b costs_b <= budget``); a positive block of zero cost is taken whole. Others get 0.

    Example: ``knapsack_scales([3, 1, -1], [1, 1, 1], 1.5)`` is ``[1, 0.5, 0]``.
    """
    values, costs = np.asarray(values, float), np.asarray(costs, float)
    scales = np.zeros_like(values)
    remaining = max(float(budget), 0.0)
    positive = values > 0
    scales[positive & (costs <= 0)] = 1.0
    order = [b for b in np.argsort(-values / np.maximum(costs, 1e-300)) if positive[b] and costs[b] > 0]
    for b in order:
        take = min(1.0, remaining / costs[b])
        scales[b] = take
        remaining -= take * costs[b]
        if remaining <= 0:
            break
    return scales


def prop_scales(values: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Proportional allocation: ``max sum_b values_b log s_b`` subject to ``sum_b s_b costs_b <= budget``, ``s_b <= 1``,
    over the blocks with ``values > 0`` (others 0). KKT: ``s_b = min(1, values_b / (lambda costs_b))``, so
    ``s_b = left values_b / (costs_b sum_free values)`` water-filled: blocks whose share reaches 1 get 1 and leave the
    rest of the budget (``left``) to the others. A positive block of zero cost gets 1 and uses no budget.

    Example: ``prop_scales([3, 1, -1], [1, 1, 1], 1)`` is ``[0.75, 0.25, 0]``; with budget 1.6 it is ``[1, 0.6, 0]``.
    """
    values, costs = np.asarray(values, float), np.asarray(costs, float)
    scales = np.zeros_like(values)
    positive = values > 0
    scales[positive & (costs <= 0)] = 1.0
    free = positive & (costs > 0)
    left = max(float(budget), 0.0)
    while free.any():
        which = np.flatnonzero(free)
        share = left * values[which] / (costs[which] * values[which].sum())
        over = share >= 1.0
        if not over.any():
            scales[which] = share
            break
        capped = which[over]
        scales[capped] = 1.0
        left = max(left - float(costs[capped].sum()), 0.0)
        free[capped] = False
    return scales


def lp_scales(values: np.ndarray, spreads: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """``max sum_b s_b values_b`` subject to ``spreads^T s <= budget`` (one row per softmax instance), ``0 <= s <= 1``,
    over the blocks with ``values > 0`` (others 0), by ``scipy.optimize.linprog`` (HiGHS)."""
    from scipy.optimize import linprog

    values = np.asarray(values, float)
    scales = np.zeros_like(values)
    positive = np.flatnonzero(values > 0)
    if positive.size == 0:
        return scales
    result = linprog(-values[positive], A_ub=spreads[positive].T, b_ub=np.maximum(budget, 0.0),
                     bounds=[(0.0, 1.0)] * positive.size, method="highs")
    if not result.success:
        raise RuntimeError(f"lp_scales: linprog failed: {result.message}")
    scales[positive] = np.clip(result.x, 0.0, 1.0)
    return scales


def choose_scales(values: np.ndarray, spreads: np.ndarray, budget: float, rule: str, nonpositive: str = "zero",
                  global_scale: float = 0.0) -> np.ndarray:
    """Per-block scales with ``max_j (spreads^T s)_j <= budget`` (``spreads``: ``[blocks, instances]``): ``rule`` over
    the blocks of positive ``values``; the others get 0 (``nonpositive="zero"``) or ``global_scale`` reserved first
    (``"global"``, shrunk to fit)."""
    values, spreads = np.asarray(values, float), np.asarray(spreads, float)
    reserved = np.zeros(spreads.shape[0])
    if nonpositive == "global":
        reserved[values <= 0] = global_scale
        used = float((reserved @ spreads).max(initial=0.0))
        if used > budget:
            reserved *= budget / used
    left = budget - reserved @ spreads  # per instance
    room = float(left.min(initial=budget))
    costs = spreads.max(axis=1) if spreads.shape[1] else np.zeros(spreads.shape[0])
    d = np.maximum(values, 0.0)
    if rule == "knapsack":
        chosen = knapsack_scales(values, costs, room)
    elif rule == "lp":
        chosen = lp_scales(values, spreads, left)
    elif rule == "prop2":  # the product's rule
        chosen = block_allocation(torch.from_numpy(values), torch.from_numpy(costs), room).numpy()
    elif rule in ("prop", "sqrt"):  # the same water-filling, budget shares by d or sqrt(d)
        chosen = prop_scales(np.where(values > 0, d if rule == "prop" else np.sqrt(d), values), costs, room)
    else:
        raise ValueError(f"choose_scales: rule {rule!r}; expected one of {RULES}")
    return np.where(values > 0, chosen, reserved)


# --------------------------------------------------------------------------------------------- the variant
def scipy_installed() -> bool:
    """Whether ``scipy`` (the ``lp`` rule's ``linprog``) can be imported."""
    return importlib.util.find_spec("scipy") is not None


@dataclass(frozen=True)
class Variant:
    """A block-wise setting: grouping, rule, what non-positive blocks get, refresh period, passes, mix."""

    grouping: str
    rule: str = "prop2"
    nonpositive: str = "zero"
    refresh: int = 1
    passes: int = 1
    mix: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``<grouping>-<rule>[-global][-r<N>][-p<P>][-m<percent>]`` (``kinds-prop2-r4``, ``layers-lp-global``)."""
        grouping, rule, *rest = text.split("-") if "-" in text else (text, "")
        options: dict[str, Any] = {}
        for item in rest:
            if item == "global":
                options["nonpositive"] = "global"
            elif re.fullmatch(r"r[1-9]\d*", item):
                options["refresh"] = int(item[1:])
            elif re.fullmatch(r"p[1-9]\d*", item):
                options["passes"] = int(item[1:])
            elif re.fullmatch(r"m\d+", item) and int(item[1:]) <= 100:
                options["mix"] = int(item[1:]) / 100
            else:
                raise ValueError(f"Variant.parse: unknown option {item!r} in {text!r}; expected global, r<N>, p<P> or "
                                 "m<percent> (N, P >= 1, percent <= 100)")
        if grouping not in GROUPINGS or rule not in RULES:
            raise ValueError(f"Variant.parse: {text!r} is no variant: <grouping>-<rule>[-options] with grouping in "
                             f"{GROUPINGS} and rule in {RULES} (or 'adamw', 'rho')")
        if rule == "lp" and not scipy_installed():
            raise ValueError(f"Variant.parse: {text!r}: the rule 'lp' needs scipy (scipy.optimize.linprog), which is not "
                             "installed; pip install scipy, or use another rule (knapsack, prop, sqrt, prop2)")
        return cls(grouping, rule, **options)


# --------------------------------------------------------------------------------------------- the step
class StudyBlockStep(BlockStep):
    """The product's :class:`~hf_ghosts.blocks.BlockStep` with the blocks of ``variant.grouping`` and its scales chosen
    by ``variant`` (:meth:`allocate`); ``detail`` holds what the last :meth:`step` chose (``None`` after a skipped or
    unclipped step, ``{"fallback": True}`` where no block lowered the loss and the global scale stood).

    ``rho_now`` returns the radius along ``u`` the controller measured for this step (the global clip's scale, for
    ``mix`` and ``global``).
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor], variant: Variant,
                 rho_now: Callable[[], float], rescale_moments: bool = False) -> None:
        super().__init__(model, names, params, variant.refresh, rescale_moments)
        self.variant, self.rho_now, self.detail = variant, rho_now, None
        self.blocks = grouped(self.blocks, variant.grouping)
        self.reset()

    def step(self, probe: Any, batch: Any, old: Sequence[torch.Tensor], current: Sequence[torch.Tensor],
             update: Sequence[torch.Tensor], norm: float, target: float, radii: Sequence[str], *,
             reduce: Callable[[Any], Any], optimizer: Any = None) -> BlockOutcome | None:
        """The product's step (:meth:`BlockStep.step`); the chosen scales recorded in :attr:`detail`."""
        self._context = (probe, batch, old, update, radii, reduce)
        self._global = float(step_scale(norm, self.rho_now(), target, "clip"))
        self._chosen, self._extra = None, 0
        outcome = super().step(probe, batch, old, current, update, norm, target, radii, reduce=reduce,
                               optimizer=optimizer)
        if outcome is None or outcome.skipped:
            self.detail = {"fallback": True, "global_scale": self._global} if outcome is None else None
            return outcome
        decrease, spreads, scales = self._chosen
        top = int(scales.argmax())
        c = outcome.scales[self.blocks.kinds[top]] / float(scales[top])  # block_scale_up's factor, from the outcome
        self.detail = {
            "c": c, "r_w": outcome.r_applied / c, "bound": float(spread_bound(scales, spreads)) / math.pi,
            "global_scale": self._global, "fallback": False, "decrease_kept": c * float(scales @ decrease),
            "decrease_global": self._global * float(decrease.sum()), "decrease_full": float(decrease.sum()),
            "scales": dict(outcome.scales),
        }
        return replace(outcome, probes=outcome.probes + self._extra)

    def allocate(self, decrease: torch.Tensor, spreads: torch.Tensor, budget: float) -> torch.Tensor:
        """The variant's scales (module docstring): its rule, then the mix, then the extra passes."""
        variant, g = self.variant, self._global
        scales = choose_scales(decrease.numpy(), spreads.numpy(), budget, variant.rule, variant.nonpositive, g)
        if variant.mix:  # a convex combination of two steps within the budget is within it
            scales = variant.mix * g + (1 - variant.mix) * scales
        for _ in range(variant.passes - 1):
            r_w = self._measure(torch.from_numpy(scales))
            bound = float(spread_bound(torch.from_numpy(scales), spreads)) / math.pi
            if r_w > 0 and bound > 0:  # the bound calibrated by the measurement
                scales = choose_scales(decrease.numpy(), spreads.numpy() * (r_w / bound), budget, variant.rule,
                                       variant.nonpositive, g)
        chosen = torch.from_numpy(np.asarray(scales, dtype=np.float64))
        self._chosen = (decrease, spreads, chosen)
        return chosen

    def _measure(self, scales: torch.Tensor) -> float:
        """``r(w)`` of ``w = sum_b s_b u_b`` at the old weights, measured as the product measures it (one probe)."""
        probe, batch, old, update, radii, reduce = self._context
        estimator, fd_step = block_estimate(probe)
        at = dict(zip(self.blocks.names, old, strict=True))
        _, w_norm, rho = self._measure_combined(probe, batch, at, update, scales, radii, estimator, fd_step, reduce)
        self._extra += 1
        return float(normalized_step(w_norm, rho))


class StudyController(RhoController):
    """The product's controller, its block step the ``variant``'s (``None``: the global clip); every step that was
    taken is traced (``trace``: ``r``, ``kept``, ``r_applied``, ``probes``, ``clipped``, ``probed``, and what the block
    step chose)."""

    def __init__(self, *args: Any, variant: Variant | None, **kwargs: Any) -> None:
        self.variant = variant
        super().__init__(*args, **kwargs)

    def rebind(self, model: torch.nn.Module) -> None:
        super().rebind(model)
        if self.variant is not None:
            if self.block_step is None:
                raise ValueError("StudyController: a block variant needs granularity='blocks'")
            self.block_step = StudyBlockStep(self.probe.model, self.names, self.params, self.variant,
                                             lambda: self.last_rho, self.settings.rescale_moments)

    def reset(self) -> None:
        super().reset()
        self.trace: list[dict[str, Any]] = []

    @torch.no_grad()
    def after_step(self) -> None:
        if isinstance(self.block_step, StudyBlockStep):
            self.block_step.detail = None
        super().after_step()
        record = self.last
        if record.skipped or record.update_norm == 0.0:
            return
        entry = {"step": record.step, "r": record.r, "kept": record.scale, "r_applied": record.r_applied,
                 "probes": int(record.probed) + (record.block_probes or 0), "clipped": record.clipped,
                 "probed": record.probed}
        if isinstance(self.block_step, StudyBlockStep) and self.block_step.detail is not None:
            entry.update(self.block_step.detail)
        self.trace.append(entry)


@contextlib.contextmanager
def study_controllers(variant: Variant | None) -> Iterator[list[StudyController]]:
    """While open, ``RhoTrainer`` builds a :class:`StudyController` of ``variant``; yields the ones built."""
    built: list[StudyController] = []

    def factory(*args: Any, **kwargs: Any) -> StudyController:
        built.append(StudyController(*args, variant=variant, **kwargs))
        return built[-1]

    saved = trainer_module.RhoController
    trainer_module.RhoController = factory
    try:
        yield built
    finally:
        trainer_module.RhoController = saved
