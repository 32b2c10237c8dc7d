"""The controller's policy as pure functions: when to probe, the step's target ``r*`` and its scale.

``scale = clip_scale(|u|, rho, r*, mode)`` (eq. 19), ``r*(t) = r_target * lr(t) / peak_lr`` in ``"set"`` mode, and a
probe whenever the last ``rho`` cannot be trusted for this step (:func:`probe_due`). No state, no tensors kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hf_ghosts.radii import clip_scale, normalized_step
from hf_ghosts.settings import DEFAULT_EVERY, DEFAULT_TRIGGER_GROWTH, DEFAULT_TRIGGER_R

__all__ = ["ProbeSchedule", "probe_due", "reused_scale", "scheduled_target", "step_scale"]


@dataclass(frozen=True)
class ProbeSchedule:
    """When a step is measured afresh instead of reusing the last ``rho`` (see :func:`probe_due`)."""

    every: int = DEFAULT_EVERY
    trigger_r: float = DEFAULT_TRIGGER_R
    trigger_growth: float = DEFAULT_TRIGGER_GROWTH


def probe_due(
    schedule: ProbeSchedule,
    steps_since_probe: int | None,
    growth: float,
    estimated_r_applied: float,
    r_target: float,
    mode: str = "clip",
) -> bool:
    """Whether a step must be probed: ``every == 1``, no usable last ``rho`` (``steps_since_probe is None``),
    ``steps_since_probe >= every``, ``|u| / |u_probe| > trigger_growth``, or (``"clip"`` and ``"set"`` only) the
    applied ``r`` estimated with the last ``rho`` above ``trigger_r * r_target``. The ``r`` trigger guards the
    rescale; ``"monitor"`` rescales nothing, so it probes every ``every`` steps and on growth only.

    Example (default triggers: ``trigger_r=0.5``, ``trigger_growth=2``):

    >>> probe_due(ProbeSchedule(every=16), 3, 1.1, 0.2, 1.0)
    False
    >>> probe_due(ProbeSchedule(every=16), 3, 2.5, 0.2, 1.0)  # |u| grew 2.5x
    True
    >>> probe_due(ProbeSchedule(every=16), 3, 1.1, 0.9, 1.0)  # r 0.9 > 0.5 * 1.0
    True
    >>> probe_due(ProbeSchedule(every=16), 3, 1.1, 0.9, 1.0, mode="monitor")
    False
    """
    if schedule.every == 1 or steps_since_probe is None:
        return True
    if steps_since_probe >= schedule.every or growth > schedule.trigger_growth:
        return True
    return mode != "monitor" and estimated_r_applied > schedule.trigger_r * r_target


def scheduled_target(r_target: float, lr: float | None, peak_lr: float | None) -> float:
    """``r*(t) = r_target * lr(t) / peak_lr``: warm-up and decay shape the step length; ``r_target`` when ``lr`` is
    unknown (``None``) or the peak unknown or zero.

    Example:

    >>> scheduled_target(1.0, 1e-4, 2e-4)
    0.5
    >>> scheduled_target(1.0, None, 2e-4)
    1.0
    """
    if lr is None or not peak_lr:
        return r_target
    return r_target * lr / peak_lr


def reused_scale(
    schedule: ProbeSchedule, mode: str, norm: float, target: float, last_rho: float | None,
    steps_since_probe: int | None, probe_norm: float,
) -> float | None:
    """The scale of a step of length ``|u| = norm`` that reuses ``last_rho`` (measured ``steps_since_probe`` steps ago,
    at ``|u_probe| = probe_norm``), or ``None`` where it must be probed (:func:`probe_due`, with ``growth = |u| /
    |u_probe|``, inf when 0, and the applied ``r`` estimated as ``scale * |u| / last_rho``). No probe yet (``None``)
    or a non-finite ``last_rho``: ``None``. ``target`` is the step's ``r*``.

    So a step reuses the last ``rho`` only while its applied ``r`` estimated with that ``rho`` is at most
    ``trigger_r * r_target`` (in ``"clip"`` mode it then passes unchanged), ``|u|`` is within ``trigger_growth`` of
    ``|u|`` at the last probe, and fewer than ``every`` steps have passed.

    Example (``r = 0.1``: reused at scale 1; ``r = 1.5 > 0.5 * 2``: probed):

    >>> reused_scale(ProbeSchedule(every=16), "clip", 0.1, 2.0, 1.0, 3, 0.1)
    1.0
    >>> reused_scale(ProbeSchedule(every=16), "clip", 0.15, 2.0, 0.1, 3, 0.1) is None
    True
    """
    if steps_since_probe is None or last_rho is None or not math.isfinite(last_rho):
        return None
    scale = step_scale(norm, last_rho, target, mode)
    estimated = scale * float(normalized_step(norm, last_rho))
    growth = norm / probe_norm if probe_norm > 0 else math.inf
    return None if probe_due(schedule, steps_since_probe, growth, estimated, target, mode) else scale


def step_scale(norm: float, rho: float, target: float, mode: str) -> float:
    """``clip_scale(|u|, rho, r*, mode)``; 1 in ``"monitor"`` mode. A target ``r* <= 0`` or non-finite (``lr = 0`` in
    warm-up) gives 0 in ``"set"`` mode (no step) and 1 in ``"clip"`` mode.

    Example:

    >>> step_scale(4.0, 1.0, 1.0, "clip")
    0.25
    >>> step_scale(4.0, 1.0, 0.0, "set")
    0.0
    """
    if mode == "monitor":
        return 1.0
    if target <= 0 or not math.isfinite(target):
        return 0.0 if mode == "set" else 1.0
    return float(clip_scale(norm, rho, target, mode))

