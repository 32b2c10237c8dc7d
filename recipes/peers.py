"""The peers users reach for instead of RhoTrainer, wired into ``transformers.Trainer`` the way their own docs wire them.

Both come from their real packages (the ``[peers]`` extra: ``pip install -e ".[peers]"``), at their published
defaults, on the Trainer's own AdamW hyperparameters, and with the Trainer's ``max_grad_norm`` at 0 (they do the
clipping or the skipping themselves):

=============  ==================================================================================================
method         what runs
=============  ==================================================================================================
``zclip``      ZClip (PyPI ``zclip``; Kumar et al. 2025, arXiv 2504.02507): ``ZClip().step(model)`` after backward
               and before ``optimizer.step()``, here :class:`ZClipCallback` at ``on_pre_optimizer_step`` (the
               Trainer's counterpart of Lightning's ``on_before_optimizer_step``, where ZClip's own callback runs).
               An EMA (alpha 0.97) of the gradient norm, collected over 25 warm-up steps; a norm with z-score above
               2.5 is clipped to ``mean + 2.5 std / (z / 2.5)``, and every norm to ``max_grad_norm = 1``.
``skip-step``  OLMo-core's ``SkipStepAdamW`` (PyPI ``ai2-olmo-core``) as the Trainer's optimizer class, fed as
               OLMo-core's ``TransformerTrainModule`` feeds it (:class:`SkipStepFeed`): ``latest_loss`` = the
               step's training loss (mean over processes), ``latest_grad_norm`` = the total gradient norm, both set
               just before ``optimizer.step()`` (OLMo-core takes the norm from its gradient clipping, before it
               clips; here nothing clips, so it is the raw norm). The step is skipped (weights and moments unchanged) when the loss
               or the norm is more than 6 sigma above the mean of the previous up to 128 steps; the rule starts
               once 64 losses are in.
=============  ==================================================================================================

Example: ``trainer_cls, callbacks = wire("zclip", Trainer)``, then ``trainer_cls(..., callbacks=callbacks)``, and
after training :func:`peer_summary` of the trainer. :func:`require` raises the ImportError with the pip line when a
requested method's package is missing (the recipes call it while parsing their arguments).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

INSTALL = 'pip install -e ".[peers]"'
PACKAGES = {"zclip": ("zclip", "zclip"), "skip-step": ("olmo_core.optim", "ai2-olmo-core")}  # method: (module, PyPI)
METHODS = {
    "zclip": "AdamW + ZClip (defaults)",
    "skip-step": "OLMo-core SkipStepAdamW (defaults)",
}


def require(methods: Iterable[str]) -> None:
    """Import each requested peer's package now; an ImportError naming the extra and the pip line if one is missing."""
    for method in methods:
        if method not in PACKAGES:
            continue
        module, distribution = PACKAGES[method]
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"method {method!r} needs the package {distribution!r} of the [peers] extra ({error}); "
                              f"install it with: {INSTALL}") from error


def _total_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """``sqrt(sum_p |grad_p|^2)`` over the parameters with a gradient (what ``clip_grad_norm_`` returns)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _refuse_trainer_clipping(name: str, args: TrainingArguments) -> None:
    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"{name}: TrainingArguments.max_grad_norm={args.max_grad_norm} clips the gradients before "
                         f"{name} sees them; set max_grad_norm=0 ({name} does its own clipping or skipping)")
    if args.fp16:
        raise ValueError(f"{name}: with fp16 the gradients are still loss-scaled before the optimizer step; use bf16 or "
                         "fp32")


# --------------------------------------------------------------------------------------------- ZClip
def zclip_defaults() -> dict[str, Any]:
    """``ZClip``'s constructor defaults (the published ones), read from the installed package."""
    from zclip import ZClip

    return {name: p.default for name, p in inspect.signature(ZClip.__init__).parameters.items() if name != "self"}


class ZClipCallback(TrainerCallback):
    """``ZClip(**kwargs).step(model)`` at ``on_pre_optimizer_step``: after backward (and the Trainer's own clipping,
    which must be off), before ``optimizer.step()``. ``history`` holds per step ``(step, norm before, norm after)``."""

    def __init__(self, **kwargs: Any) -> None:
        require(["zclip"])
        from zclip import ZClip

        self.zclip = ZClip(**kwargs)
        self.history: list[tuple[int, float, float]] = []

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _refuse_trainer_clipping("ZClip", args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _refuse_trainer_clipping("ZClip", args)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        before = self.zclip.step(model)  # a host sync (ZClip calls .item())
        self.history.append((state.global_step, float(before), float(_total_norm(model.parameters()))))

    def clipped_fraction(self) -> float:
        """Steps whose gradient ZClip scaled down, over the steps it saw."""
        clipped = sum(after < before * (1 - 1e-6) for _, before, after in self.history)
        return clipped / len(self.history) if self.history else math.nan


# --------------------------------------------------------------------------------------------- skip-step
def skip_step_defaults() -> dict[str, Any]:
    """The skip rule's published defaults: OLMo-core's ``SkipStepAdamWConfig`` (window 128, 6 sigma, foreach, the
    step-increment fix). The AdamW hyperparameters are the Trainer's, not these."""
    from olmo_core.optim import SkipStepAdamWConfig

    fields = {f.name: f.default for f in dataclasses.fields(SkipStepAdamWConfig)}
    return {name: fields[name] for name in ("rolling_interval_length", "sigma_factor", "foreach", "step_increment_bugfix")}


def skip_step_adamw(args: TrainingArguments, **overrides: Any) -> tuple[type, dict[str, Any]]:
    """``(SkipStepAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the Trainer's AdamW rate, betas,
    epsilon and weight decay (its no-decay group included: the Trainer builds the groups), the skip defaults."""
    require(["skip-step"])
    from olmo_core.optim import SkipStepAdamW

    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
              "weight_decay": args.weight_decay, **skip_step_defaults(), **overrides}
    return SkipStepAdamW, kwargs


class SkipStepFeed:
    """A Trainer mixin: OLMo-core's skip-step optimizer, fed before every ``optimizer.step()`` as OLMo-core's trainer
    feeds it: ``latest_loss`` (the step's training loss summed over its micro-batches, as the Trainer logs it; averaged
    over processes) and ``latest_grad_norm`` (the total gradient norm, unclipped: ``max_grad_norm`` must be 0).

    Without ``optimizer_cls_and_kwargs`` it builds :func:`skip_step_adamw` of the arguments. ``skipped_steps`` lists
    the (0-based) optimizer steps the optimizer skipped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args")
        if training_args is None:
            raise ValueError("SkipStepFeed: pass the TrainingArguments as args=...")
        _refuse_trainer_clipping("skip-step", training_args)
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("SkipStepFeed: builds its optimizer; pass optimizer_cls_and_kwargs, not optimizers")
        if kwargs.get("optimizer_cls_and_kwargs") is None:
            kwargs["optimizer_cls_and_kwargs"] = skip_step_adamw(training_args)
        self._feed_loss: torch.Tensor | None = None
        self._feed_step = -1
        self.skipped_steps: list[int] = []
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            raise ValueError("SkipStepFeed: under FSDP the gradient norm needs the shards' all-reduce; not supported")

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._feed_step != self.state.global_step:  # the first micro-batch of this optimizer step
            self._feed_loss, self._feed_step = loss, self.state.global_step
        else:
            self._feed_loss = self._feed_loss + loss
        return loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if not all(hasattr(type(optimizer), name) for name in ("latest_loss", "latest_grad_norm")):
            raise TypeError(f"SkipStepFeed: feeds a skip-step optimizer (latest_loss, latest_grad_norm); got "
                            f"{type(optimizer).__name__}")
        optimizer.register_step_pre_hook(self._feed)
        optimizer.register_step_post_hook(self._record)
        return optimizer

    def _feed(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._feed_step != self.state.global_step:
            raise RuntimeError(f"SkipStepFeed: no training loss for optimizer step {self.state.global_step}")
        optimizer.latest_loss = self.accelerator.reduce(self._feed_loss.detach(), reduction="mean")
        optimizer.latest_grad_norm = _total_norm(p for group in optimizer.param_groups for p in group["params"])

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        skipped = getattr(optimizer, "step_skipped", None)
        if skipped is not None and float(skipped) > 0.5:  # a host sync, once per step
            self.skipped_steps.append(self.state.global_step)


def skip_step(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`SkipStepFeed`: ``SkipStep<Name>``."""
    return type(f"SkipStep{trainer_cls.__name__}", (SkipStepFeed, trainer_cls), {"__module__": __name__})


# --------------------------------------------------------------------------------------------- the recipes' glue
def wire(method: str, trainer_cls: type = Trainer) -> tuple[type, list[TrainerCallback]]:
    """The trainer class and callbacks of ``method``: ``zclip`` adds :class:`ZClipCallback` (defaults), ``skip-step``
    mixes in :class:`SkipStepFeed`; any other method is returned as it is."""
    if method == "zclip":
        return trainer_cls, [ZClipCallback()]
    if method == "skip-step":
        return skip_step(trainer_cls), []
    return trainer_cls, []


def settings(method: str) -> dict[str, Any]:
    """What a run file of ``method`` records of the peer: its package version and defaults (empty for other methods)."""
    if method not in PACKAGES:
        return {}
    distribution = PACKAGES[method][1]
    try:
        installed = version(distribution)
    except PackageNotFoundError:
        installed = None
    defaults = zclip_defaults() if method == "zclip" else skip_step_defaults()
    return {"peer": distribution, "peer_version": installed, "peer_defaults": defaults}


def peer_summary(trainer: Trainer) -> dict[str, Any]:
    """``clipped_fraction`` of a ZClip run (steps ZClip scaled down / steps) or ``skipped_steps`` of a skip-step run."""
    if isinstance(trainer, SkipStepFeed):
        return {"skipped_steps": len(trainer.skipped_steps)}
    zclip = [c for c in trainer.callback_handler.callbacks if isinstance(c, ZClipCallback)]
    return {"clipped_fraction": zclip[0].clipped_fraction()} if zclip else {}
