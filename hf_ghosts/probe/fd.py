"""The ``fd`` path: central differences, their rounding guard, and the step control that bounds their error.

:func:`fd_spreads` takes ``a = (z(theta + h v) - z(theta - h v)) / 2h`` from two forwards; :func:`fd_wider_step` says
when rounding swamps the differences (the probe then measures once more at a wider ``h``). The truncation error is
``a_h - a = c h^2 + O(h^4)``: small where the network is smooth along ``v``, 10-40% at ``h = 0.01`` where a norm after
the attention or MLP output rescales a still tiny output (Gemma2/3, OLMo2 near initialization). :class:`FdStepControl`
estimates it from two steps ``h1 > h2`` (:func:`step_errors`), shrinks ``h`` until it is at most :data:`FD_TOLERANCE`,
and where that cannot be reached within :data:`FD_ERROR_LIMIT` falls back to the JVP (or says so).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from hf_ghosts.probe.attention import Pass
from hf_ghosts.probe.core import Session, Tensors, shifted_weights
from hf_ghosts.probe.head import LinearHead, fd_head_rows, fd_spread, full_rows
from hf_ghosts.probe.report import RadiusReport
from hf_ghosts.radii import spread
from hf_ghosts.settings import RADIUS_TABLE

__all__ = [
    "FD_CHECK_EVERY",
    "FD_ERROR_LIMIT",
    "FD_MAKEUP_CHANGE",
    "FD_MAX_STEP_RADII",
    "FD_MIN_STEP_SHARE",
    "FD_ROUNDING",
    "FD_ROUNDING_TOLERANCE",
    "FD_TOLERANCE",
    "FD_TRIES",
    "FdStepControl",
    "fd_spreads",
    "fd_wider_step",
    "step_errors",
]

logger = logging.getLogger(__name__)

# fd's rounding guard (fd_wider_step): rounding of the logits in units of eps |z|, the share of the
# largest spread it may take, and the widest step as a share of the radius measured.
FD_ROUNDING = 4.0
FD_ROUNDING_TOLERANCE = 1e-3
FD_MAX_STEP_RADII = 0.1
# fd's step control (FdStepControl): the estimated relative error of the spreads a step is accepted at; the error
# beyond which fd gives way to the JVP; probes between two checks; the change of the direction's make-up (total
# variation of the shares of |d|^2 per tensor) that checks afresh; the smallest step as a share of fd_step; the
# further steps one check may try.
FD_TOLERANCE = 3e-3
FD_ERROR_LIMIT = 1e-2
FD_CHECK_EVERY = 8
FD_MAKEUP_CHANGE = 0.25
FD_MIN_STEP_SHARE = 1 / 64
FD_TRIES = 3
_SPREADS = tuple(radius.raw for radius in RADIUS_TABLE if radius.spread)  # the report fields fd's error is taken on


def fd_wider_step(plus: torch.Tensor, minus: torch.Tensor, per_position: torch.Tensor, fd_step: float) -> float | None:
    """A wider fd step ``h`` (``fd_step``) when rounding dominates the full head's logit differences; ``None``: keep it.

    The logits carry rounding of ~``FD_ROUNDING eps |z|`` (``eps`` of the forward's dtype), so a slope ``(z+ - z-) / 2h`` carries
    ``FD_ROUNDING eps max|z| / h``. Where that exceeds ``FD_ROUNDING_TOLERANCE`` of the largest spread (saturated
    softcapped logits: slopes tiny next to ``|z|``), ``h`` grows to bring it there, at most to
    ``FD_MAX_STEP_RADII`` of the radius just measured (the truncation error grows as ``(h / rho)^2``). One host
    sync; two more forwards only when it fires.
    """
    eps = torch.finfo(plus.dtype).eps
    largest = float(per_position.amax()) if per_position.numel() else 0.0  # host sync
    if not largest > 0:
        return None
    magnitude = float(torch.maximum(plus.abs().amax(), minus.abs().amax()))
    noise = FD_ROUNDING * eps * magnitude / fd_step
    if noise <= FD_ROUNDING_TOLERANCE * largest:
        return None
    wider = min(fd_step * noise / (FD_ROUNDING_TOLERANCE * largest), FD_MAX_STEP_RADII * math.pi / largest)
    return wider if wider > 2 * fd_step else None


def fd_spreads(
    run: Callable[[Tensors], torch.Tensor | None], session: Session, weights: Tensors, pieces: Tensors, norm: float,
    *, output: bool, linear_head: LinearHead | None, chunk: int, fd_step: float,
) -> torch.Tensor | None:
    """Per position, the spread of ``(z(theta + h v) - z(theta - h v)) / 2h`` (None: no output radius).

    Arguments as :func:`~hf_ghosts.probe.core.jvp_spreads`; ``fd_step`` is ``h``. With the full head,
    ``session.wider_step`` is set where rounding swamps the differences (:func:`fd_wider_step`).
    """
    scale = fd_step / norm  # theta +- h v = theta +- (h / |d|) d; one copy of the weights alive at a time
    plus = run(shifted_weights(weights, pieces, scale))
    session.begin(Pass.FD_MINUS)
    minus = run(shifted_weights(weights, pieces, -scale))
    if not output:
        return None
    if linear_head is None:  # difference in the forward's dtype: rounding to fp32 first costs eps / h
        slopes = (plus - minus) / (2 * fd_step)
        session.offer_rows(full_rows(slopes, plus, minus))
        per_position = spread(slopes.float(), dim=-1)
        session.wider_step = fd_wider_step(plus, minus, per_position, fd_step)
        return per_position
    weight, weight_step, bias, bias_step = linear_head.tensors(weights, pieces)
    session.offer_rows(fd_head_rows(*session.head_inputs, weight, bias, weight_step, bias_step, scale, fd_step))
    return fd_spread(
        *session.head_inputs, weight, bias, weight_step, bias_step, scale=scale, fd_step=fd_step, chunk=chunk,
    )


def step_errors(wide: RadiusReport, narrow: RadiusReport, h1: float, h2: float) -> tuple[float, float]:
    """The estimated relative errors of the spreads measured at ``h1 > h2``: with ``S_h = S + c h^2``,
    ``c h^2 = (S_h1 - S_h2) h^2 / (h1^2 - h2^2)``, relative to the largest spread of each radius (so a head's error
    is weighed against the binding head), max over the spread radii measured. NaN where a spread is NaN. One host sync.
    """
    changes = []
    for name in _SPREADS:
        first, second = getattr(wide, name), getattr(narrow, name)
        if first is None or second is None or second.numel() == 0:
            continue
        largest = second.float().amax()
        change = (first.float() - second.float()).abs().amax()
        changes.append(torch.where(largest > 0, change / largest, change))  # no spread at all: only noise
    if not changes:
        return 0.0, 0.0
    change = float(torch.stack(changes).amax())  # host sync
    gap = h1 * h1 - h2 * h2
    return change * h1 * h1 / gap, change * h2 * h2 / gap


# h -> (the report measured by fd at the step h, the rounding guard's wider h or None): a measurement with the step as
# its argument (RadiusProbe._measure_once), so the control changes nothing of the probe's
Measure = Callable[[float], tuple[RadiusReport, float | None]]


@dataclass
class FdStepControl:
    """The step of one probe's central differences, chosen so that the spreads' estimated error stays small.

    A check measures at ``h1`` (``fd_step`` on the first probe, later twice the step in use, at most ``fd_step``) and
    at ``h2 = h1 / 2``, and estimates both errors (:func:`step_errors`); it accepts the wider step whose error is at
    most :data:`FD_TOLERANCE`, else shrinks ``h`` by ``sqrt(FD_TOLERANCE / 2e)`` (``e ~ h^2``), at most
    :data:`FD_TRIES` times, never below ``FD_MIN_STEP_SHARE * fd_step`` nor below half a step the rounding guard
    widened, and stops where the error no longer falls (rounding). A check runs on the first probe, every
    :data:`FD_CHECK_EVERY` probes, and when the direction's make-up changes by :data:`FD_MAKEUP_CHANGE`; the probes in
    between measure at the accepted step (two forwards, as before) and carry the check's error. Where the accepted
    error exceeds :data:`FD_ERROR_LIMIT`, the probe measures by JVP until the next check (``forward_ad``; else the
    report keeps fd's error), with a warning once. ``agree`` makes a number the same on every rank (the sharded
    probe's forwards are collective, so every rank must take the same steps).
    """

    ceiling: float
    forward_ad: bool = True
    agree: Callable[[float], float] = float
    step: float | None = None
    error: float | None = None  # None: nothing to estimate it on (no output or attention radius measured)
    since_check: int = 0
    fallback: bool = False
    makeup: tuple[tuple[str, ...], torch.Tensor] | None = None
    warned: bool = False

    def measure(self, at: Measure, jvp: Callable[[], RadiusReport], pieces: Tensors) -> RadiusReport:
        """The report of this probe at the step the control chose: ``at(h)`` measures by fd at the step ``h`` it is
        given, ``jvp()`` by forward-mode AD; ``pieces`` is the direction (its make-up decides a check). The report
        carries the step (``fd_step``; also :attr:`step`), ``fd_error`` and ``fd_fallback``."""
        if self._due(pieces):
            report, self.step, self.error = self._check(at)
            used, self.since_check = self.step, 0
            failed = self.error is not None and self.error > FD_ERROR_LIMIT
            self.fallback = self.forward_ad and failed
            if failed:
                self._warn()
        else:
            self.since_check += 1
            report, used = (None, self.step) if self.fallback else self._guarded(at, self.step)
        if self.fallback:
            report = jvp()
        device = report.device
        return replace(
            report, fd_step=torch.tensor(used, dtype=torch.float64, device=device),
            fd_error=None if self.error is None else torch.tensor(self.error, dtype=torch.float64, device=device),
            fd_fallback=torch.tensor(float(self.fallback), device=device),
        )

    def reset(self) -> None:
        """The state of a fresh run: the next probe checks from ``ceiling``."""
        self.step, self.error, self.since_check, self.fallback, self.makeup, self.warned = None, None, 0, False, None, False

    def state_dict(self) -> dict[str, object]:
        """The control's state, JSON-ready (saved with the controller: a resumed run checks when it would have)."""
        names, shares = self.makeup if self.makeup is not None else ((), None)
        return {"step": self.step, "error": self.error, "since_check": self.since_check, "fallback": self.fallback,
                "warned": self.warned, "names": list(names), "shares": None if shares is None else shares.tolist()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.step, self.error, self.since_check = state["step"], state["error"], int(state["since_check"])
        self.fallback, self.warned = bool(state["fallback"]), bool(state["warned"])
        shares = state["shares"]
        self.makeup = None if shares is None else (tuple(state["names"]), torch.tensor(shares, dtype=torch.float64))

    def _due(self, pieces: Tensors) -> bool:
        """Whether this probe checks the step: the first, every ``FD_CHECK_EVERY``-th, or a changed make-up."""
        names = tuple(pieces)
        squares = torch.stack(torch._foreach_norm(list(pieces.values()))).double().pow(2)
        shares = squares / squares.sum().clamp_min(torch.finfo(torch.float64).tiny)
        if self.step is None or self.makeup is None or self.makeup[0] != names:
            due = True
        else:
            change = self.agree(float(0.5 * (shares - self.makeup[1]).abs().sum()))  # host sync (all ranks agree)
            due = self.since_check + 1 >= FD_CHECK_EVERY or change > FD_MAKEUP_CHANGE
        if due:
            self.makeup = (names, shares)
        return due

    def _guarded(self, at: Measure, step: float) -> tuple[RadiusReport, float]:
        """fd at ``step``, once more at the rounding guard's wider step where it fired (on any rank)."""
        report, wider = at(step)
        wider = self.agree(wider or 0.0)
        if wider > 0:
            report, _ = at(wider)
            return report, wider
        return report, step

    def _check(self, at: Measure) -> tuple[RadiusReport, float, float | None]:
        """The accepted (report, step, estimated error) of a check (error ``None``: no spread to check)."""
        start = self.ceiling if self.step is None else min(self.ceiling, 2 * self.step)
        wide, h1 = self._guarded(at, start)
        if all(getattr(wide, name) is None for name in _SPREADS):  # FFN radii only: nothing to estimate the error on
            return wide, h1, None
        # The narrowest step a further try may take (the first try halves h1 whatever the floor: it estimates the error).
        smallest = self.ceiling * FD_MIN_STEP_SHARE  # never below a fixed share of fd_step (rounding grows as 1 / h)
        widened = h1 / 2 if h1 > start else 0.0  # where the rounding guard widened h1, never below half of it
        floor = max(smallest, widened)  # a floor at or above the step in hand ends the check (h2 >= h1 below)
        best = None
        error1 = math.inf
        for _ in range(FD_TRIES + 1):
            if best is None:
                h2 = h1 / 2  # the first try halves the step
            else:  # the error falls as h^2: aim at half the tolerance, at least halving, never below the floor
                aimed = h1 * math.sqrt(FD_TOLERANCE / (2 * error1))
                h2 = max(floor, min(h1 / 2, aimed))
            if h2 >= h1:
                break
            narrow, _ = at(h2)
            error1, error2 = (self.agree(e) for e in step_errors(wide, narrow, h1, h2))
            if math.isnan(error1):  # NaN slopes: the radius is NaN whatever the step
                return narrow, h2, math.nan
            if error1 <= FD_TOLERANCE:
                return wide, h1, error1
            stalled = best is not None and error2 > 0.5 * best[2]  # not falling as h^2: rounding
            if best is None or error2 < best[2]:
                best = (narrow, h2, error2)
            if error2 <= FD_TOLERANCE or stalled:
                break
            wide, h1, error1 = narrow, h2, error2
        return best if best is not None else (wide, h1, math.nan)

    def _warn(self) -> None:
        if self.warned:
            return
        self.warned = True
        then = (
            "measuring by JVP (forward-mode AD) instead until the next check" if self.forward_ad
            else "this probe has no forward-mode AD (FSDP2), so its radii may be off by that much"
        )
        logger.warning(
            "hf_ghosts: fd's estimated error is %.2g at step h=%.3g along this direction (more than %g: the network "
            "bends sharply along it and rounding allows no smaller step); %s. Logged as ghosts/fd_error and "
            "ghosts/fd_fallback. (Warned once.)", self.error, self.step, FD_ERROR_LIMIT, then,
        )

