"""Every setting of the probe and the controller: allowed values, defaults, one validator.

``RadiusProbe``, ``RhoController``, ``RhoCallback`` and ``RhoTrainingArguments`` all check their
settings with :func:`validate`, so a bad value gets the same message everywhere, naming the
setting as that caller spells it: ``radii`` for the probe and the controller, ``rho_radii`` for
the Trainer's arguments (:attr:`Setting.argument`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_ESTIMATOR",
    "DEFAULT_EVERY",
    "DEFAULT_FD_STEP",
    "DEFAULT_TRIGGER_GROWTH",
    "DEFAULT_TRIGGER_R",
    "ESTIMATORS",
    "FFN_MODES",
    "MODES",
    "RADII",
    "RADIUS_FIELDS",
    "SETTINGS",
    "Setting",
    "parse_radii",
    "spelled",
    "validate",
]

MODES = ("clip", "set", "monitor")
# The radii, by the name rho_radii / rho_watch_radii take, and the StepRecord field (and ghosts/<field> key) of each.
# "ffn" is the FFN radius in the form rho_ffn_mode picks (default "kink": the paper's 1% quantile of |z| / |z'|);
# "ffn_activation" is always Appendix B's activation radius (eq. 21; inf for exact GELU), so that one probe can watch
# both forms. With ffn_mode="activation" the two names measure the same thing.
RADIUS_FIELDS = {"output": "rho_out", "attention": "rho_attn", "ffn": "rho_ffn", "ffn_activation": "rho_ffn_activation"}
RADII = tuple(RADIUS_FIELDS)
ESTIMATORS = ("jvp", "fd")
FFN_MODES = ("kink", "activation")

# Probing defaults, chosen with benchmarks/overhead.py: central differences (cheaper than the JVP, within
# 0.5% of it there), a probe at least every DEFAULT_EVERY steps; in between, a step reuses the last rho only
# while its applied r estimated with it stays at most DEFAULT_TRIGGER_R * r_target and |u| stays within
# DEFAULT_TRIGGER_GROWTH of |u| at the last probe.
DEFAULT_ESTIMATOR = "fd"
DEFAULT_EVERY = 16
DEFAULT_TRIGGER_R = 0.5
DEFAULT_TRIGGER_GROWTH = 2.0
DEFAULT_FD_STEP = 1e-2


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Setting:
    """One setting: its keyword (probe, controller), its ``RhoTrainingArguments`` field, what it allows."""

    keyword: str
    argument: str
    allowed: str
    check: Callable[[Any], bool]
    finite: bool = False  # a non-finite number is named as such


def _radii_ok(value: Any, empty: bool = False) -> bool:
    return (
        isinstance(value, tuple)
        and (empty or bool(value))
        and len(set(value)) == len(value)
        and all(v in RADII for v in value)
    )


SETTINGS: dict[str, Setting] = {
    setting.keyword: setting
    for setting in (
        Setting("mode", "rho_mode", f"one of {list(MODES)}", lambda v: v in MODES),
        Setting("r_target", "rho_target", "a finite number > 0", lambda v: _is_number(v) and 0 < v < math.inf, finite=True),
        Setting("radii", "rho_radii", f"a non-empty list of distinct names from {list(RADII)}", _radii_ok),
        Setting(
            "watch_radii", "rho_watch_radii", f"a list (may be empty) of distinct names from {list(RADII)}",
            lambda v: _radii_ok(v, empty=True),
        ),
        Setting("estimator", "rho_estimator", f"one of {list(ESTIMATORS)}", lambda v: v in ESTIMATORS),
        Setting("every", "rho_every", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
        Setting("trigger_r", "rho_trigger_r", "a number > 0 (inf: off)", lambda v: _is_number(v) and v > 0),
        Setting("trigger_growth", "rho_trigger_growth", "a number >= 1 (inf: off)", lambda v: _is_number(v) and v >= 1),
        Setting("log_per_head", "rho_log_per_head", "True or False", lambda v: isinstance(v, bool)),
        Setting("fd_step", "rho_fd_step", "a finite number > 0", lambda v: _is_number(v) and 0 < v < math.inf, finite=True),
        Setting("ffn_mode", "rho_ffn_mode", f"one of {list(FFN_MODES)}", lambda v: v in FFN_MODES),
        Setting("ffn_quantile", "rho_ffn_quantile", "a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
        Setting("vocab_chunk", "rho_vocab_chunk", "a positive integer", lambda v: _is_int(v) and v >= 1),
        Setting("set_schedule", "rho_set_schedule", "True or False", lambda v: isinstance(v, bool)),
    )
}


def spelled(keyword: str, arguments: bool = False) -> str:
    """The setting ``keyword`` as the caller knows it: the keyword itself, or its ``rho_*`` argument name."""
    return SETTINGS[keyword].argument if arguments else keyword


def parse_radii(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"output,ffn"``, ``["output", "ffn"]`` or ``["output,ffn"]`` (the command line's form) -> ``("output", "ffn")``."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(name.strip() for item in items for name in str(item).split(",") if name.strip())


def validate(caller: str, values: Mapping[str, Any], *, arguments: bool = False) -> None:
    """Raise ``ValueError`` naming the first setting in ``values`` whose value is not allowed.

    Args:
        caller: who checks, for the message (``"RadiusProbe"``, ``"RhoTrainingArguments"``, ...).
        values: ``{keyword: value}``; keywords are those of :data:`SETTINGS` (radii already a tuple).
        arguments: name the settings by their ``RhoTrainingArguments`` fields (``rho_*``).
    """
    for keyword, value in values.items():
        setting = SETTINGS[keyword]
        if setting.check(value):
            continue
        shown = f"{value!r} (not finite)" if setting.finite and _is_number(value) and not math.isfinite(value) else repr(value)
        if isinstance(value, float) and math.isnan(value):
            shown = "nan (not a number)"
        raise ValueError(f"{caller}.{spelled(keyword, arguments)}: got {shown}; expected {setting.allowed}")
    both = [name for name in values.get("radii", ()) if name in values.get("watch_radii", ())]
    if both:
        raise ValueError(
            f"{caller}: {both} in both {spelled('radii', arguments)} and {spelled('watch_radii', arguments)}; a radius "
            f"either limits the step ({spelled('radii', arguments)}) or is only watched ({spelled('watch_radii', arguments)})"
        )
