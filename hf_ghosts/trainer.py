"""`rho_trainer` and `rho_arguments`: the controller wired into any ``transformers.Trainer`` subclass.

Swap ``Trainer`` for ``RhoTrainer`` (``rho_trainer(Trainer)``), or ``SFTTrainer`` for
``rho_trainer(SFTTrainer)``, and nothing else changes: the optimizer the Trainer builds (or the one
you pass) proposes each step, the controller probes it at the old weights and rescales it
(:mod:`hf_ghosts.controller`), and the ``ghosts/*`` metrics join the Trainer's logs. The arguments
are the base trainer's own dataclass plus the ``rho_*`` fields (``rho_arguments(SFTConfig)``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_ghosts.compat import checkpoint_keys_renamed
from hf_ghosts.controller import RhoController
from hf_ghosts.distributed import check_fsdp_plugin
from hf_ghosts.metrics import define_wandb_metrics
from hf_ghosts.settings import (
    DEFAULT_ESTIMATOR,
    DEFAULT_EVERY,
    DEFAULT_FD_STEP,
    DEFAULT_PROBE_DTYPE,
    DEFAULT_RADIUS,
    DEFAULT_TOPK,
    DEFAULT_TRIGGER_GROWTH,
    DEFAULT_TRIGGER_R,
    ESTIMATOR_CHOICES,
    FFN_MODES,
    MODES,
    PROBE_DTYPES,
    RADII,
    RADIUS_KINDS,
    check_probe_dtype,
    parse_radii,
    validate,
)

__all__ = [
    "RhoArgumentsMixin",
    "RhoControllerState",
    "RhoTrainer",
    "RhoTrainerMixin",
    "RhoTrainingArguments",
    "rho_arguments",
    "rho_trainer",
]

logger = logging.getLogger(__name__)


@dataclass
class RhoArgumentsMixin:
    """The radius controller's settings (all prefixed ``rho_``), mixed into an arguments dataclass by :func:`rho_arguments`.

    Fields (defaults): ``rho_mode="clip"``, ``rho_target=None`` (the mode's: 2.0 clip and monitor, 1.0 set), ``rho_radii=["output", "attention"]``,
    ``rho_watch_radii=[]``, ``rho_ffn_mode="kink"``, ``rho_set_schedule=True``, ``rho_estimator="auto"``,
    ``rho_probe_dtype="auto"``, ``rho_every=16``, ``rho_trigger_r=0.5``, ``rho_trigger_growth=2.0``,
    ``rho_log_per_head=False``, ``rho_fd_step=1e-2``, ``rho_radius="bound"``, ``rho_topk=8``,
    ``rho_rescale_moments=False``.
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
                  "of pi / max Delta; see the README's 'price of safety') and 'monitor', 1.0 for 'set'."},
    )
    rho_radii: list[str] = field(
        default_factory=lambda: ["output", "attention"],
        metadata={"help": f"Radii that limit the step: any of {list(RADII)} ('ffn': the FFN radius in the "
                  "rho_ffn_mode form; 'ffn_activation': Appendix B's activation radius)."},
    )
    rho_watch_radii: list[str] = field(
        default_factory=list,
        metadata={"help": "Radii that are only measured and logged (ghosts/would_bind/<radius>), never limit the step; "
                  "none of them in rho_radii."},
    )
    rho_ffn_mode: str = field(
        default="kink",
        metadata={"help": "Form of the 'ffn' radius: 'kink' (the paper's proxy, the 0.01 quantile of |z|/|z'|) or 'activation' "
                  "(Appendix B: distance to the activation's singularities; inf for exact GELU).",
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
            "help": "'auto' ('jvp' where the probe runs in 16 bits on CUDA, i.e. bf16/fp16 training with "
            "rho_probe_dtype 'auto'; else 'fd'), 'fd' (central finite difference: two forwards, within 1 percent of jvp on every family "
            "swept) or 'jvp' (forward-mode AD, exact; ~1.4x the cost of 'fd' on CPU).",
            "choices": list(ESTIMATOR_CHOICES),
        },
    )
    rho_probe_dtype: str = field(
        default=DEFAULT_PROBE_DTYPE,
        metadata={
            "help": "dtype of the probe's forwards: 'auto' (the bf16/fp16 training dtype on CUDA with the 'jvp' "
            "estimator, else float32), 'float32', 'bfloat16' or 'float16' (16 bits need 'jvp': 'fd' in 16 bits is "
            "rounding noise).",
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
            "help": "With rho_every > 1: probe at once when the step's applied r estimated with the last rho exceeds "
            "rho_trigger_r * rho_target (> 0; <= 1 measures every clipped step afresh; inf: off)."
        },
    )
    rho_trigger_growth: float = field(
        default=DEFAULT_TRIGGER_GROWTH,
        metadata={"help": "With rho_every > 1: probe at once when |u| exceeds this factor times |u| at the last probe (>= 1; inf: off)."},
    )
    rho_log_per_head: bool = field(default=False, metadata={"help": "Also log ghosts/rho_attn/layer_{l}/head_{h}."})
    rho_fd_step: float = field(default=DEFAULT_FD_STEP, metadata={"help": "Step h of the 'fd' estimator along the unit direction."})
    rho_radius: str = field(
        default=DEFAULT_RADIUS,
        metadata={"help": "The output radius: 'bound' (pi / max Delta) or 'topk_exact' (certified exact radii of the rho_topk "
                  "widest tokens, capped by pi / Delta of the next: still a lower bound, never smaller than 'bound').",
                  "choices": list(RADIUS_KINDS)},
    )
    rho_topk: int = field(default=DEFAULT_TOPK, metadata={"help": "Tokens given an exact radius with rho_radius='topk_exact' (>= 1)."})
    rho_rescale_moments: bool = field(
        default=False,
        metadata={"help": "When a step is scaled by s, scale the optimizer's first moment (exp_avg) by s too, so the "
                  "momentum carries the step actually taken (Adam-family optimizers only)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rho_radii = list(parse_radii(self.rho_radii))
        self.rho_watch_radii = list(parse_radii(self.rho_watch_radii or []))
        validate("RhoTrainingArguments", self.rho_settings(), arguments=True)
        if self.rho_estimator == "fd" and PROBE_DTYPES[self.rho_probe_dtype] is not None:
            check_probe_dtype("RhoTrainingArguments", "fd", PROBE_DTYPES[self.rho_probe_dtype], arguments=True)

    def rho_settings(self) -> dict[str, Any]:
        """The ``rho_*`` fields under the controller's keywords (``rho_target`` -> ``r_target``, ...)."""
        return {
            "mode": self.rho_mode,
            "r_target": self.rho_target,
            "radii": tuple(self.rho_radii),
            "watch_radii": tuple(self.rho_watch_radii),
            "ffn_mode": self.rho_ffn_mode,
            "set_schedule": self.rho_set_schedule,
            "estimator": self.rho_estimator,
            "probe_dtype": self.rho_probe_dtype,
            "every": self.rho_every,
            "trigger_r": self.rho_trigger_r,
            "trigger_growth": self.rho_trigger_growth,
            "log_per_head": self.rho_log_per_head,
            "fd_step": self.rho_fd_step,
            "radius": self.rho_radius,
            "topk": self.rho_topk,
            "rescale_moments": self.rho_rescale_moments,
        }

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


class RhoControllerState(TrainerCallback, ExportableState):
    """Carries ``RhoController.state_dict()`` in each checkpoint's ``trainer_state.json`` and loads it back on resume.

    Trainer saves :meth:`state` under ``stateful_callbacks["RhoControllerState"]``; on resume ``TrainerState`` holds
    the saved one when ``on_train_begin`` runs (after the weights and the optimizer were loaded). It is loaded
    whatever ``restore_callback_states_from_checkpoint`` says: like the optimizer's moments it is training state.
    Build it with :meth:`bound_to`: with ``restore_callback_states_from_checkpoint=True`` Trainer replaces the
    callback by ``type(callback)(**args)``, which must still know the controller.
    """

    controller: RhoController

    @classmethod
    def bound_to(cls, controller: RhoController) -> RhoControllerState:
        """An instance of a subclass (same name) whose instances all hold ``controller``."""
        return type(cls.__name__, (cls,), {"controller": controller})()

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"controller_state": self.controller.state_dict()}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        if saved is None:  # a checkpoint written without this callback (by plain Trainer, say)
            logger.warning("hf_ghosts: the checkpoint holds no RhoController state; the controller starts afresh")
            state.stateful_callbacks[type(self).__name__] = self.state()  # Trainer's next save looks it up
            return
        self.controller.load_state_dict(saved["attributes"]["controller_state"])


_BUILT: dict[tuple[str, type], type] = {}


def _register(kind: str, base: type, built: type) -> type:
    """Cache ``built`` for ``base`` and make it importable from this module under its name (pickling, deepcopy)."""
    module = sys.modules[__name__]
    if getattr(module, built.__name__, built) is not built:  # another base of the same name got the name first
        built.__qualname__ = built.__name__ = f"{built.__name__}_{len(_BUILT)}"
    setattr(module, built.__name__, built)
    _BUILT[kind, base] = built
    return built


def rho_arguments(args_cls: type[TrainingArguments] = TrainingArguments) -> type:
    """The arguments dataclass ``args_cls`` plus the ``rho_*`` fields (:class:`RhoArgumentsMixin`), ready for
    ``HfArgumentParser``; named ``Rho<name>`` (``rho_arguments(SFTConfig)`` is ``RhoSFTConfig``), built once per class.

    Example: ``rho_arguments(TrainingArguments) is RhoTrainingArguments``; a class that already has the ``rho_*``
    fields is returned as it is.
    """
    if not (isinstance(args_cls, type) and issubclass(args_cls, TrainingArguments)):
        raise TypeError(f"rho_arguments: expects a TrainingArguments subclass; got {args_cls!r}")
    if issubclass(args_cls, RhoArgumentsMixin):
        return args_cls
    if ("arguments", args_cls) in _BUILT:
        return _BUILT["arguments", args_cls]
    name = f"Rho{args_cls.__name__}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"``{args_cls.__name__}`` plus the radius controller's ``rho_*`` settings "
        f"(see :class:`RhoArgumentsMixin`).\n\n{RhoArgumentsMixin.__doc__}",
    }
    return _register("arguments", args_cls, dataclass(type(name, (RhoArgumentsMixin, args_cls), namespace)))


RhoTrainingArguments = rho_arguments(TrainingArguments)


# Trainers whose loss is not a softmax cross-entropy of the logits the model returns for the batch it is handed.
_PREFERENCE = (
    "its loss is a logistic loss -log sigmoid(beta * m) of the margin m between sequence log-probability "
    "differences (chosen vs rejected, against a reference model), not a softmax cross-entropy over the vocabulary "
    "at each token. The output softmax does sit inside every log-probability, so pi / Delta stays a singularity "
    "of the loss, but the logistic term adds singularities of its own (beta * m = i pi (2k + 1)) that the probe "
    "does not measure, and the model is called on batches the loss builds (chosen and rejected concatenated), "
    "not on the batch the trainer steps on: the radius the controller would clip to is not this loss's radius"
)
_RL = (
    "its loss is a policy-gradient objective on sampled completions (advantages, clipped ratios, a KL term), not "
    "a softmax cross-entropy of the logits of the training batch: the radius of its loss is not what the probe measures"
)
UNSUPPORTED_TRAINERS: dict[str, str] = {
    "DPOTrainer": _PREFERENCE,
    "OnlineDPOTrainer": _PREFERENCE,
    "CPOTrainer": _PREFERENCE,
    "ORPOTrainer": _PREFERENCE,
    "KTOTrainer": _PREFERENCE.replace("chosen vs rejected", "desirable vs undesirable"),
    "BCOTrainer": _PREFERENCE.replace("chosen vs rejected", "desirable vs undesirable"),
    "RewardTrainer": "its model is a sequence classifier trained with a Bradley-Terry loss on reward differences, "
    "not a language model's per-token softmax cross-entropy",
    "GRPOTrainer": _RL,
    "RLOOTrainer": _RL,
    "PPOTrainer": _RL,
    "GKDTrainer": "its loss is a generalized Jensen-Shannon divergence to a teacher's distribution on sampled "
    "completions, not a cross-entropy on the batch's labels",
}


def _arguments_class_of(trainer_cls: type) -> type[TrainingArguments]:
    """The arguments class ``trainer_cls.__init__`` asks for (``args: SFTConfig | TrainingArguments | None`` ->
    ``SFTConfig``, the most derived); ``TrainingArguments`` when its annotation does not say."""
    try:
        hint = typing.get_type_hints(trainer_cls.__init__).get("args")
    except Exception:  # unresolvable forward references: fall back to the plain arguments
        return TrainingArguments
    found = [c for c in typing.get_args(hint) or (hint,) if isinstance(c, type) and issubclass(c, TrainingArguments)]
    found = [c for c in found if not issubclass(c, RhoArgumentsMixin)]
    return max(found, key=lambda c: len(c.__mro__), default=TrainingArguments)


class RhoTrainerMixin:
    """What :func:`rho_trainer` adds to a ``Trainer`` subclass: the controller on the optimizer's step hooks.

    Accepts everything the base trainer accepts; its own arguments (``SFTConfig`` for ``SFTTrainer``, plain
    ``TrainingArguments``) are upgraded to :attr:`rho_arguments_class` with every value kept and default ``rho_*``
    settings. The controller is :attr:`rho_controller` (a :class:`~hf_ghosts.controller.RhoController`).
    """

    rho_arguments_class: type = RhoTrainingArguments

    def __init__(self, model: torch.nn.Module | None = None, args: TrainingArguments | None = None, *rest: Any, **kwargs: Any) -> None:
        if args is not None and not isinstance(args, self.rho_arguments_class):
            # SFTConfig -> RhoSFTConfig; a plain TrainingArguments for SFTTrainer gets SFTConfig's defaults besides
            args = self.rho_arguments_class.from_training_arguments(args)
        super().__init__(model, args, *rest, **kwargs)
        if not isinstance(self.args, RhoArgumentsMixin):  # args=None: the base trainer built its default arguments
            self.args = rho_arguments(type(self.args)).from_training_arguments(self.args)
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"{type(self).__name__} does not support DeepSpeed: its engine steps the optimizer on flattened fp32 "
                "partitions inside backward and copies them to the model afterwards, so the update cannot be measured "
                "or rescaled after AdamW. Use DDP or FSDP (see the README's 'Multiple GPUs'), or the plain trainer."
            )
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin)  # FSDP2 in fp32 only; FSDP1 is refused
        self.rho_controller = RhoController(
            self.model, arguments=True, training_dtype=training_dtype(self.args), **self.args.rho_settings()
        )
        self.rho_controller.peak_lr = self.args.learning_rate  # set mode: r*(t) = rho_target * lr(t) / learning_rate
        self.add_callback(RhoControllerState.bound_to(self.rho_controller))
        self._wandb_metrics_defined = False

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        self.rho_controller.attach(self.optimizer)
        return optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a run that does not resume starts the controller from clean counters."""
        if not resume_from_checkpoint:
            self.rho_controller.reset()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.is_fsdp_enabled and not self.rho_controller.sharded:
            # accelerator.prepare sharded the model (FSDP2 swaps in DTensor parameters): follow it
            self.rho_controller.rebind(self.model)
        self.rho_controller.observe(self._prepare_inputs(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.rho_controller.pop_metrics())
            if not self._wandb_metrics_defined:
                self._wandb_metrics_defined = define_wandb_metrics(self.args)
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        with checkpoint_keys_renamed(self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        with checkpoint_keys_renamed(self.model):
            super()._load_best_model()


def rho_trainer(trainer_cls: type[Trainer] = Trainer) -> type:
    """``trainer_cls`` (``Trainer`` or any subclass: ``SFTTrainer``, ...) with the radius controller wired in.

    The class is built once per ``trainer_cls`` and named ``Rho<name>`` (``rho_trainer(SFTTrainer)`` is
    ``RhoSFTTrainer``); it takes the base trainer's arguments and upgrades them to
    ``rho_arguments(<its arguments class>)`` (``RhoSFTConfig``), keeping every value. Trainers whose loss is not a
    softmax cross-entropy of the model's logits on the training batch (DPO, KTO, GRPO, ...;
    :data:`UNSUPPORTED_TRAINERS`) are refused with the reason.

    Example::

        RhoSFTTrainer = rho_trainer(SFTTrainer)
        trainer = RhoSFTTrainer(model=model, args=SFTConfig(output_dir="out", rho_target=1.0), train_dataset=data)
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"rho_trainer: expects transformers.Trainer or a subclass of it; got {trainer_cls!r}")
    if issubclass(trainer_cls, RhoTrainerMixin):
        return trainer_cls
    if ("trainer", trainer_cls) in _BUILT:
        return _BUILT["trainer", trainer_cls]
    for base in trainer_cls.__mro__:
        if base.__name__ in UNSUPPORTED_TRAINERS:
            raise ValueError(
                f"rho_trainer({trainer_cls.__name__}): the radius controller does not apply: "
                f"{base.__name__}'s {UNSUPPORTED_TRAINERS[base.__name__]}. Use SFTTrainer or Trainer (token cross-entropy)."
            )
    name = "RhoTrainer" if trainer_cls is Trainer else f"Rho{trainer_cls.__name__}"
    arguments = rho_arguments(_arguments_class_of(trainer_cls))
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"``{trainer_cls.__name__}`` whose every optimizer step stays inside the convergence radius.\n\n"
        f"Arguments: ``{arguments.__name__}``. {RhoTrainerMixin.__doc__}",
        "rho_arguments_class": arguments,
    }
    return _register("trainer", trainer_cls, type(name, (RhoTrainerMixin, trainer_cls), namespace))


RhoTrainer = rho_trainer(Trainer)
