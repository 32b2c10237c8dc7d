"""Every setting of the probe and the controller, resolved once; the one table of radii.

:class:`RhoSettings` is the one frozen settings object. Whoever the user talks to builds it from the user's own
spelling and validates it in its ``__post_init__``: ``RhoTrainingArguments`` (``rho_radii``), ``RhoController`` /
``RhoCallback`` (``radii``) or ``RadiusProbe`` (``radii``, ``dtype``). Everything below takes it as it is, and names a
setting in an error the way its caller spelled it (:meth:`RhoSettings.name`).

Two settings depend on the run and are resolved once, by :meth:`RhoSettings.resolved`: ``estimator="auto"`` is
``"jvp"`` where the probe runs in 16 bits on CUDA, else ``"fd"``; ``probe_dtype="auto"`` is the 16-bit training
dtype with ``jvp`` on CUDA, else float32; under FSDP2 the probe is always the fp32 ``fd`` one. Why: on tensor-core
GPUs an fp32 matmul runs ~10-15x slower than a bf16 one; a bf16 JVP is within 0.1-0.4% of the fp32 one, while bf16
central differences are 8-12% off (rounding, ``~ eps_bf16 |z| / h``), so a 16-bit probe dtype requires ``jvp``.

The one table of radii (:data:`RADIUS_TABLE`) and the kinds of the report's fields (:data:`REPORT_FIELDS`) live in
:mod:`hf_ghosts.radius_table`; they are importable from here too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from hf_ghosts.radius_table import (
    RADII,
    RADIUS_BY_NAME,
    RADIUS_FIELDS,
    RADIUS_TABLE,
    REDUCTIONS,
    REPORT_FIELDS,
    FieldKind,
    Radius,
)

__all__ = [
    "DEFAULT_BLOCK_REFRESH",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_EVERY",
    "DEFAULT_FD_STEP",
    "DEFAULT_GRANULARITIES",
    "DEFAULT_PROBE_DTYPE",
    "DEFAULT_RADII",
    "DEFAULT_RADIUS",
    "DEFAULT_TARGETS",
    "DEFAULT_TOPK",
    "DEFAULT_TRIGGER_GROWTH",
    "DEFAULT_TRIGGER_R",
    "ESTIMATORS",
    "ESTIMATOR_CHOICES",
    "FFN_MODES",
    "GRANULARITIES",
    "MODEL_KEYWORDS",
    "MODES",
    "PROBE_DTYPES",
    "RADII",
    "RADIUS_BY_NAME",
    "RADIUS_FIELDS",
    "RADIUS_KINDS",
    "RADIUS_TABLE",
    "REDUCTIONS",
    "REPORT_FIELDS",
    "SETTINGS",
    "FieldKind",
    "Radius",
    "RhoSettings",
    "Setting",
    "default_target",
    "defaults_text",
    "parse_radii",
    "resolve_estimator",
    "resolve_probe_dtype",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ allowed values, defaults
MODES = ("clip", "set", "monitor")
ESTIMATORS = ("jvp", "fd")  # what a RadiusProbe runs
ESTIMATOR_CHOICES = ("auto", *ESTIMATORS)  # what the controller, the callback and the arguments accept
PROBE_DTYPES = {
    "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
FFN_MODES = ("kink", "activation")
# The output radius: "bound" is pi / max Delta (Theorem 4.6); "topk_exact" the certified exact radii of the topk widest
# tokens, capped by pi / Delta of the next one (hf_ghosts.radii.topk_radius): still a lower bound, never smaller.
RADIUS_KINDS = ("bound", "topk_exact")

DEFAULT_RADII = ("output", "attention")
# Probing defaults, chosen with benchmarks/overhead.py: central differences on CPU / fp32 (cheaper than the JVP,
# within 0.5% of it there), a bf16 JVP on CUDA in 16-bit training (fp32 there is ~13x slower), a probe at least every
# DEFAULT_EVERY steps; in between, a step reuses the last rho only while its applied r estimated with it stays at most
# DEFAULT_TRIGGER_R * r_target and |u| stays within DEFAULT_TRIGGER_GROWTH of |u| at the last probe.
DEFAULT_ESTIMATOR = "auto"  # fd in fp32 on CPU and in fp32 training; jvp in the 16-bit dtype on CUDA
DEFAULT_PROBE_DTYPE = "auto"
DEFAULT_EVERY = 16
DEFAULT_TRIGGER_R = 0.5
DEFAULT_TRIGGER_GROWTH = 2.0
DEFAULT_FD_STEP = 1e-2  # the widest fd step: hf_ghosts.probe.fd.FdStepControl shrinks it where its error estimate says
DEFAULT_FFN_MODE = "kink"
DEFAULT_FFN_QUANTILE = 0.01
DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_RADIUS = "bound"
DEFAULT_TOPK = 8
# r* when rho_target / r_target is None, by mode. clip: 2 in units of pi / max Delta, chosen with
# benchmarks/price_of_safety.py and recipes/spike_test.py (docs/cost.md, "The price of safety"): on the 42M run it
# costs 1.3% eval loss at 60 steps against 2.2% at r* = 1, and it survived every spike x10 ... x10,000 on GPT-NeoX and
# Llama, also spiked at step 3 of a barely trained model, where r* = 3 and 4 collapsed Llama. monitor: would_clip
# against clip's default. set: the step length itself, r* = 1. recipes/lr_sensitivity.py (docs/results.md,
# "Learning-rate sensitivity"): clip at r* = 1 is flatter over 3e-3 ... 3e-1 on all four presets but 3.7% worse at
# llama-14m's best rate, so clip's default stays 2.
DEFAULT_TARGETS = {"clip": 2.0, "set": 1.0, "monitor": 2.0}
# How a clipped step is shortened: "global", one scale for the whole update; "blocks", a scale per parameter block
# (hf_ghosts.blocks), chosen by the block study of issue 30 (llama-tiny at 3e-2: eval loss 5.69 against 6.41 global).
# Block spreads are measured on every DEFAULT_BLOCK_REFRESH-th block step and reused in between: 2.9 probes per clipped
# step instead of 6.7 when measured every time, at nearly the same loss (5.690 against 5.684).
# granularity None: the mode's default. clip: "blocks", by recipes/lr_sensitivity.py (docs/results.md, "Learning-rate
# sensitivity"; 4 rates 1e-3 ... 3e-1, 4 presets): mean regret 0.62x / 0.50x / 0.29x / 0.28x AdamW's against the global
# clip's 0.72x / 0.75x / 0.54x / 1.09x (pythia-tiny, llama-tiny, pythia-14m, llama-14m; the global clip freezes Llama
# at a too-high rate), best loss within 0.3% of AdamW's or below it; benchmarks/price_of_safety.py at 42M, 60 steps:
# eval loss +1.3% over AdamW as the global clip's (docs/cost.md). set and monitor clip no step: "global".
GRANULARITIES = ("global", "blocks")
DEFAULT_GRANULARITIES = {"clip": "blocks", "set": "global", "monitor": "global"}
DEFAULT_BLOCK_REFRESH = 4


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
        Setting("set_schedule", "rho_set_schedule", "True or False", lambda v: isinstance(v, bool)),
        Setting("rescale_moments", "rho_rescale_moments", "True or False", lambda v: isinstance(v, bool)),
        Setting("fd_step", "rho_fd_step", "a finite number > 0", lambda v: _is_number(v) and 0 < v < math.inf, finite=True),
        Setting("ffn_mode", "rho_ffn_mode", f"one of {list(FFN_MODES)}", lambda v: v in FFN_MODES),
        Setting("ffn_quantile", "rho_ffn_quantile", "a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
        Setting("vocab_chunk", "rho_vocab_chunk", "a positive integer", lambda v: _is_int(v) and v >= 1),
        Setting("radius", "rho_radius", f"one of {list(RADIUS_KINDS)}", lambda v: v in RADIUS_KINDS),
        Setting("topk", "rho_topk", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
        Setting("granularity", "rho_granularity", f"one of {list(GRANULARITIES)} (None: the mode's default)",
                lambda v: v is None or v in GRANULARITIES),
        Setting("block_refresh", "rho_block_refresh", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
    )
}
# The probe's model-specific keywords beside the settings: objects of one model, not settings. RadiusProbe takes them
# as its own parameters, RhoController and RhoCallback pass them through, the trainer takes rho_<keyword>= in its
# constructor (RhoSettings.probe_keyword).
MODEL_KEYWORDS = ("ffn_spec", "shift_labels", "chunked_head")
# How each caller spells a setting: the keyword itself, the Trainer's rho_* field, or RadiusProbe's keyword.
SPELLINGS = ("keyword", "argument", "probe")
_PROBE_KEYWORDS = {"probe_dtype": "dtype"}


def parse_radii(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"output,ffn"``, ``["output", "ffn"]`` or ``["output,ffn"]`` (the command line's form) -> ``("output", "ffn")``."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(name.strip() for item in items for name in str(item).split(",") if name.strip())


def _shown(setting: Setting, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan (not a number)"
    if setting.finite and _is_number(value) and not math.isfinite(value):
        return f"{value!r} (not finite)"
    return repr(value)


# ------------------------------------------------------------------------------------------ the settings object
@dataclass(frozen=True)
class RhoSettings:
    """Every setting of the controller and the probe, validated once at construction (defaults: the module's
    ``DEFAULT_*``; allowed values: :data:`SETTINGS`). ``caller`` and ``spelling`` say who built it and how that caller
    names the settings (``"keyword"``: ``radii``; ``"argument"``: ``rho_radii``; ``"probe"``: ``dtype``), so an error
    raised anywhere below speaks the user's words.

    Example:

    >>> RhoSettings(radii="output,ffn").radii
    ('output', 'ffn')
    >>> RhoSettings(every=0)
    Traceback (most recent call last):
    ...
    ValueError: RhoController.every: got 0; expected an integer >= 1
    >>> RhoSettings.of("RhoTrainingArguments", "argument", every=0)
    Traceback (most recent call last):
    ...
    ValueError: RhoTrainingArguments.rho_every: got 0; expected an integer >= 1
    """

    mode: str = "clip"
    r_target: float | None = None
    radii: tuple[str, ...] = DEFAULT_RADII
    watch_radii: tuple[str, ...] = ()
    estimator: str = DEFAULT_ESTIMATOR
    probe_dtype: str = DEFAULT_PROBE_DTYPE
    every: int = DEFAULT_EVERY
    trigger_r: float = DEFAULT_TRIGGER_R
    trigger_growth: float = DEFAULT_TRIGGER_GROWTH
    log_per_head: bool = False
    set_schedule: bool = True
    rescale_moments: bool = False
    fd_step: float = DEFAULT_FD_STEP
    ffn_mode: str = DEFAULT_FFN_MODE
    ffn_quantile: float = DEFAULT_FFN_QUANTILE
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK
    radius: str = DEFAULT_RADIUS
    topk: int = DEFAULT_TOPK
    granularity: str | None = None
    block_refresh: int = DEFAULT_BLOCK_REFRESH
    caller: str = field(default="RhoController", compare=False)
    spelling: str = field(default="keyword", compare=False)

    def __post_init__(self) -> None:
        if self.spelling not in SPELLINGS:
            raise ValueError(f"RhoSettings.spelling: got {self.spelling!r}; expected one of {list(SPELLINGS)}")
        for keyword in ("radii", "watch_radii"):
            object.__setattr__(self, keyword, parse_radii(getattr(self, keyword)))
        for keyword, setting in SETTINGS.items():
            value = getattr(self, keyword)
            if not setting.check(value):
                raise self.error(keyword, f"got {_shown(setting, value)}; expected {setting.allowed}")
        both = [name for name in self.radii if name in self.watch_radii]
        if both:
            radii, watch = self.name("radii"), self.name("watch_radii")
            raise ValueError(
                f"{self.caller}: {both} in both {radii} and {watch}; a radius either limits the step ({radii}) or is "
                f"only watched ({watch})"
            )
        if self.estimator == "fd":
            self.refuse_fd_in_16_bits(PROBE_DTYPES[self.probe_dtype])
        if self.granularity == "blocks" and self.mode != "clip":
            self._refuse_blocks()
        if self.granularity is None:  # the mode's default, resolved once (DEFAULT_GRANULARITIES)
            object.__setattr__(self, "granularity", DEFAULT_GRANULARITIES[self.mode])

    def _refuse_blocks(self) -> None:
        """Refuse ``granularity="blocks"`` outside ``"clip"``: it takes a clipped step block by block."""
        mode, granularity = self.name("mode"), self.name("granularity")
        why = {"set": "'set' gives every step the length r* rho: no step is clipped", "monitor": "'monitor' changes no step"}
        fix = ("use RhoTrainer with rho_granularity='blocks' (rho_mode='clip') to take clipped steps block-wise"
               if self.caller == "RhoCallback" else f"set {mode}='clip', or {granularity}='global'")
        raise self.error("granularity", f"'blocks' takes each clipped step block by block, so it needs {mode}='clip'; got "
                         f"{mode}={self.mode!r} ({why[self.mode]}). Fix: {fix}")

    @classmethod
    def of(cls, caller: str, spelling: str = "keyword", **values: Any) -> RhoSettings:
        """Settings from ``values`` (keywords of :data:`SETTINGS`; unknown ones are a ``TypeError`` naming ``caller``)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{caller}: unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
        return cls(**values, caller=caller, spelling=spelling)

    @classmethod
    def from_call(
        cls, caller: str, settings: RhoSettings | None, keywords: Mapping[str, Any], *, allowed: Iterable[str] = (),
        spelling: str = "keyword", **fixed: Any,
    ) -> tuple[RhoSettings, dict[str, Any]]:
        """The settings of a call that takes them either as ``settings=`` or as keywords, never both, and the call's
        other keywords.

        ``keywords`` naming a setting of :data:`SETTINGS` build the settings (with ``fixed``, the caller's own values,
        e.g. the callback's ``mode="monitor"``) where ``settings`` is ``None``, and are a ``TypeError`` beside it; the
        others must be in ``allowed`` (e.g. the probe's ``ffn_spec``) and are returned as they are. A keyword that is
        neither is a ``TypeError`` naming both lists, at construction.

        Example:

        >>> settings, rest = RhoSettings.from_call("RhoController", None, {"every": 4, "ffn_spec": "spec"}, allowed=["ffn_spec"])
        >>> settings == RhoSettings(every=4), rest
        (True, {'ffn_spec': 'spec'})
        >>> RhoSettings.from_call("RhoController", settings, {"every": 4})
        Traceback (most recent call last):
        ...
        TypeError: RhoController: pass the settings either as settings= or as keywords, not both (['every'])
        """
        allowed = tuple(allowed)
        unknown = sorted(set(keywords) - set(SETTINGS) - set(allowed))
        if unknown:
            others = f"; other keywords: {sorted(allowed)}" if allowed else ""
            raise TypeError(f"{caller}: unknown keyword(s) {unknown}; settings: {sorted(SETTINGS)}{others}")
        given = {key: value for key, value in keywords.items() if key in SETTINGS}
        rest = {key: value for key, value in keywords.items() if key not in SETTINGS}
        if settings is None:
            return cls.of(caller, spelling, **fixed, **given), rest
        if given:
            raise TypeError(f"{caller}: pass the settings either as settings= or as keywords, not both ({sorted(given)})")
        return settings, rest

    def name(self, keyword: str) -> str:
        """The setting ``keyword`` as this settings' caller spells it (``radii``, ``rho_radii``, ``dtype``)."""
        if self.spelling == "argument":
            return SETTINGS[keyword].argument
        return _PROBE_KEYWORDS.get(keyword, keyword) if self.spelling == "probe" else keyword

    def error(self, keyword: str, message: str) -> ValueError:
        """``ValueError("<caller>.<name>: <message>")``, the setting named as the caller spells it."""
        return ValueError(f"{self.caller}.{self.name(keyword)}: {message}")

    def probe_keyword(self, keyword: str) -> tuple[str, str]:
        """``(spelled, taker)``: the probe's model-specific ``keyword`` (:data:`MODEL_KEYWORDS`) as this caller passes
        it, and to whom. The trainer takes ``rho_<keyword>=`` in its constructor (an object of one model, not a field
        of the JSON/CLI arguments); the controller, the callback and the probe take ``<keyword>=``.

        Example:

        >>> RhoSettings(caller="RhoCallback").probe_keyword("ffn_spec")
        ('ffn_spec', 'RhoCallback')
        >>> RhoSettings(caller="RhoTrainingArguments", spelling="argument").probe_keyword("ffn_spec")
        ('rho_ffn_spec', "the trainer's constructor")
        """
        if keyword not in MODEL_KEYWORDS:
            raise ValueError(f"RhoSettings.probe_keyword: got {keyword!r}; expected one of {list(MODEL_KEYWORDS)}")
        if self.spelling == "argument":
            return f"rho_{keyword}", "the trainer's constructor"
        return keyword, self.caller

    @property
    def target(self) -> float:
        """``r*``: ``r_target``, or the mode's default (:data:`DEFAULT_TARGETS`) when it is ``None``."""
        return default_target(self.mode) if self.r_target is None else float(self.r_target)

    @property
    def measured(self) -> tuple[str, ...]:
        """The radii a probe measures: the limiting ones, then the watched ones."""
        return self.radii + self.watch_radii

    @property
    def dtype(self) -> torch.dtype | None:
        """The probe's dtype (``None`` while ``probe_dtype`` is ``"auto"``)."""
        return PROBE_DTYPES[self.probe_dtype]

    def refuse_fd_in_16_bits(self, dtype: torch.dtype | None) -> None:
        """Refuse ``fd`` with a 16-bit probe dtype: the central difference ``(z+ - z-) / 2h`` has a rounding error
        ``~ eps |z| / h`` (bf16: ``eps = 2^-8``, so ~40% of ``|z|`` at ``h = 1e-2``), 8-12% off on the radius."""
        if dtype in SIXTEEN_BIT:
            name = self.name("probe_dtype")
            raise self.error("probe_dtype", (
                f"{dtype} with the 'fd' estimator: central differences in 16 bits are swamped by rounding (error ~ "
                "eps * |z| / h with eps = 2^-8 for bf16; measured 8-12% off the radius). Use estimator 'jvp' (within "
                f"0.4% in bf16), or {name}='float32'"
            ))

    def resolved(self, training_dtype: torch.dtype, device_type: str, sharded: bool = False) -> RhoSettings:
        """These settings with ``estimator`` and ``probe_dtype`` resolved for the run (:func:`resolve_estimator`,
        :func:`resolve_probe_dtype`). Under FSDP2 (``sharded``) the probe is the in-place fp32 ``fd`` one: forward AD
        does not pass through FSDP2's all-gathers, so ``"auto"`` and ``"jvp"`` (logged once) both resolve to ``fd``."""
        if sharded:
            main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            if self.estimator == "jvp" and main:
                logger.warning("hf_ghosts: forward-mode AD does not pass through FSDP2's all-gathers; measuring with "
                               "the central finite-difference estimator ('fd', fd_step=%s) instead", self.fd_step)
            estimator, training_dtype = "fd", torch.float32
        else:
            estimator = resolve_estimator(self.estimator, self.probe_dtype, training_dtype, device_type)
        dtype = resolve_probe_dtype(self.probe_dtype, estimator, training_dtype, device_type)
        if estimator == "fd":
            self.refuse_fd_in_16_bits(dtype)
        return replace(self, estimator=estimator, probe_dtype=_dtype_name(dtype))


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PROBE_DTYPES.items() if value == dtype)


def resolve_estimator(setting: str, probe_dtype: str, training_dtype: torch.dtype, device_type: str) -> str:
    """The estimator ``setting`` names: ``"auto"`` -> ``"jvp"`` where the probe runs in 16 bits, else ``"fd"``.

    The probe runs in 16 bits when ``probe_dtype`` says so (``"bfloat16"``, ``"float16"``), or, for
    ``probe_dtype="auto"``, when training is 16-bit on CUDA (see :func:`resolve_probe_dtype`).

    Example:

    >>> resolve_estimator("auto", "auto", torch.bfloat16, "cuda"), resolve_estimator("auto", "auto", torch.bfloat16, "cpu")
    ('jvp', 'fd')
    """
    if setting != "auto":
        return setting
    if probe_dtype == "auto":
        sixteen = _cuda_16_bit(training_dtype, device_type)
    else:
        sixteen = PROBE_DTYPES[probe_dtype] in SIXTEEN_BIT
    return "jvp" if sixteen else "fd"


def resolve_probe_dtype(setting: str, estimator: str, training_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The probe's dtype: ``setting`` itself, or for ``"auto"`` the training dtype where that is 16-bit on CUDA and
    ``estimator`` (already resolved) is ``"jvp"``, else float32. (A 16-bit dtype with ``"fd"`` is refused by
    :meth:`RhoSettings.refuse_fd_in_16_bits`.)

    Example:

    >>> resolve_probe_dtype("auto", "jvp", torch.bfloat16, "cuda")
    torch.bfloat16
    >>> resolve_probe_dtype("auto", "jvp", torch.bfloat16, "cpu"), resolve_probe_dtype("auto", "fd", torch.bfloat16, "cuda")
    (torch.float32, torch.float32)
    """
    dtype = PROBE_DTYPES[setting]
    if dtype is None:
        dtype = training_dtype if _cuda_16_bit(training_dtype, device_type) and estimator == "jvp" else torch.float32
    return dtype


def _cuda_16_bit(training_dtype: torch.dtype, device_type: str) -> bool:
    """Whether training runs in 16 bits on CUDA: where ``"auto"`` probes in that dtype, by JVP (on tensor-core GPUs
    an fp32 matmul is ~10-15x slower than a bf16 one; bf16 central differences are 8-12% off)."""
    return device_type == "cuda" and training_dtype in SIXTEEN_BIT


def defaults_text(spelling: str = "keyword") -> str:
    """Every setting's default as ``name=value`` (spelled per ``spelling``), for docstrings: one source, no copies."""
    defaults = RhoSettings(spelling=spelling)
    return ", ".join(f"``{defaults.name(k)}={getattr(defaults, k)!r}``" for k in SETTINGS)
