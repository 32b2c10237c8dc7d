"""`rho_trainer` and `rho_arguments`: the controller wired into any ``transformers.Trainer`` subclass.

Swap ``Trainer`` for ``RhoTrainer`` (``rho_trainer(Trainer)``), or ``SFTTrainer`` for
``rho_trainer(SFTTrainer)``, and nothing else changes: the optimizer the Trainer builds (or the one
you pass) proposes each step, the controller probes it at the old weights and rescales it
(:mod:`hf_ghosts.controller`), and the ``ghosts/*`` metrics join the Trainer's logs. The arguments
are the base trainer's own dataclass plus the ``rho_*`` fields (``rho_arguments(SFTConfig)``).
"""

from __future__ import annotations

import logging
import typing
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_ghosts.architectures import FfnSpec
from hf_ghosts.arguments import (
    BUILT,
    RhoArgumentsMixin,
    RhoTrainingArguments,
    register_built,
    rho_arguments,
    training_dtype,
)
from hf_ghosts.compat import checkpoint_keys_renamed
from hf_ghosts.controller import RhoController
from hf_ghosts.distributed import check_fsdp_plugin
from hf_ghosts.metrics import define_wandb_metrics

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

    Besides, three keywords of the constructor tell the probe about the model (objects, not settings, so not fields
    of the JSON/CLI arguments): ``rho_ffn_spec`` (an :class:`~hf_ghosts.architectures.FfnSpec`: where the FFN
    pre-activations live, for a ``model_type`` the FFN table does not know), ``rho_shift_labels`` (whether logits
    at ``t`` predict ``labels[t + 1]``; ``None``: for generative models) and ``rho_chunked_head`` (``None``: the
    chunked head where it is provably the same computation; ``True``: require it; ``False``: the full logits). They
    are :class:`~hf_ghosts.probe.RadiusProbe`'s ``ffn_spec``, ``shift_labels`` and ``chunked_head``.
    """

    rho_arguments_class: type = RhoTrainingArguments

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        *rest: Any,
        rho_ffn_spec: FfnSpec | None = None,
        rho_shift_labels: bool | None = None,
        rho_chunked_head: bool | None = None,
        **kwargs: Any,
    ) -> None:
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
                "or rescaled after AdamW. Use DDP or FSDP (see docs/usage.md, 'Multiple GPUs'), or the plain trainer."
            )
        settings = self.args.rho_settings()
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin)  # FSDP2 in fp32 only; FSDP1 is refused
        self.rho_controller = RhoController(
            self.model, settings=settings, training_dtype=training_dtype(self.args),
            ffn_spec=rho_ffn_spec, shift_labels=rho_shift_labels, chunked_head=rho_chunked_head,
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

    ``rho_trainer(SFTTrainer)(model=model, args=rho_arguments(SFTConfig)(output_dir="out", rho_target=1.0),
    train_dataset=data)`` trains with TRL's SFT and the controller (a plain ``SFTConfig`` works too: it is upgraded).

    Example:

    >>> rho_trainer(Trainer) is RhoTrainer, rho_trainer(RhoTrainer) is RhoTrainer
    (True, True)
    >>> class DPOTrainer(Trainer): ...
    >>> rho_trainer(DPOTrainer)
    Traceback (most recent call last):
    ...
    ValueError: rho_trainer(DPOTrainer): the radius controller does not apply to DPOTrainer: its loss is a logistic ...
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"rho_trainer: expects transformers.Trainer or a subclass of it; got {trainer_cls!r}")
    if issubclass(trainer_cls, RhoTrainerMixin):
        return trainer_cls
    if ("trainer", trainer_cls) in BUILT:
        return BUILT["trainer", trainer_cls]
    for base in trainer_cls.__mro__:
        if base.__name__ in UNSUPPORTED_TRAINERS:
            raise ValueError(
                f"rho_trainer({trainer_cls.__name__}): the radius controller does not apply to {base.__name__}: "
                f"{UNSUPPORTED_TRAINERS[base.__name__]}. Use SFTTrainer or Trainer (token cross-entropy)."
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
    return register_built("trainer", trainer_cls, type(name, (RhoTrainerMixin, trainer_cls), namespace), __name__)


RhoTrainer = rho_trainer(Trainer)
