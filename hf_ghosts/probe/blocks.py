"""Per-block spreads for the block-wise step (``granularity="blocks"``): one measurement per moving block.

Each block ``b`` of the update (``u_b``, a direction over some parameters) is measured alone by
:meth:`~hf_ghosts.probe.RadiusProbe.measure_with` at the old weights, and its report turned into the unit direction's
spread on every softmax instance ``j`` that limits the step (:func:`instance_spreads`: the output softmax, max over
tokens; each attention (layer, head), max over queries). ``D_bj = |u_b| * unit_bj`` then bounds the step
``sum_b s_b u_b`` (:func:`hf_ghosts.radii.spread_bound`). The measurements take the estimator and fd step the probe's
own step control last chose (:func:`block_estimate`) and leave the control's state alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from hf_ghosts.probe.radius_probe import RadiusProbe
from hf_ghosts.probe.report import RadiusReport
from hf_ghosts.settings import RADIUS_BY_NAME

__all__ = ["block_estimate", "block_spreads", "instance_spreads"]

Tensors = Mapping[str, torch.Tensor]


def block_estimate(probe: RadiusProbe) -> tuple[str, float | None]:
    """``(estimator, fd_step)`` for measuring blocks of the direction the probe last measured: ``("jvp", None)`` for a
    jvp probe and where fd's step control fell back to jvp; else ``("fd", h)`` with the step the control chose
    (``settings.fd_step`` before its first check). Reads the control, never changes it."""
    control = probe.fd_control
    if control is None or control.fallback:
        return "jvp", None
    return "fd", probe.settings.fd_step if control.step is None else control.step


def instance_spreads(report: RadiusReport, radii: Sequence[str]) -> torch.Tensor:
    """The spreads of ``report`` per softmax instance, for the radii among ``radii`` that are spreads
    (:data:`~hf_ghosts.settings.RADIUS_TABLE`): ``[output (max over tokens), attention per (layer, head)...]``, float64,
    flat. A radius that is no spread (the FFN radii) adds no instance: it holds through the final measurement."""
    pieces = [getattr(report, RADIUS_BY_NAME[name].raw).reshape(-1).double() for name in radii if RADIUS_BY_NAME[name].spread]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=report.device)


def block_spreads(
    probe: RadiusProbe, inputs: Tensors, pieces: Sequence[Tensors], norms: Sequence[float], params: Tensors, *,
    radii: Sequence[str], estimator: str, fd_step: float | None,
    reduce: Callable[[RadiusReport], RadiusReport] = lambda report: report,
) -> tuple[torch.Tensor, list[bool]]:
    """``([blocks, instances] unit spreads, measured)``: block ``b`` (``pieces[b]``, of norm ``norms[b]``) measured
    alone at ``params`` by ``estimator`` (:func:`block_estimate`), its report agreed across processes by ``reduce`` (the
    controller's all-reduce), and :func:`instance_spreads` of it over ``radii``. A block that does not move
    (``norms[b] == 0``) is not measured: its row is 0 (no spread) and ``measured[b]`` False."""
    rows: list[torch.Tensor | None] = []
    for piece, norm in zip(pieces, norms, strict=True):
        if norm > 0:
            report = reduce(probe.measure_with(inputs, piece, params, estimator=estimator, fd_step=fd_step, norm=norm))
            rows.append(instance_spreads(report, radii))
        else:
            rows.append(None)
    measured = [row is not None for row in rows]
    like = next((row for row in rows if row is not None), None)
    if like is None:
        raise ValueError("block_spreads: no block moves; a zero update has nothing to measure")
    return torch.stack([torch.zeros_like(like) if row is None else row for row in rows]), measured
