"""Figures of the normalized step and the radii: a run's history, per-head radii, a run's checkpoints.

Used by the ``hf-ghosts`` command (:mod:`hf_ghosts.cli`); every function writes one PNG and returns its
path. Matplotlib (the ``cli`` extra) runs on the non-interactive ``Agg`` backend. Values that are ``None``, NaN, inf or
``<= 0`` are left out of the log-scale curves rather than drawn at an arbitrary height.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hf_ghosts._optional import require
from hf_ghosts.settings import RADIUS_TABLE

# matplotlib comes with the cli extra: importing this module without it is an ImportError naming the extra
require("matplotlib", extra="cli").use("Agg")
plt = require("matplotlib.pyplot", extra="cli")
MaxNLocator = require("matplotlib.ticker", extra="cli").MaxNLocator

__all__ = ["HISTORY_KEYS", "checkpoints_figure", "head_radii_heatmap", "history_figure", "save_figure"]

#: The ``ghosts/*`` keys :func:`history_figure` draws: ``(key, label, color, panel)``; panel 0 is ``r``, 1 the radii.
HISTORY_KEYS = (
    ("ghosts/r", "r = |u| / rho (proposed)", "black", 0),
    ("ghosts/r_applied", "r applied", "tab:red", 0),
    ("ghosts/rho", "rho (binding)", "black", 1),
    *((radius.key, radius.label, radius.color, 1) for radius in RADIUS_TABLE),
    ("ghosts/update_norm", "|u| proposed", "gray", 1),
)


def _positive(values: Sequence[Any]) -> np.ndarray:
    """``values`` as floats with ``None``, NaN, inf and ``<= 0`` replaced by NaN (not drawn on a log axis)."""
    array = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    return np.where(np.isfinite(array) & (array > 0), array, np.nan)


def save_figure(figure: plt.Figure, path: str) -> str:
    """Lay out ``figure``, write it to ``path`` as a PNG (120 dpi), close it; return ``path``."""
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def history_figure(entries: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str:
    """Two log-scale panels against ``step``: ``r`` and ``r_applied`` (with ``r = 1``), then the radii and ``|u|``.

    Args:
        entries: ``trainer_state.json`` ``log_history`` entries holding ``ghosts/*`` keys and ``step``.
        path: where the PNG goes.
        title: the figure's title.

    Returns:
        ``path``.
    """
    figure, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for key, label, color, panel in HISTORY_KEYS:
        rows = [entry for entry in entries if key in entry]
        if not rows:
            continue
        style = {"ls": ":"} if key == "ghosts/update_norm" else {"ls": "--"} if key == "ghosts/r_applied" else {}
        axes[panel].plot([row["step"] for row in rows], _positive([row[key] for row in rows]), color=color, lw=1.2,
                         marker="." if len(rows) < 50 else None, label=label, **style)
    axes[0].axhline(1.0, color="gray", ls="--", lw=1, label="r = 1")
    axes[0].set_ylabel("normalized step r")
    axes[0].set_title(title, fontsize=9)
    axes[1].set_ylabel("radius / step length")
    axes[1].set_xlabel("optimizer step")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in axes:
        axis.set_yscale("log")
        axis.legend(loc="best", fontsize=8)
    return save_figure(figure, path)


def head_radii_heatmap(heads: Any, path: str, title: str = "") -> str:
    """Heatmap of per-head attention radii ``rho_attn[layer, head]`` (log10 colour, values written in).

    Args:
        heads: a ``[layers, heads]`` array (tensor, numpy or nested lists; ``None`` read as inf).
        path: where the PNG goes.
        title: the figure's title.

    Returns:
        ``path``.
    """
    values = np.array([[math.inf if v is None else float(v) for v in row] for row in np.asarray(heads, dtype=object)])
    figure, axis = plt.subplots(figsize=(max(4.5, 1.5 + 0.55 * values.shape[1]), max(3.0, 1.2 + 0.45 * values.shape[0])))
    shown = np.log10(np.where(np.isfinite(values) & (values > 0), values, np.nan))
    image = axis.imshow(shown, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axis, label="log10 rho_attn")
    if values.size <= 256:
        low, high = np.nanmin(shown) if np.isfinite(shown).any() else 0.0, np.nanmax(shown) if np.isfinite(shown).any() else 1.0
        for (layer, head), value in np.ndenumerate(values):
            bright = np.isfinite(shown[layer, head]) and shown[layer, head] - low > 0.6 * (high - low)  # viridis: yellow
            axis.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize=7, color="black" if bright else "white")
    axis.set_xticks(range(values.shape[1]))
    axis.set_yticks(range(values.shape[0]))
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(title, fontsize=9)
    return save_figure(figure, path)


def checkpoints_figure(rows: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str:
    """Over a run's checkpoints: ``r`` of the next step (with ``r = 1``), and its learning rate against the safe one.

    Args:
        rows: one mapping per checkpoint with ``step``, ``r``, ``learning_rate`` and ``safe_learning_rate``.
        path: where the PNG goes.
        title: the figure's title.

    Returns:
        ``path``.
    """
    steps = [row["step"] for row in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(steps, _positive([row["r"] for row in rows]), color="black", marker="o", lw=1.2, label="r of the next step")
    top.axhline(1.0, color="gray", ls="--", lw=1, label="r = 1")
    top.set_ylabel("normalized step r")
    top.set_title(title, fontsize=9)
    bottom.plot(steps, _positive([row["learning_rate"] for row in rows]), color="tab:red", marker="o", lw=1.2,
                label="learning rate of the next step")
    bottom.plot(steps, _positive([row["safe_learning_rate"] for row in rows]), color="tab:blue", marker="o", lw=1.2,
                label="safe learning rate (r = r_target)")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("checkpoint (optimizer step)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (top, bottom):
        axis.set_yscale("log")
        axis.legend(loc="best", fontsize=8)
    return save_figure(figure, path)
