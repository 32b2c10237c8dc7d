"""Optional dependencies: the one way hf_ghosts imports a package that only an extra of pyproject.toml installs.

The training path (``RhoTrainer``, ``RhoCallback``, ``RhoController``, ``RadiusProbe``, :mod:`hf_ghosts.radii`)
needs torch, transformers, accelerate and numpy only. The rest comes with an extra (``pip install "hf_ghosts[cli]"``),
and is imported through :func:`require`, which turns its absence into an ``ImportError`` that names the extra and
the pip line (as TRL's ``is_*_available`` checks do).

Example (``require("matplotlib", extra="cli")`` returns the module where the extra is installed):

>>> require("no_such_package", extra="cli")
Traceback (most recent call last):
...
hf_ghosts._optional.MissingExtraError: hf_ghosts[cli] needs no_such_package, which is not installed: pip install "hf_ghosts[cli]" ...
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: The extras of pyproject.toml: what each adds and what for (the README's install table is tested against it).
EXTRAS = {
    "wandb": "wandb: W&B logging (`report_to=[\"wandb\"]`)",
    "cli": "matplotlib, datasets: the `hf-ghosts diagnose` / `plot` command",
    "recipes": "`cli`, `wandb`, tokenizers: the recipes in `recipes/` (the main job reports to W&B, offline by default)",
    "test": "`recipes`, pytest, ruff, trl, peft, prodigyopt, schedulefree, triton, zclip, scipy: the tests and `.ci/run`",
    "peers": "zclip, ai2-olmo-core: the recipes' `zclip` and `skip-step` methods (`recipes/peers.py`)",
}


class MissingExtraError(ImportError):
    """An optional package is missing; the message names the extra that installs it and the pip line."""


def require(module: str, *, extra: str) -> ModuleType:
    """``importlib.import_module(module)``; if the package is not installed, a :class:`MissingExtraError` naming
    ``extra`` (a key of :data:`EXTRAS`). A package that is installed but fails to import (a broken dependency of
    its own) raises its own error unchanged."""
    if extra not in EXTRAS:
        raise ValueError(f"require: unknown extra {extra!r}; the extras are {list(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top:
            raise
        raise MissingExtraError(
            f'hf_ghosts[{extra}] needs {top}, which is not installed: pip install "hf_ghosts[{extra}]" '
            f'(from a clone: pip install -e ".[{extra}]")'
        ) from error
