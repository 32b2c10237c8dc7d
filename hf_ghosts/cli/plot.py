"""``hf-ghosts plot``: ``r``, ``r_applied`` and the radii of a RhoTrainer / RhoCallback run, from ``trainer_state.json``.

``Trainer`` writes ``trainer_state.json`` into every ``checkpoint-*`` and, with ``trainer.save_state()``, into
its ``output_dir``; its ``log_history`` holds the ``ghosts/*`` keys the controller logged. The most advanced
of those files (largest ``global_step``) is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from hf_ghosts.cli.diagnose import find_checkpoints
from hf_ghosts.cli.errors import CliError
from hf_ghosts.plots import history_figure

__all__ = ["ghosts_history", "run_plot"]


def _read_state(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise CliError(f"{path} is not a readable trainer_state.json ({type(error).__name__}: {error})") from error


def ghosts_history(run_dir: str) -> tuple[str, list[dict[str, Any]]]:
    """``(trainer_state.json path, log_history entries with ghosts/* keys)`` of a run or checkpoint directory.

    Raises:
        CliError: no such directory, no ``trainer_state.json``, or no ``ghosts/*`` key in it.
    """
    if not os.path.isdir(run_dir):
        raise CliError(f"{run_dir}: no such run directory")
    candidates = [os.path.join(run_dir, "trainer_state.json")]
    candidates += [os.path.join(path, "trainer_state.json") for _, path in find_checkpoints(run_dir)]
    states = [(path, _read_state(path)) for path in candidates if os.path.isfile(path)]
    if not states:
        raise CliError(
            f"{run_dir} holds no trainer_state.json (nor do checkpoint-* folders in it). Pass a Trainer output_dir "
            "with checkpoints (save_strategy) or call trainer.save_state() after training"
        )
    path, state = max(states, key=lambda item: item[1].get("global_step", 0))  # ties: the run directory's own
    entries = [entry for entry in state.get("log_history", []) if any(key.startswith("ghosts/") for key in entry)]
    if not entries:
        raise CliError(
            f"{path} has no ghosts/* keys in its log_history: the run was not trained with RhoTrainer or RhoCallback "
            "(or logged nothing after an optimizer step). Train with hf_ghosts.RhoTrainer, or add "
            "RhoCallback.install(trainer), then plot again"
        )
    return path, entries


def run_plot(args: argparse.Namespace) -> None:
    """``hf-ghosts plot RUN_DIR [--output PNG]``."""
    source, entries = ghosts_history(args.run_dir)
    output = args.output or os.path.join(args.run_dir, "ghosts.png")
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    history_figure(entries, output, title=f"{os.path.normpath(args.run_dir)}: r and the radii ({len(entries)} log entries)")
    r_values = [entry["ghosts/r"] for entry in entries if entry.get("ghosts/r") is not None]
    peak = f", max r {max(r_values):.3g}" if r_values else ""
    print(f"hf-ghosts plot: {len(entries)} entries with ghosts/* keys from {source}{peak}; wrote {output}")
