"""`RhoTrainer` and `RhoTrainingArguments`: the controller wired into ``transformers.Trainer``.

Swap ``Trainer`` for ``RhoTrainer`` and nothing else changes: the optimizer the Trainer builds
(or the one you pass) proposes each step, the controller probes it at the old weights and
rescales it (:mod:`hf_ghosts.controller`), and the ``ghosts/*`` metrics join the Trainer's logs.
"""

from __future__ import annotations

import dataclasses
import logging
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
    DEFAULT_TRIGGER_GROWTH,
    DEFAULT_TRIGGER_R,
    ESTIMATORS,
    FFN_MODES,
    MODES,
    RADII,
    parse_radii,
    validate,
)

__all__ = ["RhoControllerState", "RhoTrainer", "RhoTrainingArguments"]

logger = logging.getLogger(__name__)


@dataclass
class RhoTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the radius controller's settings (all prefixed ``rho_``).

    Fields (defaults): ``rho_mode="clip"``, ``rho_target=1.0``, ``rho_radii=["output", "attention"]``,
    ``rho_watch_radii=[]``, ``rho_ffn_mode="kink"``, ``rho_set_schedule=True``, ``rho_estimator="fd"``,
    ``rho_every=16``, ``rho_trigger_r=0.5``, ``rho_trigger_growth=2.0``, ``rho_log_per_head=False``,
    ``rho_fd_step=1e-2``.
    Everything else is ``TrainingArguments`` unchanged. The probing defaults keep the cost near 1.1 plain steps
    (``benchmarks/overhead.py``); ``rho_estimator="jvp", rho_every=1`` measures every step exactly, as in the paper.
    """

    rho_mode: str = field(
        default="clip",
        metadata={
            "help": "'clip': scale the update by min(1, rho_target*rho/|u|); 'set': make the step length exactly "
            "rho_target*rho (direction from the optimizer); 'monitor': measure and log only.",
            "choices": list(MODES),
        },
    )
    rho_target: float = field(default=1.0, metadata={"help": "Target normalized step r* = |u| / rho (> 0)."})
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
            "help": "'fd' (central finite difference: two forwards, relative error ~1e-3 or less) or 'jvp' "
            "(forward-mode AD, exact; ~1.4x the cost of 'fd' on CPU).",
            "choices": list(ESTIMATORS),
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rho_radii = list(parse_radii(self.rho_radii))
        self.rho_watch_radii = list(parse_radii(self.rho_watch_radii or []))
        validate("RhoTrainingArguments", self.rho_settings(), arguments=True)

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
            "every": self.rho_every,
            "trigger_r": self.rho_trigger_r,
            "trigger_growth": self.rho_trigger_growth,
            "log_per_head": self.rho_log_per_head,
            "fd_step": self.rho_fd_step,
        }

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **rho_fields: Any) -> RhoTrainingArguments:
        """Upgrade plain ``TrainingArguments`` (their values kept) with default or given ``rho_*`` fields."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
        return cls(**{**values, **rho_fields})


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


class RhoTrainer(Trainer):
    """A ``Trainer`` whose every optimizer step stays inside the convergence radius.

    Accepts everything ``Trainer`` accepts; plain ``TrainingArguments`` are upgraded to
    :class:`RhoTrainingArguments` with default ``rho_*`` settings. The controller is
    :attr:`rho_controller` (a :class:`~hf_ghosts.controller.RhoController`).
    """

    def __init__(self, model: torch.nn.Module | None = None, args: TrainingArguments | None = None, *rest: Any, **kwargs: Any) -> None:
        if args is not None and not isinstance(args, RhoTrainingArguments):
            args = RhoTrainingArguments.from_training_arguments(args)
        super().__init__(model, args, *rest, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(
                "RhoTrainer does not support DeepSpeed: its engine steps the optimizer on flattened fp32 partitions "
                "inside backward and copies them to the model afterwards, so the update cannot be measured or "
                "rescaled after AdamW. Use DDP or FSDP (see the README's 'Multiple GPUs'), or plain Trainer."
            )
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin)  # FSDP2 in fp32 only; FSDP1 is refused
        self.rho_controller = RhoController(self.model, **self.args.rho_settings())
        self.rho_controller.peak_lr = self.args.learning_rate  # set mode: r*(t) = rho_target * lr(t) / learning_rate
        self.add_callback(RhoControllerState.bound_to(self.rho_controller))
        self._wandb_metrics_defined = False

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        self.rho_controller.attach(self.optimizer)
        return optimizer

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
