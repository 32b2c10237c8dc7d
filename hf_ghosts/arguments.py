"""`rho_arguments(args_cls)` / `RhoTrainingArguments`: the ``rho_*`` fields mixed into any arguments dataclass.

TRL's ``*_config.py`` shape: every field ``field(default=..., metadata={"help": ...})``, validated in ``__post_init__``;
``rho_arguments(SFTConfig)`` is ``RhoSFTConfig``. :func:`training_dtype` reads the dtype a Trainer computes in.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from hf_ghosts.settings import (
    DEFAULT_BLOCK_REFRESH,
    DEFAULT_ESTIMATOR,
    DEFAULT_EVERY,
    DEFAULT_FD_STEP,
    DEFAULT_FFN_MODE,
    DEFAULT_FFN_QUANTILE,
    DEFAULT_PROBE_DTYPE,
    DEFAULT_RADII,
    DEFAULT_RADIUS,
    DEFAULT_TOPK,
    DEFAULT_TRIGGER_GROWTH,
    DEFAULT_TRIGGER_R,
    DEFAULT_VOCAB_CHUNK,
    ESTIMATOR_CHOICES,
    FFN_MODES,
    GRANULARITIES,
    MODES,
    PROBE_DTYPES,
    RADII,
    RADIUS_KINDS,
    SETTINGS,
    RhoSettings,
    defaults_text,
    parse_radii,
)

__all__ = ["BUILT", "RhoArgumentsMixin", "RhoTrainingArguments", "register_built", "rho_arguments", "training_dtype"]


@dataclass
class RhoArgumentsMixin:
    """The radius controller's settings (all prefixed ``rho_``), mixed into an arguments dataclass by :func:`rho_arguments`.

    Fields and defaults: see :mod:`hf_ghosts.settings` (listed below).
    Everything else is the base arguments class (``TrainingArguments``, ``SFTConfig``, ...) unchanged. The probing defaults keep the cost near 1.1 plain steps
    (``benchmarks/overhead.py``); ``rho_estimator="jvp", rho_every=1`` measures every step exactly, as in the paper.
    ``"auto"`` resolves from ``bf16``/``fp16`` and the device: a JVP in the 16-bit training dtype on CUDA, central
    differences in fp32 otherwise (see :func:`hf_ghosts.settings.resolve_estimator` / ``resolve_probe_dtype``).
    """

    rho_mode: str = field(
        default="clip",
        metadata={
            "help": "'clip': scale the update by min(1, rho_target*rho/|u|); 'set': make the step length exactly "
            "rho_target*rho (direction from the optimizer); 'monitor': measure and log only.",
            "choices": list(MODES),
        },
    )
    rho_target: float | None = field(
        default=None,
        metadata={"help": "Target normalized step r* = |u| / rho (> 0). None: the mode's default, 2.0 for 'clip' (in units "
                  "of pi / max Delta, which sits 2.4-3.5x below the widest tokens' true radius; see docs/cost.md, 'The "
                  "price of safety') and 'monitor', 1.0 for 'set'. 1.0 keeps every probed step inside the radius "
                  "measured, a lower bound on the true one with either rho_radius."},
    )
    rho_radii: list[str] = field(
        default_factory=lambda: list(DEFAULT_RADII),
        metadata={"help": f"Radii that limit the step: any of {list(RADII)} ('ffn': the FFN radius in the "
                  "rho_ffn_mode form; 'ffn_activation': Appendix B's activation radius)."},
    )
    rho_watch_radii: list[str] = field(
        default_factory=list,
        metadata={"help": "Radii that are only measured and logged (ghosts/rho_*, and ghosts/would_bind/<radius> when "
                  "one lies below every limiting radius), never limit the step; a radius in both lists is refused."},
    )
    rho_ffn_mode: str = field(
        default=DEFAULT_FFN_MODE,
        metadata={"help": "Form of the 'ffn' radius: 'kink' (the paper's proxy, the rho_ffn_quantile quantile of "
                  "|z|/|z'|) or 'activation' (Appendix B, eq. 21: distance to the activation's complex "
                  "singularities; SiLU sqrt(z^2 + pi^2), tanh-GELU from its cubic, inf for exact GELU).",
                  "choices": list(FFN_MODES)},
    )
    rho_set_schedule: bool = field(
        default=True,
        metadata={"help": "rho_mode='set': the target follows the LR schedule, r*(t) = rho_target * lr(t) / learning_rate "
                  "(warm-up and decay); False: r* = rho_target throughout."},
    )
    rho_estimator: str = field(
        default=DEFAULT_ESTIMATOR,
        metadata={
            "help": "'auto' ('jvp' where the probe runs in 16 bits on CUDA: bf16/fp16 training with rho_probe_dtype "
            "'auto', or a 16-bit rho_probe_dtype; else 'fd', on CPU and in fp32 training), 'fd' (central differences, "
            "two forwards; a step check on the first probe, every 8th and when the direction's make-up changes keeps "
            "their estimated error at most 0.3 percent, and where no step gets it under 1 percent jvp measures "
            "instead, with a warning) or 'jvp' (forward-mode AD, exact; ~1.4x the cost of 'fd' on CPU).",
            "choices": list(ESTIMATOR_CHOICES),
        },
    )
    rho_probe_dtype: str = field(
        default=DEFAULT_PROBE_DTYPE,
        metadata={
            "help": "dtype of the probe's forwards: 'auto' (the bf16/fp16 training dtype on CUDA with the 'jvp' "
            "estimator, else float32), 'float32', 'bfloat16', 'float16' or 'float64'. 16 bits need 'jvp': central "
            "differences in bf16 are rounding noise (error ~ eps |z| / h, 8-12 percent off the radius), while a bf16 "
            "JVP is within 0.4 percent of fp32. Not fp32 on a GPU by default: an fp32 matmul runs ~10-15x slower "
            "than bf16 on tensor cores.",
            "choices": list(PROBE_DTYPES),
        },
    )
    rho_every: int = field(
        default=DEFAULT_EVERY,
        metadata={
            "help": "Probe at least every k optimizer steps; in between, a step reuses the last rho unless "
            "rho_trigger_r or rho_trigger_growth fires (1: probe every step)."
        },
    )
    rho_trigger_r: float = field(
        default=DEFAULT_TRIGGER_R,
        metadata={
            "help": "With rho_every > 1, in 'clip' and 'set': probe at once when the step's applied r estimated with "
            "the last rho exceeds rho_trigger_r * rho_target (> 0; <= 1 measures every clipped step afresh; inf: "
            "off). 'monitor' changes no step: it probes every rho_every steps and on growth only."
        },
    )
    rho_trigger_growth: float = field(
        default=DEFAULT_TRIGGER_GROWTH,
        metadata={"help": "With rho_every > 1: probe at once when |u| exceeds this factor times |u| at the last probe (>= 1; inf: off)."},
    )
    rho_log_per_head: bool = field(default=False, metadata={"help": "Also log ghosts/rho_attn/layer_{l}/head_{h}."})
    rho_fd_step: float = field(
        default=DEFAULT_FD_STEP,
        metadata={"help": "Widest step h of the 'fd' estimator along the unit direction: its error check (first probe, "
                  "every 8th, and when the direction's make-up changes) measures at h and h/2 and shrinks h until the "
                  "spreads' estimated relative error is at most 3e-3, and measures by jvp where no step reaches 1e-2 "
                  "(logged: ghosts/fd_step, ghosts/fd_error, ghosts/fd_fallback)."},
    )
    rho_radius: str = field(
        default=DEFAULT_RADIUS,
        metadata={"help": "The output radius: 'bound' (pi / max Delta, Theorem 4.6) or 'topk_exact' (certified exact "
                  "radii of the rho_topk widest tokens, capped by pi / Delta of the next: still a lower bound, never "
                  "smaller than 'bound'; its cost: docs/cost.md, 'The price of safety').",
                  "choices": list(RADIUS_KINDS)},
    )
    rho_topk: int = field(
        default=DEFAULT_TOPK,
        metadata={"help": "Tokens given an exact radius with rho_radius='topk_exact' (>= 1; repeated rows, e.g. the "
                  "first position of sequences that start alike, count once)."},
    )
    rho_rescale_moments: bool = field(
        default=False,
        metadata={"help": "When a step is scaled by s, scale the optimizer's first moment (exp_avg) by s too, so the "
                  "momentum carries the step actually taken (Adam-family optimizers only: another optimizer is "
                  "refused when it is attached)."},
    )
    rho_granularity: str | None = field(
        default=None,
        metadata={"help": "How a clipped step is shortened. None: the mode's default, 'blocks' for 'clip' and 'global' "
                  "for 'set' and 'monitor' (which clip no step; 'blocks' is refused there). 'global' scales the whole "
                  "update by one factor; 'blocks' scales its parameter blocks (embeddings, q/k, v/o, MLP, norms, final "
                  "norm, head) one by one, sharing the spread budget among the blocks that lower the loss (in "
                  "proportion to d_b^2 / C_b: a block's predicted decrease squared over its spread, "
                  "radii.block_allocation), then measures the step taken and scales it to r <= rho_target (the "
                  "certificate). Costs a probe per moving block where due (rho_block_refresh) and one for the step "
                  "taken; unclipped steps are as with 'global'. Under DDP and FSDP2 alike. See docs/usage.md, "
                  "'Block-wise steps'.",
                  "choices": list(GRANULARITIES)},
    )
    rho_block_refresh: int = field(
        default=DEFAULT_BLOCK_REFRESH,
        metadata={"help": "With rho_granularity='blocks': measure the blocks' spreads on every k-th block-wise step and "
                  "reuse them in between, times each block's current |u_b| (>= 1; 1: every block-wise step). The step "
                  "taken is measured every time, so the certificate holds whatever k."},
    )

    rho_ffn_quantile: float = field(
        default=DEFAULT_FFN_QUANTILE, metadata={"help": "Quantile of the FFN kink proxy |z| / |z'| (the paper's 0.01), in (0, 1)."},
    )
    rho_vocab_chunk: int = field(
        default=DEFAULT_VOCAB_CHUNK, metadata={"help": "Output-head rows (vocabulary entries) per block of the probe's chunked head."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rho_radii = list(parse_radii(self.rho_radii))
        self.rho_watch_radii = list(parse_radii(self.rho_watch_radii or []))
        self.rho_settings()  # validated here, at construction: the error names the rho_* field

    def rho_settings(self) -> RhoSettings:
        """The ``rho_*`` fields as the one settings object (:class:`~hf_ghosts.settings.RhoSettings`), spelled as
        these arguments spell them (errors name ``rho_radii``, not ``radii``)."""
        values = {keyword: getattr(self, setting.argument) for keyword, setting in SETTINGS.items()}
        return RhoSettings.of("RhoTrainingArguments", "argument", **values)

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **rho_fields: Any) -> Any:
        """Upgrade ``args`` (an instance of this class's base arguments class, or of any ``TrainingArguments``
        whose fields it has) to this class, every value kept, with default or given ``rho_*`` fields."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(args)
            if f.init and f.name in known and hasattr(args, f.name)
        }
        return cls(**{**values, **rho_fields})


def training_dtype(args: TrainingArguments) -> torch.dtype | None:
    """The dtype a Trainer computes in: bf16/fp16 under ``args.bf16``/``args.fp16``, else ``None`` (the parameters')."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


BUILT: dict[tuple[str, type], type] = {}


def register_built(kind: str, base: type, built: type, module_name: str = __name__) -> type:
    """Cache ``built`` for ``base`` and make it importable from ``module_name`` under its name (pickling, deepcopy)."""
    module = sys.modules[module_name]
    if getattr(module, built.__name__, built) is not built:  # another base of the same name got the name first
        built.__qualname__ = built.__name__ = f"{built.__name__}_{len(BUILT)}"
    setattr(module, built.__name__, built)
    BUILT[kind, base] = built
    return built


def rho_arguments(args_cls: type[TrainingArguments] = TrainingArguments) -> type:
    """The arguments dataclass ``args_cls`` plus the ``rho_*`` fields (:class:`RhoArgumentsMixin`), ready for
    ``HfArgumentParser``; named ``Rho<name>`` (``rho_arguments(SFTConfig)`` is ``RhoSFTConfig``), built once per class.

    Example (a class that already has the ``rho_*`` fields is returned as it is):

    >>> rho_arguments(TrainingArguments) is RhoTrainingArguments, rho_arguments(RhoTrainingArguments) is RhoTrainingArguments
    (True, True)
    >>> RhoTrainingArguments(output_dir="out", rho_radii="output,ffn").rho_radii
    ['output', 'ffn']
    """
    if not (isinstance(args_cls, type) and issubclass(args_cls, TrainingArguments)):
        raise TypeError(f"rho_arguments: expects a TrainingArguments subclass; got {args_cls!r}")
    if issubclass(args_cls, RhoArgumentsMixin):
        return args_cls
    if ("arguments", args_cls) in BUILT:
        return BUILT["arguments", args_cls]
    name = f"Rho{args_cls.__name__}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"``{args_cls.__name__}`` plus the radius controller's ``rho_*`` settings "
        f"(see :class:`RhoArgumentsMixin`).\n\n{RhoArgumentsMixin.__doc__}",
    }
    return register_built("arguments", args_cls, dataclass(type(name, (RhoArgumentsMixin, args_cls), namespace)))


RhoArgumentsMixin.__doc__ += "\n    Defaults: " + defaults_text("argument") + "\n"
RhoTrainingArguments = rho_arguments(TrainingArguments)
