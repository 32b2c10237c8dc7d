"""Every setting of the probe and the controller: allowed values, defaults, one validator.

Two settings are resolved against the run before the probe is built, by pure functions:
:func:`resolve_estimator` (``"auto"``: ``"jvp"`` when the probe runs in a 16-bit dtype on CUDA, else ``"fd"``)
and :func:`resolve_probe_dtype` (``"auto"``: the 16-bit training dtype with ``jvp`` on CUDA, else float32).
Why: on tensor-core GPUs an fp32 matmul runs ~10-15x slower than a bf16 one, so an fp32 probe of a bf16 run
costs several training steps; a bf16 JVP is within 0.1-0.4% of the fp32 one, while bf16 central differences
are 8-12% off (rounding, ``~ eps_bf16 |z| / h``), so a 16-bit probe dtype requires ``jvp``. On CPU, and in
fp32 training, ``"auto"`` keeps the fp32 ``fd`` probe.

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

import torch

__all__ = [
    "DEFAULT_ESTIMATOR",
    "DEFAULT_EVERY",
    "DEFAULT_FD_STEP",
    "DEFAULT_PROBE_DTYPE",
    "DEFAULT_RADIUS",
    "DEFAULT_TARGETS",
    "DEFAULT_TOPK",
    "DEFAULT_TRIGGER_GROWTH",
    "DEFAULT_TRIGGER_R",
    "ESTIMATORS",
    "ESTIMATOR_CHOICES",
    "FFN_MODES",
    "MODES",
    "PROBE_DTYPES",
    "RADII",
    "RADIUS_FIELDS",
    "RADIUS_KINDS",
    "SETTINGS",
    "Setting",
    "check_probe_dtype",
    "default_target",
    "parse_radii",
    "resolve_estimator",
    "resolve_probe_dtype",
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
ESTIMATORS = ("jvp", "fd")  # what a RadiusProbe runs
ESTIMATOR_CHOICES = ("auto", *ESTIMATORS)  # what the controller, the callback and the arguments accept
PROBE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
FFN_MODES = ("kink", "activation")
# The output radius: "bound" is pi / max Delta (Theorem 4.6); "topk_exact" the certified exact radii of the topk widest
# tokens, capped by pi / Delta of the next one (hf_ghosts.radii.topk_radius): still a lower bound, never smaller.
RADIUS_KINDS = ("bound", "topk_exact")

# Probing defaults, chosen with benchmarks/overhead.py: central differences on CPU / fp32 (cheaper than the JVP,
# within 0.5% of it there), a bf16 JVP on CUDA in 16-bit training (fp32 there is ~13x slower), a probe at least every DEFAULT_EVERY steps; in between, a step reuses the last rho only
# while its applied r estimated with it stays at most DEFAULT_TRIGGER_R * r_target and |u| stays within
# DEFAULT_TRIGGER_GROWTH of |u| at the last probe.
DEFAULT_ESTIMATOR = "auto"  # fd in fp32 on CPU and in fp32 training; jvp in the 16-bit dtype on CUDA
DEFAULT_PROBE_DTYPE = "auto"
DEFAULT_EVERY = 16
DEFAULT_TRIGGER_R = 0.5
DEFAULT_TRIGGER_GROWTH = 2.0
DEFAULT_FD_STEP = 1e-2
DEFAULT_RADIUS = "bound"
DEFAULT_TOPK = 8
# r* when rho_target / r_target is None, by mode. clip: 2 in units of pi / max Delta, chosen with
# benchmarks/price_of_safety.py and recipes/spike_test.py (README, "The price of safety"): on the 42M run it costs
# 1.3% eval loss at 60 steps against 2.2% at r* = 1, and it survived every spike x10 ... x10,000 on GPT-NeoX and
# Llama, also spiked at step 3 of a barely trained model, where r* = 3 and 4 collapsed Llama. monitor: would_clip
# against clip's default. set: the step length itself, r* = 1.
DEFAULT_TARGETS = {"clip": 2.0, "set": 1.0, "monitor": 2.0}


def default_target(mode: str) -> float:
    """The ``r*`` of ``mode`` when none is given (:data:`DEFAULT_TARGETS`)."""
    return DEFAULT_TARGETS[mode]


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
        Setting(
            "r_target", "rho_target", "a finite number > 0 (None: the mode's default)",
            lambda v: v is None or (_is_number(v) and 0 < v < math.inf), finite=True,
        ),
        Setting("radii", "rho_radii", f"a non-empty list of distinct names from {list(RADII)}", _radii_ok),
        Setting(
            "watch_radii", "rho_watch_radii", f"a list (may be empty) of distinct names from {list(RADII)}",
            lambda v: _radii_ok(v, empty=True),
        ),
        Setting("estimator", "rho_estimator", f"one of {list(ESTIMATOR_CHOICES)}", lambda v: v in ESTIMATOR_CHOICES),
        Setting("probe_dtype", "rho_probe_dtype", f"one of {list(PROBE_DTYPES)}", lambda v: v in PROBE_DTYPES),
        Setting("every", "rho_every", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
        Setting("trigger_r", "rho_trigger_r", "a number > 0 (inf: off)", lambda v: _is_number(v) and v > 0),
        Setting("trigger_growth", "rho_trigger_growth", "a number >= 1 (inf: off)", lambda v: _is_number(v) and v >= 1),
        Setting("log_per_head", "rho_log_per_head", "True or False", lambda v: isinstance(v, bool)),
        Setting("fd_step", "rho_fd_step", "a finite number > 0", lambda v: _is_number(v) and 0 < v < math.inf, finite=True),
        Setting("ffn_mode", "rho_ffn_mode", f"one of {list(FFN_MODES)}", lambda v: v in FFN_MODES),
        Setting("ffn_quantile", "rho_ffn_quantile", "a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
        Setting("vocab_chunk", "rho_vocab_chunk", "a positive integer", lambda v: _is_int(v) and v >= 1),
        Setting("radius", "rho_radius", f"one of {list(RADIUS_KINDS)}", lambda v: v in RADIUS_KINDS),
        Setting("topk", "rho_topk", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
        Setting("rescale_moments", "rho_rescale_moments", "True or False", lambda v: isinstance(v, bool)),
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


def resolve_estimator(setting: str, probe_dtype: str, training_dtype: torch.dtype, device_type: str) -> str:
    """The estimator ``setting`` names: ``"auto"`` -> ``"jvp"`` where the probe runs in 16 bits, else ``"fd"``.

    The probe runs in 16 bits when ``probe_dtype`` says so (``"bfloat16"``, ``"float16"``), or, for
    ``probe_dtype="auto"``, when training is 16-bit on CUDA (see :func:`resolve_probe_dtype`).

    Example: ``resolve_estimator("auto", "auto", torch.bfloat16, "cuda")`` is ``"jvp"``; on ``"cpu"`` it is ``"fd"``.
    """
    if setting != "auto":
        return setting
    if probe_dtype == "auto":
        sixteen = device_type == "cuda" and training_dtype in SIXTEEN_BIT
    else:
        sixteen = PROBE_DTYPES[probe_dtype] in SIXTEEN_BIT
    return "jvp" if sixteen else "fd"


def check_probe_dtype(caller: str, estimator: str, dtype: torch.dtype, *, arguments: bool = False, name: str = "") -> None:
    """Refuse ``fd`` with a 16-bit probe dtype: the central difference ``(z+ - z-) / 2h`` has a rounding error
    ``~ eps |z| / h`` (bf16: ``eps = 2^-8``, so ~40% of ``|z|`` at ``h = 1e-2``), 8-12% off on the radius."""
    if estimator == "fd" and dtype in SIXTEEN_BIT:
        name = name or spelled("probe_dtype", arguments)
        raise ValueError(
            f"{caller}.{name}: {dtype} with the 'fd' estimator: central differences in 16 bits are swamped by "
            "rounding (error ~ eps * |z| / h with eps = 2^-8 for bf16; measured 8-12% off the radius). Use "
            f"estimator 'jvp' (within 0.4% in bf16), or {name}='float32'"
        )


def resolve_probe_dtype(setting: str, estimator: str, training_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The probe's dtype: ``setting`` itself, or for ``"auto"`` the training dtype where that is 16-bit on CUDA and
    ``estimator`` (already resolved) is ``"jvp"``, else float32. A 16-bit dtype with ``"fd"`` raises ``ValueError``.

    Args:
        setting: one of :data:`PROBE_DTYPES` (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``).
        estimator: ``"jvp"`` or ``"fd"``.
        training_dtype: the dtype training computes in (bf16/fp16 under mixed precision, else the parameters').
        device_type: ``"cuda"``, ``"cpu"``, ...

    Example: ``resolve_probe_dtype("auto", "jvp", torch.bfloat16, "cuda")`` is ``torch.bfloat16``;
    on ``"cpu"``, or with ``"fd"``, it is ``torch.float32``.
    """
    validate("resolve_probe_dtype", {"probe_dtype": setting})
    dtype = PROBE_DTYPES[setting]
    if dtype is None:
        cuda_16 = device_type == "cuda" and training_dtype in SIXTEEN_BIT
        dtype = training_dtype if cuda_16 and estimator == "jvp" else torch.float32
    check_probe_dtype("resolve_probe_dtype", estimator, dtype)
    return dtype
