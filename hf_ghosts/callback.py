"""`RhoCallback`: watch ``r`` and the radii from any ``Trainer`` (monitoring only).

It never changes weights, optimizer state or data order: it snapshots the weights before each
optimizer step, measures the step the optimizer really made, and adds the ``ghosts/*`` keys to
the Trainer's logs (``ghosts/r_applied == ghosts/r``). It shares its engine with ``RhoTrainer``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_ghosts.arguments import training_dtype
from hf_ghosts.controller import RhoController
from hf_ghosts.metrics import define_wandb_metrics
from hf_ghosts.probe.radius_probe import MODEL_KEYWORDS
from hf_ghosts.settings import RhoSettings

__all__ = ["RhoCallback"]


class RhoCallback(TrainerCallback):
    """Log ``ghosts/*`` metrics for the real optimizer update of any ``Trainer`` (subclasses included).

    Use :meth:`install` so the keys are added before reporting callbacks (W&B, ...) see the logs::

        trainer = Trainer(model=model, args=args, train_dataset=train)
        RhoCallback.install(trainer, radii=("output", "attention"))

    Added as ``callbacks=[RhoCallback()]`` it still fills ``trainer.state.log_history``, but
    reporting callbacks that run before it do not see the keys.

    Args:
        settings: as for :class:`~hf_ghosts.controller.RhoController` (``radii``, ``watch_radii``, ``estimator``,
            ``every``, ``log_per_head``, ``trigger_growth``, ``ffn_mode``, ...; defaults in :mod:`hf_ghosts.settings`),
            validated here, and the probe's model-specific keywords (``ffn_spec``, ``shift_labels``,
            ``chunked_head``; any other name is a ``TypeError`` here, not at ``on_train_begin``). Its mode is always ``"monitor"``: it probes every ``every`` steps and when ``|u|``
            grows, and never changes the step, NaN and inf gradients included. ``every=1, estimator="jvp"`` measures
            every step exactly. ``radii`` are those that would limit under ``RhoTrainer`` (``ghosts/rho``,
            ``ghosts/bottleneck/*``), ``watch_radii`` the others.
    """

    def __init__(self, **settings: Any) -> None:
        if "mode" in settings or "settings" in settings:
            raise TypeError("RhoCallback: always monitors (mode='monitor'); to clip or set the step use RhoTrainer")
        self.settings, self.probe_keywords = RhoSettings.from_call(
            "RhoCallback", None, settings, allowed=MODEL_KEYWORDS, mode="monitor"
        )
        self.controller: RhoController | None = None
        self._hook: Any = None
        self._wandb_metrics_defined = False

    @classmethod
    def install(cls, trainer: Any, **settings: Any) -> RhoCallback:
        """Create a callback and put it first in ``trainer``'s callbacks, ahead of the reporters."""
        callback = cls(**settings)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def _observe(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if module.training and self.controller is not None:
            if args:
                raise TypeError("RhoCallback: the model was called with positional inputs; the Trainer passes a dict of kwargs")
            self.controller.observe(kwargs)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise ValueError("RhoCallback: the Trainer passed no model or optimizer to on_train_begin")
        if getattr(args, "deepspeed", None):
            raise ValueError("RhoCallback does not support DeepSpeed: the engine updates the weights outside the optimizer hooks")
        self.controller = RhoController(
            model, optimizer, settings=self.settings, training_dtype=training_dtype(args), **self.probe_keywords
        )
        self.controller.attach()
        self._hook = model.register_forward_pre_hook(self._observe, with_kwargs=True)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs: Any) -> None:
        if self.controller is None or logs is None or "loss" not in logs:
            return
        metrics = self.controller.pop_metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        if not self._wandb_metrics_defined:
            self._wandb_metrics_defined = define_wandb_metrics(args)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.controller is not None:
            self.controller.detach()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
