"""The update a checkpoint's optimizer would take next, computed as ``Trainer`` would and never applied.

The learning rate of the next step is the one the saved scheduler set after the last step (``_last_lr`` in
``scheduler.pt``, equal to ``lr`` in the optimizer's parameter groups), unless ``--learning_rate`` is given.
AdamW's update ``u = -lr (m_hat / (sqrt(v_hat) + eps) + wd theta)`` is exactly linear in ``lr`` at fixed moments
(the decoupled weight decay too; gradient clipping acts on the gradient before it), so its direction does not
depend on ``lr``. Where the scheduled rate is 0 (the last checkpoint of a linear or cosine decay to 0, or a
warm-up's start) the next step is a no-op, and the update is taken at the last non-zero rate instead
(:func:`choose_rates`): the radii along it are those of every positive rate.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_ghosts import radii
from hf_ghosts.cli.checkpoint import Checkpoint
from hf_ghosts.cli.errors import CliError

__all__ = ["Proposal", "StepProposer", "StepRates", "choose_rates", "last_nonzero_rate"]

# The TrainingArguments fields that shape the optimizer step; everything else (devices, logging, FSDP, ...) is left
# at its default in the throwaway Trainer.
STEP_FIELDS = ("optim", "optim_args", "optim_target_modules", "weight_decay", "adam_beta1", "adam_beta2",
               "adam_epsilon", "learning_rate", "max_grad_norm", "label_smoothing_factor", "seed")


@dataclass(frozen=True)
class StepRates:
    """The learning rates of the next step (``scheduled``) and of the update measured (``measured``), per group.

    They differ only where every scheduled rate is 0; then ``why`` says so and ``measured_source`` where the rate
    came from. ``r`` at the scheduled rate is ``r`` at the measured one times ``scale = max(scheduled) /
    max(measured)`` (exact: the measured rates are the scheduled ones, or the scheduled ones are all 0).
    """

    scheduled: tuple[float, ...]
    source: str
    measured: tuple[float, ...]
    measured_source: str
    why: str | None = None

    @property
    def learning_rate(self) -> float:
        """The next step's rate (the largest, if the parameter groups differ)."""
        return max(self.scheduled)

    @property
    def measured_rate(self) -> float:
        return max(self.measured)

    @property
    def scale(self) -> float:
        return self.learning_rate / self.measured_rate


def last_nonzero_rate(trainer_state: Mapping[str, Any] | None) -> tuple[float, int | None] | None:
    """``(learning_rate, step)`` of the last log entry in ``trainer_state.json`` with a positive ``learning_rate``."""
    for entry in reversed((trainer_state or {}).get("log_history", [])):
        rate = entry.get("learning_rate")
        if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0:
            return float(rate), entry.get("step")
    return None


def _positive(values: Sequence[Any] | None, groups: int) -> list[float] | None:
    if not values or len(values) != groups:
        return None
    values = [float(v) for v in values]
    return values if max(values) > 0 and all(math.isfinite(v) for v in values) else None


def choose_rates(flag: float | None, groups: Sequence[Mapping[str, Any]], checkpoint: Checkpoint) -> StepRates:
    """The step's rates: ``--learning_rate``, else the saved scheduler's, else the optimizer's; if those are all 0,
    the update is measured at the last non-zero logged rate (``trainer_state.json``), else at the schedule's peak
    (``base_lrs`` of ``scheduler.pt``, ``initial_lr`` of ``optimizer.pt``), each group in the peak's proportions."""
    count = len(groups)
    if flag is not None:
        rates = (float(flag),) * count
        return StepRates(rates, "--learning_rate", rates, "--learning_rate")
    scheduler = checkpoint.scheduler_state or {}
    saved = scheduler.get("_last_lr")
    if saved is not None and len(saved) == count:
        scheduled, source = tuple(float(lr) for lr in saved), "scheduler.pt"
    else:
        scheduled, source = tuple(float(group["lr"]) for group in groups), "optimizer.pt"
    if max(scheduled) > 0:
        return StepRates(scheduled, source, scheduled, source)
    peak = _positive(scheduler.get("base_lrs"), count) or _positive([g.get("initial_lr") for g in groups], count)
    logged = last_nonzero_rate(checkpoint.trainer_state)
    if logged is not None:
        rate, measured_source = logged[0], f"trainer_state.json: the last non-zero logged rate (step {logged[1]})"
    elif peak is not None:
        rate, measured_source = max(peak), "the schedule's peak rate (base_lrs of scheduler.pt / initial_lr)"
    else:
        raise CliError(f"the scheduled learning rate of the next step is 0 ({source}) and neither trainer_state.json "
                       "nor the scheduler holds a non-zero one to measure the direction at: pass --learning_rate LR")
    measured = tuple(rate * p / max(peak) for p in peak) if peak is not None else (rate,) * count
    why = (f"the scheduled learning rate is 0 ({source}: the end of a decay to 0, or the start of a warm-up), so the "
           f"next step is a no-op (r = 0). AdamW's direction does not depend on the rate: rho, the bottleneck, the "
           f"per-head radii and the fragile tokens are measured along the update at {max(measured):.4g} "
           f"({measured_source}), and r there sets the safe learning rate")
    return StepRates(scheduled, source, measured, measured_source, why)


@dataclass
class Proposal:
    """One proposed update ``u`` (never applied) and what produced it."""

    update: dict[str, torch.Tensor]
    norm: float
    grad_norm: float
    loss: float


class StepProposer:
    """The update the checkpoint's optimizer would take next on a batch, computed as ``Trainer`` would, not applied.

    A throwaway ``Trainer`` (the checkpoint's optimizer settings, no reporting) builds the optimizer with
    ``create_optimizer``, so its parameter groups (weight decay / no decay, ``get_decay_parameter_names``) are
    the ones ``optimizer.pt`` was saved from; loading ``optimizer.pt`` sets lr, betas, eps and weight decay. The
    step runs at :attr:`rates` ``.measured``. Without optimizer state it is SGD at ``learning_rate``.
    """

    def __init__(self, checkpoint: Checkpoint, learning_rate: float | None, max_grad_norm: float | None,
                 device: str, seed: int) -> None:
        from transformers import Trainer, TrainingArguments

        saved = checkpoint.training_args
        fields = {name: getattr(saved, name) for name in STEP_FIELDS if saved is not None and hasattr(saved, name)}
        if max_grad_norm is not None:
            fields["max_grad_norm"] = max_grad_norm
        self._scratch = tempfile.TemporaryDirectory(prefix="hf_ghosts_diagnose_")
        try:
            args = TrainingArguments(output_dir=self._scratch.name, report_to=[], use_cpu=device == "cpu",
                                     disable_tqdm=True, save_strategy="no", **fields)
        except Exception as error:
            self._scratch.cleanup()
            raise CliError(f"the checkpoint's training arguments do not rebuild ({type(error).__name__}: {error}); "
                           "pass --ignore_optimizer --learning_rate LR to diagnose along the gradient") from error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = Trainer(model=checkpoint.model, args=args)
        self.model = self.trainer.model
        self.device = args.device
        self.seed = seed
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        self.names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for name, p in self.model.named_parameters() if p.requires_grad]
        self.saved_state = checkpoint.optimizer_state
        self.notes: list[str] = []
        if self.saved_state is not None:
            self.optimizer = self.trainer.create_optimizer()
            self.direction = "adamw" if isinstance(self.optimizer, torch.optim.AdamW) else type(self.optimizer).__name__.lower()
            self._load_state()  # fails here, not on the first batch, if the groups do not match
            self.rates = choose_rates(learning_rate, self.optimizer.param_groups, checkpoint)
        else:
            if learning_rate is None:
                self._scratch.cleanup()
                raise CliError(
                    f"{checkpoint.source} has no optimizer state (optimizer.pt) to propose the next step: pass "
                    "--learning_rate LR to diagnose along the gradient with SGD at that rate"
                )
            self.optimizer = torch.optim.SGD(self.params, lr=learning_rate)
            self.direction = "sgd"
            self.rates = choose_rates(learning_rate, self.optimizer.param_groups, checkpoint)
        if self.direction not in ("adamw", "sgd"):
            self.notes.append(f"the saved optimizer is {type(self.optimizer).__name__}: safe_learning_rate assumes "
                              "its update is linear in the learning rate")

    def _load_state(self) -> None:
        try:
            self.optimizer.load_state_dict(copy.deepcopy(self.saved_state))  # the step writes into the moments
        except (ValueError, KeyError) as error:
            raise CliError(
                f"optimizer.pt does not match the parameter groups Trainer.create_optimizer builds for this model "
                f"({error}); it was written by another optimizer setup. Pass --ignore_optimizer --learning_rate LR to "
                "diagnose along the gradient instead"
            ) from error

    def close(self) -> None:
        self._scratch.cleanup()

    def propose(self, batch: Mapping[str, torch.Tensor]) -> Proposal:
        """The update ``u = theta_next - theta`` of one ``Trainer`` step on ``batch``; the weights are put back."""
        model, optimizer = self.model, self.optimizer
        if self.saved_state is not None:
            self._load_state()
        for group, lr in zip(optimizer.param_groups, self.rates.measured, strict=True):
            group["lr"] = lr
        inputs = {key: value.to(self.device) for key, value in batch.items()}
        _, num_items = self.trainer.get_batch_samples(iter([inputs]), 1, self.device)
        old = [p.detach().clone() for p in self.params]
        training = model.training
        model.zero_grad(set_to_none=True)
        model.train()  # as Trainer computes the gradient (dropout, if the config has any)
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed)  # the same dropout masks for every batch and run; the caller's RNG untouched
                loss = self.trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
            loss.backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            else:
                grad_norm = radii.update_norm(grads)
            try:
                optimizer.step()
            except RuntimeError as error:
                raise CliError(f"the saved optimizer state does not fit this model's parameters ({error}); pass "
                               "--ignore_optimizer --learning_rate LR to diagnose along the gradient") from error
            with torch.no_grad():
                update = {name: p.detach() - o for name, p, o in zip(self.names, self.params, old, strict=True)}
                for p, o in zip(self.params, old, strict=True):
                    p.copy_(o)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(training)
        norm = float(radii.update_norm(list(update.values())))
        return Proposal(update=update, norm=norm, grad_norm=float(grad_norm), loss=float(loss.detach()))
