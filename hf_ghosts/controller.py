"""`RhoController`: measure every optimizer step's normalized length and rescale it (eq. 19).

The optimizer proposes ``u`` (the real AdamW step, momentum and weight decay included). The
controller snapshots the weights before the step, reads ``u = new - old`` after it, measures
``rho`` along ``u / |u|`` at the OLD weights with a :class:`~hf_ghosts.probe.RadiusProbe`,
reduces the spreads across processes, and sets the weights to ``old + scale * u`` with
``scale = clip_scale(|u|, rho, r_target, mode)``. The optimizer's moments stay as it left them.

It works in three settings: wired into ``Trainer`` by :class:`~hf_ghosts.trainer.RhoTrainer`
(optimizer step hooks), as a monitor by :class:`~hf_ghosts.callback.RhoCallback`, and in a plain
PyTorch or Accelerate loop, where ``controller.step(batch)`` replaces ``optimizer.step()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from hf_ghosts.blocks import BlockStep
from hf_ghosts.compat import is_bare_backbone
from hf_ghosts.distributed import (
    FSDP1_ERROR,
    all_reduce_report,
    detect_backend,
    full_norm,
    is_main_process,
    local_tensor,
)
from hf_ghosts.metrics import MetricWindow, StepRecord
from hf_ghosts.optimizers import (
    check_first_moments,
    current_lr,
    has_nonfinite_gradient,
    peak_lr,
    register_step_hooks,
    scale_first_moments,
    snapshot,
)
from hf_ghosts.policy import ProbeSchedule, reused_scale, scheduled_target, step_scale
from hf_ghosts.probe import RadiusProbe, RadiusReport, ShardedRadiusProbe
from hf_ghosts.probe.radius_probe import MODEL_KEYWORDS
from hf_ghosts.radii import normalized_step
from hf_ghosts.settings import RhoSettings

__all__ = ["RhoController", "build_probe", "measure_along"]

logger = logging.getLogger(__name__)


class RhoController:
    """Keep each optimizer step inside the convergence radius: ``u <- u * clip_scale(|u|, rho)``.

    What holds: a probed step has ``r_applied <= r_target`` (``"clip"``, ``"set"``) for the radius measured
    along it; with ``granularity="blocks"`` a clipped probed step is taken block by block (:mod:`hf_ghosts.blocks`). Only the ``radii`` limit; ``watch_radii`` are measured, logged and counted as ``would_bind``.
    ``"monitor"`` is passive: weights, gradients and optimizer state end exactly as without the controller,
    NaN and inf gradients included (logged as ``would_skip``). With ``every > 1`` a step may instead reuse the last
    measured ``rho`` (when: :func:`~hf_ghosts.policy.reused_scale`); its true ``r_applied`` stays ``<= r_target`` as long as the radius
    along it is at least ``trigger_r`` times the last one measured (half, at the default ``trigger_r = 0.5``).

    Args:
        model: the unwrapped model (not the DDP wrapper) whose trainable parameters the optimizer updates.
        optimizer: the optimizer proposing the update (any ``torch.optim.Optimizer``, or a wrapper with
            ``.optimizer``). Needed by :meth:`attach` and :meth:`step`.
        settings: a :class:`~hf_ghosts.settings.RhoSettings` (what ``RhoTrainingArguments.rho_settings()`` builds);
            or leave it out and pass the settings as keywords, validated here (``mode``, ``r_target``, ``radii``,
            ``watch_radii``, ``estimator``, ``probe_dtype``, ``every``, ``trigger_r``, ``trigger_growth``,
            ``log_per_head``, ``set_schedule``, ``rescale_moments``, ``fd_step``, ``ffn_mode``, ...; allowed values and
            defaults in :mod:`hf_ghosts.settings`). In short: ``"clip"`` scales ``min(1, r* rho / |u|)``, ``"set"``
            ``r* rho / |u|`` (with ``set_schedule``, ``r*(t) = r_target * lr(t) / peak_lr``: ``lr(t)`` the largest
            ``lr`` of the param groups, ``peak_lr`` the largest ``initial_lr`` torch's schedulers store, else the
            largest ``lr`` when the controller got the optimizer; ``RhoTrainer`` sets :attr:`peak_lr` to
            ``args.learning_rate``), ``"monitor"`` only measures; ``radii`` limit the step, ``watch_radii`` are only
            logged; ``estimator``/``probe_dtype`` ``"auto"`` resolve once per model (:meth:`RhoSettings.resolved`);
            ``every``, ``trigger_r`` and ``trigger_growth`` schedule the probes (:func:`~hf_ghosts.policy.probe_due`);
            ``rescale_moments`` scales Adam's first moment with the step (:meth:`attach` refuses an optimizer without
            ``betas``).
        training_dtype: the dtype training computes in, for ``"auto"`` (``RhoTrainer`` passes bf16/fp16 from its
            arguments); default: the trainable parameters' dtype.
        reduce: how reports agree across processes (default :func:`all_reduce_report`).
        probe_keywords: the probe's model-specific keywords (``ffn_spec``, ``shift_labels``, ``chunked_head``), and,
            without ``settings``, the settings above.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        settings: RhoSettings | None = None,
        training_dtype: torch.dtype | None = None,
        reduce: Callable[[RadiusReport], RadiusReport] = all_reduce_report,
        **probe_keywords: Any,
    ) -> None:
        settings, probe_keywords = RhoSettings.from_call("RhoController", settings, probe_keywords, allowed=MODEL_KEYWORDS)
        self.settings, self.model, self.optimizer, self.mode = settings, model, optimizer, settings.mode
        self.r_target, self.radii, self.watch_radii = settings.target, settings.radii, settings.watch_radii
        if optimizer is not None:
            check_first_moments(optimizer, settings)
        self.peak_lr: float | None = None if optimizer is None else peak_lr(optimizer)
        self._lr: float | None = None  # the learning rate of the step in flight
        self.schedule = ProbeSchedule(settings.every, float(settings.trigger_r), float(settings.trigger_growth))
        self.reduce = reduce
        _require_logits(model, settings)
        self._probe_keywords, self.training_dtype = probe_keywords, training_dtype
        self.rebind(model)
        self.reset()
        self._handles: list[Any] = []

    def reset(self) -> None:
        """Clean counters, no last radius, an empty logging window: the state of a fresh run (settings kept)."""
        self.batch: Mapping[str, torch.Tensor] | None = None
        self.steps = 0
        self.probes = 0
        self.last_rho: float | None = None
        self._probe_step: int | None = None  # step and |u| of the last probe; None: the next step probes
        self._probe_norm = 0.0
        self.last: StepRecord | None = None
        self.window = MetricWindow(per_head=self.settings.log_per_head, radii=self.radii, watch_radii=self.watch_radii,
                                   blocks=self.block_step is not None)
        self._old: list[torch.Tensor] | None = None
        for part in (self.probe.fd_control, self.block_step):
            if part is not None:
                part.reset()

    # ------------------------------------------------------------------------- wiring
    def observe(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Remember the batch to probe on (the last micro-batch before the optimizer step)."""
        self.batch = batch

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Register step pre/post hooks on the optimizer, so that ``optimizer.step()`` is controlled."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise ValueError("RhoController.attach: no optimizer to attach to")
        check_first_moments(optimizer, self.settings)
        self.detach()
        self.optimizer = optimizer
        self.peak_lr = peak_lr(optimizer) if self.peak_lr is None else self.peak_lr
        self._handles = register_step_hooks(optimizer, self.before_step, self.after_step)

    def rebind(self, model: torch.nn.Module) -> None:
        """Measure ``model`` from now on, e.g. once FSDP has sharded it; settings, counters and hooks are kept.

        Under FSDP2 (``fully_shard``: DTensor parameters) the probe is sharded (:func:`build_probe`), the update norm
        is reduced over the shards and the rescale is applied shard-locally (block-wise too: each rank scales the
        blocks' pieces it holds).
        """
        self.backend = detect_backend(model)
        if self.backend == "fsdp1":
            raise ValueError(f"RhoController: {FSDP1_ERROR}")
        self.sharded = self.backend == "fsdp2"
        blocks = self.settings.granularity == "blocks"
        self.model = model
        self.probe = build_probe(model, self.settings, self.training_dtype, self.sharded, **self._probe_keywords)
        self.names = list(self.probe.trainable)
        self.params = [self.probe.trainable[name] for name in self.names]
        self.block_step = BlockStep(self.probe.model, self.names, self.params, self.settings.block_refresh,
                                    self.settings.rescale_moments) if blocks else None
        self._old = None

    def _shards(self) -> list[torch.Tensor]:
        """The parameters as this rank holds them: the full tensors, or under FSDP2 views of the local shards."""
        return [local_tensor(p.detach()) for p in self.params]

    def detach(self) -> None:
        """Remove the optimizer hooks installed by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def step(self, batch: Mapping[str, torch.Tensor]) -> StepRecord:
        """Replace ``optimizer.step()`` in a plain loop: step, measure on ``batch``, rescale; returns the step's
        :class:`StepRecord` (also :attr:`last`)."""
        if self._handles:
            raise RuntimeError("RhoController.step: the controller is attached to the optimizer's hooks; call optimizer.step()")
        if self.optimizer is None:
            raise ValueError("RhoController.step: construct the controller with the optimizer to step")
        self.observe(batch)
        self.before_step()
        self.optimizer.step()
        self.after_step()
        return self.last

    # ------------------------------------------------------------------------- the step
    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot the weights and the step's learning rate; drop non-finite gradients so the optimizer leaves
        weights and moments alone (``"monitor"``: kept, and the step runs as it would without the controller)."""
        self._lr = None if self.optimizer is None else current_lr(self.optimizer)
        self._nonfinite_reason = "gradient" if has_nonfinite_gradient(self.params, self.sharded) else None
        if self._nonfinite_reason is not None and self.mode != "monitor":
            for p in self.params:
                p.grad = None
        self._old = snapshot(self._shards(), into=self._old)

    @torch.no_grad()
    def after_step(self) -> None:
        """Measure ``rho`` along the proposed update at the old weights and apply ``old + scale * u``."""
        if self._old is None:
            raise RuntimeError("RhoController.after_step: before_step() did not run (no snapshot of the old weights)")
        self.steps += 1
        current = self._shards()
        update = torch._foreach_sub(current, self._old)
        # |u| over all shards under FSDP2 (all-reduce SUM of the squares), else over the full tensors
        norm = float(full_norm(update, self.params))  # host sync
        if self._nonfinite_reason is not None or not math.isfinite(norm):
            self._skip(norm, self._nonfinite_reason or "update")
            return
        if norm == 0.0:
            self._finish(StepRecord(step=self.steps, update_norm=0.0), None)
            return
        report = None
        target = self.target()  # r* of this step
        since_probe = None if self._probe_step is None else self.steps - self._probe_step
        scale = reused_scale(self.schedule, self.mode, norm, target, self.last_rho, since_probe, self._probe_norm)
        if scale is None:  # the last rho cannot be trusted for this step: measure afresh
            report = self.reduce(measure_along(self.probe, self.batch, self.names, update, self._old, norm))
            rho = float(report.rho_of(self.radii))  # host sync; the limiting radii only
            if math.isnan(rho):
                self._skip(norm, "radius")
                return
            self.last_rho, self.probes, self._probe_step, self._probe_norm = rho, self.probes + 1, self.steps, norm
            scale = step_scale(norm, rho, target, self.mode)
        record = self._applied_record(norm, scale, target, probed=report is not None)
        if report is not None and scale < 1.0 and self.block_step is not None:  # clipped: block-wise (hf_ghosts.blocks)
            taken = self.block_step.step(self.probe, self.batch, self._old, current, update, norm, target, self.radii,
                                         reduce=self.reduce, optimizer=self.optimizer)
            if taken is not None:  # None: no block lowers the loss, the global scale stands
                return self._skip(norm, taken.skipped) if taken.skipped else self._finish(taken.record(record), report)
        if scale != 1.0:
            torch._foreach_lerp_(current, self._old, 1.0 - scale)
            if self.settings.rescale_moments:
                scale_first_moments(self.optimizer, self.params, scale)
        self._finish(record, report)

    def target(self) -> float:
        """The ``r*`` of the step in flight: :func:`scheduled_target` of its ``lr`` in ``"set"`` mode with
        ``set_schedule``, else ``r_target``."""
        follows_schedule = self.mode == "set" and self.settings.set_schedule
        return scheduled_target(self.r_target, self._lr if follows_schedule else None, self.peak_lr)

    def _applied_record(self, norm: float, scale: float, target: float, probed: bool) -> StepRecord:
        """The record of a step of length ``|u| = norm`` applied with ``scale`` against ``r* = target``:
        ``r = |u| / rho`` (the last ``rho``), ``r_applied = scale * r``; ``would_clip = r > r_target`` on probed steps."""
        r = float(normalized_step(norm, self.last_rho))
        return StepRecord(
            step=self.steps, update_norm=norm, r=r, r_applied=r * scale, scale=scale, rho=self.last_rho, probed=probed,
            clipped=scale < 1.0, target=target, would_clip=r > self.r_target if probed else None,
        )

    def _skip(self, norm: float, reason: str) -> None:
        """Record a step with a non-finite ``reason``; put the old weights back unless monitoring (the step stands)."""
        self._probe_step = None  # something went wrong: measure the next step afresh
        monitoring = self.mode == "monitor"
        if not monitoring:
            torch._foreach_copy_(self._shards(), self._old)
        _warn_nonfinite(self.steps, reason, norm, monitoring)
        outcome = {"would_skip" if monitoring else "skipped": reason}
        self._finish(StepRecord(step=self.steps, update_norm=norm, **outcome), None)

    def _finish(self, record: StepRecord, report: RadiusReport | None) -> None:
        self.last = record if report is None else record.with_report(report, self.radii)
        self.window.add(self.last)

    # ------------------------------------------------------------------------- logging and state
    def pop_metrics(self) -> dict[str, float]:
        """The ``ghosts/*`` metrics aggregated since the last call (:class:`~hf_ghosts.metrics.MetricWindow`), then reset."""
        return self.window.pop()

    def state_dict(self) -> dict[str, Any]:
        """Counters, the last radius (reused between probes) and the open logging window."""
        return {
            "steps": self.steps, "probes": self.probes, "last_rho": self.last_rho,
            "probe_step": self._probe_step, "probe_norm": self._probe_norm, "peak_lr": self.peak_lr,
            "window": self.window.state_dict(),
            "fd": None if self.probe.fd_control is None else self.probe.fd_control.state_dict(),
            **({} if self.block_step is None else {"blocks": self.block_step.state_dict()}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (fd's step control only where both runs measure by fd)."""
        expected = set(self.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"RhoController.load_state_dict: the state lacks {missing}; expected what "
                             f"RhoController.state_dict() returns ({sorted(expected)})")
        self.steps, self.probes = int(state["steps"]), int(state["probes"])
        self.last_rho = state["last_rho"]
        self._probe_step = state["probe_step"]
        self._probe_norm = float(state["probe_norm"])
        self.peak_lr = state["peak_lr"]
        self.window.load_state_dict(state["window"])
        if state["fd"] is not None and self.probe.fd_control is not None:
            self.probe.fd_control.load_state_dict(state["fd"])
        if self.block_step is not None:
            self.block_step.load_state_dict(state["blocks"])


def _require_logits(model: torch.nn.Module, settings: RhoSettings) -> None:
    """With ``"output"`` among the measured radii, refuse a bare ``transformers`` backbone (what ``AutoModel`` loads):
    it returns hidden states, not logits.

    Checked at construction so the error comes before training starts, not at the first probe.
    """
    if "output" in settings.measured and is_bare_backbone(model):
        raise ValueError(
            f"RhoController: {type(model).__name__} is the bare {model.config.model_type!r} backbone: it returns hidden "
            "states, not logits, and the output radius needs logits. Load a model with a head (for example "
            f"AutoModelForCausalLM instead of AutoModel), or drop 'output' from {settings.name('radii')}."
        )


def build_probe(
    model: torch.nn.Module, settings: RhoSettings, training_dtype: torch.dtype | None = None, sharded: bool = False,
    **probe_keywords: Any,
) -> RadiusProbe | ShardedRadiusProbe:
    """The probe of ``model`` for ``settings``, resolved once for this run (:meth:`RhoSettings.resolved`): the training
    dtype (default: the first trainable parameter's, float32 without one) and its device decide ``"auto"``. Under
    FSDP2 (``sharded``) a :class:`~hf_ghosts.probe.ShardedRadiusProbe` (fp32 finite differences on the local shards)."""
    first = next((p for p in model.parameters() if p.requires_grad), None)
    device_type = "cpu" if first is None else first.device.type
    training = training_dtype or (torch.float32 if first is None else first.dtype)
    probe_cls = ShardedRadiusProbe if sharded else RadiusProbe
    return probe_cls(model, settings=settings.resolved(training, device_type, sharded), **probe_keywords)


def measure_along(
    probe: RadiusProbe, batch: Mapping[str, torch.Tensor] | None, names: list[str], update: list[torch.Tensor],
    old: list[torch.Tensor], norm: float | None = None,
) -> RadiusReport:
    """The probe's (unreduced) report along the direction ``update`` at the weights ``old``, both listed as ``names``.
    ``batch`` is what :meth:`RhoController.observe` saw; ``None`` (nothing observed) is an error. ``norm``: ``|update|``
    as the controller has it (the probe then makes no host sync of its own)."""
    if batch is None:
        raise RuntimeError("RhoController: no batch observed before the optimizer step; call observe(batch)")
    direction = dict(zip(names, update, strict=True))
    return probe.measure(batch, direction, params=dict(zip(names, old, strict=True)), norm=norm)


def _warn_nonfinite(step: int, reason: str, norm: float, monitoring: bool) -> None:
    """Warn on the main process that optimizer step ``step`` had a non-finite ``reason``, and what became of it."""
    if not is_main_process():
        return
    if monitoring:
        logger.warning("hf_ghosts: optimizer step %d has a non-finite %s (update norm %s); monitoring, so it "
                       "stands (clip or set would have skipped it)", step, reason, norm)
    else:
        logger.warning("hf_ghosts: skipped optimizer step %d: non-finite %s (update norm %s); the weights keep their "
                       "old values", step, reason, norm)
