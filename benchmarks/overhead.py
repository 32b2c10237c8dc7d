"""What RhoTrainer costs over a plain Trainer step, how accurate its cheaper settings are, and LR spikes.

    python benchmarks/overhead.py                             # CPU: tiny, 5m, 40m; ~45 min on 2 cores
    python benchmarks/overhead.py --sizes tiny --steps 2 --warmup 1 --spike-steps 6   # smoke run (tests/test_benchmarks.py)
    python benchmarks/overhead.py --sizes pythia-160m --parts overhead --bf16            # needs a CUDA GPU

Everything runs in ONE process and writes one JSON (``--out``, default ``outputs/overhead.json``):

1. ``overhead``: a plain ``Trainer`` and one ``RhoTrainer`` per (mode, estimator, every) train copies
   of the same initial weights on the same batches, interleaved: each trainer runs one optimizer
   step, then another one does (in an order shuffled every round), so that whatever else loads the
   machine hits all of them alike. A step is timed from ``on_step_begin`` to ``on_step_end``
   (forward, backward, grad clip, AdamW + probe + rescale, scheduler, zero_grad). Warm-up steps
   are dropped. Probed and reused steps (``every > 1``) are timed apart; the cost per step is
   ``f * median(probed) + (1 - f) * median(reused)`` with ``f`` the fraction of steps probed, so a
   probe every k steps is not hidden by a median; the probed steps of an every-k row are pooled
   with its every-1 twin's (the same work), a handful of probes making a poor median alone. Peak
   memory of the first step (it always probes): on CUDA ``max_memory_allocated``; on CPU the
   allocator's events under ``torch.profiler`` (``profile_memory=True``), plus the bytes alive at
   the start of the step.
2. ``breakdown``: the pieces of a controlled step timed alone on the last size (snapshot copy, update
   and its norm, a forward without tangents with sdpa and with eager attention, the JVP and FD probes).
3. ``accuracy`` and ``spike`` (one pass, on ``--spike-size``, default tiny): a plain PyTorch loop,
   AdamW at ``--spike-lr`` with the LR multiplied by ``--spike-factor`` (x1000) for the middle third
   of the steps. Every cheaper setting runs with an oracle that measures the exact JVP, full-batch
   radius along the very update on the very step; ``r`` of the setting is compared with it.
   Plain AdamW (and AdamW with gradient-norm clipping) show what the spike does without control.

Sizes are GPT-NeoX with Pythia's layout (parallel residual, 25% rotary, untied embeddings):
"8 x 128 tokens = 1,024 tokens/step" on CPU; Pythia-160m's shape with 8 x 512 on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_ghosts import RadiusProbe, RhoController, RhoTrainer, RhoTrainingArguments
from hf_ghosts.settings import ESTIMATORS, MODES

PARTS = ("overhead", "breakdown", "accuracy")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    lr: float
    steps: int  # timed steps (after the warm-up) unless --steps says otherwise
    modes: tuple[str, ...] = MODES  # modes timed unless --modes says otherwise
    device: str = "cpu"

    def config(self) -> GPTNeoXConfig:
        return GPTNeoXConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=4 * self.hidden,
            max_position_embeddings=max(512, self.seq),
            rotary_pct=0.25,
            use_parallel_residual=True,
            hidden_act="gelu",
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )


# 40m on CPU: "clip" only (a probe costs the same in every mode; "set" probes every step by construction).
SIZES = {
    "tiny": Size(hidden=32, layers=2, heads=4, vocab=256, batch=4, seq=32, lr=1e-3, steps=48),
    "5m": Size(hidden=256, layers=6, heads=8, vocab=2048, batch=8, seq=128, lr=6e-4, steps=32),
    "40m": Size(hidden=512, layers=8, heads=8, vocab=16384, batch=8, seq=128, lr=6e-4, steps=24, modes=("clip",)),
    "pythia-160m": Size(hidden=768, layers=12, heads=12, vocab=50304, batch=8, seq=512, lr=6e-4, steps=48, device="cuda"),
}


@dataclass(frozen=True)
class Setting:
    """One controller configuration; ``None`` fields take RhoTrainingArguments' defaults."""

    name: str
    mode: str | None = None
    estimator: str | None = None
    every: int | None = None
    trigger_r: float | None = None
    trigger_growth: float | None = None
    clip_reused: bool = False  # the rejected alternative to the r-trigger: see ReuseClipController

    def controller_kwargs(self) -> dict[str, Any]:
        values = dict(mode=self.mode, estimator=self.estimator, every=self.every, trigger_r=self.trigger_r,
                      trigger_growth=self.trigger_growth)
        return {key: value for key, value in values.items() if value is not None}

    def controller(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> RhoController:
        cls = ReuseClipController if self.clip_reused else RhoController
        return cls(model, optimizer, **self.controller_kwargs(), **kwargs)

    def is_default(self) -> bool:
        """Whether this is what ``RhoTrainingArguments()`` runs."""
        defaults = RhoTrainingArguments.__dataclass_fields__
        return not self.clip_reused and all(
            defaults[f"rho_{key}"].default == value for key, value in self.controller_kwargs().items())

    def rho_fields(self) -> dict[str, Any]:
        return {f"rho_{key}": value for key, value in self.controller_kwargs().items()}


def default_every() -> int:
    return RhoTrainingArguments.__dataclass_fields__["rho_every"].default


def overhead_settings(every_k: int, modes: Sequence[str] = MODES) -> list[Setting]:
    """Each mode and estimator, probing every step and every ``every_k`` steps with the default triggers."""
    return [
        Setting(f"{mode}/{estimator}/every{every}", mode=mode, estimator=estimator, every=every)
        for mode in modes
        for estimator in ESTIMATORS
        for every in dict.fromkeys((1, every_k))
    ]


def accuracy_settings(every_k: int) -> list[Setting]:
    return [
        Setting("clip/jvp/every1 (exact)", mode="clip", estimator="jvp", every=1),
        Setting("clip/fd/every1", mode="clip", estimator="fd", every=1),
        Setting(f"clip/jvp/every{every_k}", mode="clip", estimator="jvp", every=every_k),
        Setting(f"clip/fd/every{every_k}", mode="clip", estimator="fd", every=every_k),
        Setting(f"clip/fd/every{every_k}, clip_reused", mode="clip", estimator="fd", every=every_k, clip_reused=True),
        Setting(f"clip/jvp/every{every_k}, no triggers", mode="clip", estimator="jvp", every=every_k,
                trigger_r=math.inf, trigger_growth=math.inf),
    ]


# --------------------------------------------------------------------------------------------- data
def token_blocks(count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[count, length]`` byte-level token ids of the English text that ships with Python, random offsets."""
    from pydoc_data.topics import topics

    data = torch.frombuffer(bytearray("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def batch_of(ids: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# --------------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
    return sum(seen.values())


def live_bytes(model: torch.nn.Module, optimizer: Any, controller: RhoController | None) -> int:
    """Parameters, buffers, gradients, optimizer state and the controller's snapshot alive right now."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is not None:
        tensors += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    if controller is not None and controller._old is not None:
        tensors += controller._old
    return tensor_bytes(tensors)


class PeakMemory:
    """Peak bytes allocated during a region, above what was alive when it began."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.profiler: torch.profiler.profile | None = None

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self.profiler.__exit__(None, None, None)
        events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        self.profiler = None
        running = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            running += event.nbytes()  # frees of blocks allocated before start() are not reported
            peak = max(peak, running)
        return peak


# --------------------------------------------------------------------------------------------- overhead
class RoundRobin:
    """Lets one thread run at a time; a thread hands over after each optimizer step.

    Every thread runs once per round, in an order shuffled anew each round (seeded), so that no
    setting always follows the same one.
    """

    def __init__(self, names: Sequence[str], seed: int = 0) -> None:
        self.order = list(names)
        self.turn = 0
        self.condition = threading.Condition()
        self.failed = False
        self.random = random.Random(seed)

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.failed or self.order[self.turn] == name)
            if self.failed:
                raise RuntimeError("RoundRobin: another trainer failed")

    def hand_over(self, name: str, done: bool = False) -> None:
        with self.condition:
            index = self.order.index(name)
            if done:
                self.order.remove(name)
                self.turn = index
            else:
                self.turn = index + 1
            if self.turn >= len(self.order):
                self.random.shuffle(self.order)
                self.turn = 0
            self.condition.notify_all()

    def fail(self) -> None:
        with self.condition:
            self.failed = True
            self.condition.notify_all()


class StepTimer(TrainerCallback):
    """Times each optimizer step, measures the first one's peak memory, and hands over to the next trainer."""

    def __init__(self, name: str, turns: RoundRobin, device: str) -> None:
        self.name, self.turns, self.device = name, turns, device
        self.trainer: Trainer | None = None
        self.times: list[float] = []
        self.probed: list[bool] = []
        self.memory = PeakMemory(device)
        self.peak_bytes = 0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            trainer = self.trainer
            self.base_bytes = live_bytes(trainer.model, trainer.optimizer, getattr(trainer, "rho_controller", None))
            self.memory.start()
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.start)
        controller = getattr(self.trainer, "rho_controller", None)
        self.probed.append(controller is not None and controller.last is not None and controller.last.probed)
        if state.global_step == 1:
            self.peak_bytes = self.base_bytes + self.memory.stop()
        self.turns.hand_over(self.name)
        self.turns.wait(self.name)


def step_cost(times: Sequence[float], probed: Sequence[bool], probed_elsewhere: Sequence[float] = ()) -> dict[str, Any]:
    """Cost per step from timed steps: ``f * median(probed) + (1 - f) * median(reused)``.

    ``probed_elsewhere``: times of steps that did the same work as this setting's probed steps (its
    ``every=1`` twin), pooled with them: a few probes every 16 steps make a poor median alone.
    """
    probe_times = [t for t, p in zip(times, probed, strict=True) if p]
    fraction = len(probe_times) / len(times)
    probe_times += probed_elsewhere
    reuse_times = [t for t, p in zip(times, probed, strict=True) if not p]
    probe_median = statistics.median(probe_times) if probe_times else math.nan
    reuse_median = statistics.median(reuse_times) if reuse_times else math.nan
    cost = (fraction * probe_median if fraction else 0.0) + ((1 - fraction) * reuse_median if reuse_times else 0.0)
    return {"cost_s": cost, "probed_fraction": fraction, "probed_step_s": probe_median, "reused_step_s": reuse_median,
            "mean_s": statistics.fmean(times), "steps": len(times)}


def run_overhead(name: str, size: Size, settings: Sequence[Setting], steps: int, warmup: int, bf16: bool,
                 workdir: str) -> dict[str, Any]:
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(size.config()).to(size.device)
    params = sum(p.numel() for p in base.parameters())
    total = warmup + steps
    data = Blocks(token_blocks(size.batch * total, size.seq))
    entries: list[tuple[str, Setting | None]] = [("plain", None), *((s.name, s) for s in settings)]
    turns = RoundRobin([entry for entry, _ in entries])
    trainers: dict[str, Trainer] = {}
    timers: dict[str, StepTimer] = {}
    for entry, setting in entries:
        common = dict(
            output_dir=f"{workdir}/{len(trainers)}", per_device_train_batch_size=size.batch, max_steps=total,
            learning_rate=size.lr, lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
            report_to=[], disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
            use_cpu=size.device == "cpu", bf16=bf16,
        )
        if setting is None:
            args = TrainingArguments(**common)
            trainer_cls: type[Trainer] = Trainer
        else:
            args = RhoTrainingArguments(**common, **setting.rho_fields())
            trainer_cls = RhoTrainer
        timer = StepTimer(entry, turns, size.device)
        trainer = trainer_cls(model=copy.deepcopy(base), args=args, train_dataset=data, callbacks=[timer])
        timer.trainer = trainer
        trainers[entry], timers[entry] = trainer, timer
    del base
    errors: list[BaseException] = []

    def work(entry: str) -> None:
        try:
            turns.wait(entry)
            trainers[entry].train()
            turns.hand_over(entry, done=True)
        except BaseException as error:  # surface it in the main thread
            errors.append(error)
            turns.fail()

    warm = PeakMemory(size.device)  # start the profiler once in this thread: kineto refuses a first start elsewhere
    warm.start()
    warm.stop()
    threads = [threading.Thread(target=work, args=(entry,), name=entry) for entry, _ in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    rows = []
    plain = step_cost(timers["plain"].times[warmup:], [False] * steps)
    for entry, setting in entries:
        timer = timers[entry]
        twin = timers.get(f"{setting.mode}/{setting.estimator}/every1") if setting else None  # same work per probe
        pooled = twin.times[warmup:] if twin and twin is not timer else []
        cost = step_cost(timer.times[warmup:], timer.probed[warmup:], pooled)
        row = {"setting": entry, **(setting.controller_kwargs() if setting else {}), **cost,
               "peak_bytes": timer.peak_bytes}
        row["default"] = setting is not None and setting.is_default()
        row["time_ratio"] = cost["cost_s"] / plain["cost_s"]
        row["probed_step_ratio"] = cost["probed_step_s"] / plain["cost_s"]
        row["reused_step_ratio"] = cost["reused_step_s"] / plain["cost_s"]
        row["peak_ratio"] = timer.peak_bytes / timers["plain"].peak_bytes
        rows.append(row)
    trainers.clear()
    gc.collect()
    return {"size": name, **asdict(size), "params": params, "steps": steps, "warmup": warmup, "rows": rows}


# --------------------------------------------------------------------------------------------- breakdown
def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_breakdown(name: str, size: Size, repeats: int) -> dict[str, Any]:
    """Each piece of a controlled step, timed alone (median of ``repeats``), in ms and in plain steps."""
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(size.config()).to(size.device)
    batch = batch_of(token_blocks(size.batch, size.seq), size.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if size.device == "cuda" else (lambda: None)

    def train_step() -> None:
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    old = [p.detach().clone() for p in params]
    direction = {n: torch.randn_like(p) for n, p in zip(names, params, strict=True)}
    probes = {est: RadiusProbe(model, radii=("output", "attention"), estimator=est) for est in ESTIMATORS}
    features = {key: value for key, value in batch.items() if key != "labels"}

    def forward(implementation: str) -> Callable[[], None]:
        def run() -> None:
            model.set_attn_implementation(implementation)
            model.eval()
            with torch.no_grad():
                model(**features)
            model.set_attn_implementation("sdpa")

        return run

    pieces = {
        "plain step (forward, backward, AdamW)": train_step,
        "snapshot copy": lambda: torch._foreach_copy_(old, [p.detach() for p in params]),
        "update and its norm": lambda: torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], old)))),
        "forward without tangents, sdpa": forward("sdpa"),
        "forward without tangents, eager attention": forward("eager"),
        "probe, jvp": lambda: probes["jvp"].measure(batch, direction),
        "probe, fd": lambda: probes["fd"].measure(batch, direction),
    }
    results = {piece: median_time(fn, repeats, sync) for piece, fn in pieces.items()}
    step = results["plain step (forward, backward, AdamW)"]
    return {"size": name, "params": sum(p.numel() for p in params), "repeats": repeats,
            "pieces": [{"piece": k, "ms": v * 1e3, "steps": v / step} for k, v in results.items()]}


# --------------------------------------------------------------------------------------------- accuracy and spike
class ReuseClipController(RhoController):
    """An alternative evaluated against the r-trigger, and rejected: a step between probes whose ``r``
    estimated with the last ``rho`` exceeds ``trigger_r * r*`` is clipped to ``trigger_r * r*`` with that
    ``rho`` instead of being measured (``every`` and the growth trigger still probe). It would cap the probe
    cost at ``1/every`` however often a run is clipped; it is safe only while the radius along the step stays
    above ``trigger_r`` times the last one measured, which the accuracy table shows it does not.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cap = min(1.0, self.schedule.trigger_r) * self.r_target
        self.schedule = dataclasses.replace(self.schedule, trigger_r=math.inf)  # no r trigger: reused steps are clipped

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        record = self.last
        if self.mode != "clip" or record.probed or record.skipped or record.r_applied <= self.cap:
            return
        scale = self.cap * record.rho / record.update_norm  # old + scale * u, from old + record.scale * u
        torch._foreach_lerp_(self._shards(), self._old, 1.0 - scale / record.scale)
        self.last = dataclasses.replace(record, scale=scale, r_applied=record.r * scale, clipped=True)


class Oracle:
    """Exact JVP, full-batch radius along the optimizer's real update, from hooks that run inside ``optimizer.step``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, radii: tuple[str, ...]) -> None:
        self.probe = RadiusProbe(model, radii=radii, estimator="jvp")
        self.names = list(self.probe.trainable)
        self.params = [self.probe.trainable[n] for n in self.names]
        self.batch: dict[str, torch.Tensor] | None = None
        self.rho = math.nan
        self.norm = math.nan
        optimizer.register_step_pre_hook(lambda *_: self._before())
        optimizer.register_step_post_hook(lambda *_: self._after())

    @torch.no_grad()
    def _before(self) -> None:
        self.old = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _after(self) -> None:
        update = torch._foreach_sub([p.detach() for p in self.params], self.old)
        self.norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(update)).double()))
        if not math.isfinite(self.norm) or self.norm == 0:
            self.rho = math.nan
            return
        report = self.probe.measure(self.batch, dict(zip(self.names, update, strict=True)),
                                    params=dict(zip(self.names, self.old, strict=True)))
        self.rho = float(report.rho)


def spike_run(size: Size, setting: Setting | None, steps: int, lr: float, factor: float, radii: tuple[str, ...],
              grad_clip: float | None = None) -> dict[str, Any]:
    """Train ``steps`` steps with the LR x ``factor`` in the middle third; per-step loss, r and the oracle's r."""
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(size.config()).to(size.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    oracle = Oracle(model, optimizer, radii) if setting is not None else None
    controller = setting.controller(model, optimizer, radii=radii) if setting else None
    blocks = token_blocks(size.batch * steps, size.seq, seed=1).view(steps, size.batch, size.seq)
    spike = range(steps // 3, 2 * steps // 3)
    records = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (factor if step in spike else 1.0)
        batch = batch_of(blocks[step], size.device)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        record: dict[str, Any] = {"step": step, "loss": loss.item(), "spike": step in spike}
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if controller is None:
            optimizer.step()
        else:
            oracle.batch = batch
            last = controller.step(batch)
            exact_r = oracle.norm / oracle.rho if math.isfinite(oracle.rho) else math.nan
            scale = math.nan if last.skipped else last.scale
            record.update(r=math.nan if last.skipped else last.r, exact_r=exact_r, probed=last.probed, scale=scale,
                          exact_r_applied=scale * exact_r)
        optimizer.zero_grad(set_to_none=True)
        records.append(record)
    return {"records": records, "probes": controller.probes if controller else 0}


def summarize_spike(name: str, run: dict[str, Any], steps: int, r_target: float = 1.0) -> dict[str, Any]:
    records = run["records"]
    start = steps // 3
    losses = [r["loss"] for r in records]
    pre = statistics.fmean(losses[max(0, start - 5) : start]) if start else losses[0]
    after = losses[start:]
    finite_after = [x for x in after if math.isfinite(x)]
    summary: dict[str, Any] = {
        "setting": name,
        "loss_before_spike": pre,
        "max_loss_from_spike": max(finite_after) if len(finite_after) == len(after) else math.inf,
        "final_loss": statistics.fmean(losses[-5:]),
    }
    summary["survived"] = bool(math.isfinite(summary["max_loss_from_spike"]) and summary["max_loss_from_spike"] < pre + 1.0)
    controlled = [r for r in records if "exact_r" in r and math.isfinite(r["exact_r"]) and r["exact_r"] > 0]
    if controlled:
        errors = [abs(r["r"] / r["exact_r"] - 1) for r in controlled]
        probed = [e for e, r in zip(errors, controlled, strict=True) if r["probed"]]
        reused = [e for e, r in zip(errors, controlled, strict=True) if not r["probed"]]
        summary.update(
            probed_fraction=run["probes"] / len(records),
            r_error_median=statistics.median(errors),
            r_error_max=max(errors),
            r_error_max_probed=max(probed) if probed else math.nan,
            r_error_max_reused=max(reused) if reused else math.nan,
            within_5pct=sum(e <= 0.05 for e in errors) / len(errors),
            # how far the true radius fell below the reused one: max of exact r / estimated r on reused steps
            worst_reused_underestimate=max((r["exact_r"] / r["r"] for r in controlled if not r["probed"]), default=math.nan),
            max_exact_r_applied=max(r["exact_r_applied"] for r in controlled),
            steps_over_target=sum(r["exact_r_applied"] > r_target * (1 + 1e-6) for r in controlled),
        )
    return summary


def run_accuracy(name: str, size: Size, settings: Sequence[Setting], steps: int, lr: float, factor: float,
                 radii: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = [summarize_spike("AdamW, no control", spike_run(size, None, steps, lr, factor, radii), steps),
            summarize_spike("AdamW + grad-norm clip 1.0", spike_run(size, None, steps, lr, factor, radii, 1.0), steps)]
    for setting in settings:
        rows.append(summarize_spike(setting.name, spike_run(size, setting, steps, lr, factor, radii), steps))
        rows[-1]["default"] = setting.is_default()
    for row in rows:
        row["size"] = name
    return rows


# --------------------------------------------------------------------------------------------- report
def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def overhead_table(results: Sequence[dict[str, Any]]) -> str:
    """Settings down, sizes across: time per step / plain step (peak memory / plain); "-" where not timed."""
    head = ["setting", *(f"{r['size']} ({r['params'] / 1e6:.2f}M params, {r['batch']}x{r['seq']} tokens)" for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    plain = ["plain Trainer step", *(f"{r['rows'][0]['cost_s'] * 1e3:.0f} ms" for r in results)]
    lines.append("| " + " | ".join(plain) + " |")
    by_size = [{row["setting"]: row for row in r["rows"][1:]} for r in results]
    for name in dict.fromkeys(row["setting"] for r in results for row in r["rows"][1:]):
        default = any(rows[name]["default"] for rows in by_size if name in rows)
        cells = [name + (" **(default)**" if default else "")]
        for rows in by_size:
            cell = rows.get(name)
            if cell is None:
                cells.append("-")
                continue
            text = f"{fmt(cell['time_ratio'])}x ({fmt(cell['peak_ratio'])}x mem)"
            if cell["probed_fraction"] < 1:
                text += f", {cell['probed_fraction']:.0%} probed"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(result: dict[str, Any]) -> str:
    lines = [f"{result['size']}: {result['params'] / 1e6:.2f}M params, batch {result['batch']} x {result['seq']}, "
             f"{result['steps']} timed steps after {result['warmup']} warm-up",
             "| setting | time / plain | probed step / plain | reused step / plain | probed | peak MB | peak / plain |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['setting']} | {fmt(row['time_ratio'])} | {fmt(row['probed_step_ratio'])} | "
                     f"{fmt(row['reused_step_ratio'])} | {row['probed_fraction']:.0%} | {row['peak_bytes'] / 2**20:.1f} | "
                     f"{fmt(row['peak_ratio'])} |")
    return "\n".join(lines)


def breakdown_table(result: dict[str, Any]) -> str:
    lines = [f"breakdown, {result['size']} ({result['params'] / 1e6:.2f}M params), median of {result['repeats']}",
             "| piece | ms | plain steps |", "|---|---|---|"]
    lines += [f"| {p['piece']} | {p['ms']:.1f} | {p['steps']:.3f} |" for p in result["pieces"]]
    return "\n".join(lines)


def accuracy_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| setting | probed | r error median | r error max (probed / reused) | within 5% | max exact / estimated r, "
             "reused | max exact r_applied | steps over r* | loss before spike | max loss from spike | survived |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "r_error_median" in row:
            cells = [f"{row['probed_fraction']:.0%}", f"{row['r_error_median']:.1e}",
                     f"{row['r_error_max']:.1e} ({row['r_error_max_probed']:.1e} / {fmt(row['r_error_max_reused'], 3)})",
                     f"{row['within_5pct']:.0%}", fmt(row["worst_reused_underestimate"]), fmt(row["max_exact_r_applied"], 3),
                     str(row["steps_over_target"])]
        else:
            cells = ["-"] * 7
        cells += [fmt(row["loss_before_spike"]), fmt(row["max_loss_from_spike"]), "yes" if row["survived"] else "**no**"]
        label = row["setting"] + (" **(default)**" if row.get("default") else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "5m", "40m"], choices=list(SIZES))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per trainer, after the warm-up (default: the size's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (the first also measures memory)")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES), help="controller modes to time (default: the size's)")
    parser.add_argument("--every", type=int, default=None, help="k of the every-k rows (default: rho_every's default)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (the probe stays fp32)")
    parser.add_argument("--breakdown-repeats", type=int, default=5)
    parser.add_argument("--spike-size", default="tiny", choices=list(SIZES))
    parser.add_argument("--spike-steps", type=int, default=90, help="steps of the spike run; the LR spikes in the middle third")
    parser.add_argument("--spike-lr", type=float, default=1e-3)
    parser.add_argument("--spike-factor", type=float, default=1000.0)
    parser.add_argument("--spike-radii", nargs="+", default=["output", "attention"])
    parser.add_argument("--out", default="outputs/overhead.json")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first step measures peak memory and is never timed")
    for name in {*args.sizes, args.spike_size}:
        if SIZES[name].device == "cuda" and not torch.cuda.is_available():
            parser.error(f"size {name!r} needs a CUDA GPU; torch.cuda.is_available() is False here")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")
    every_k = args.every or default_every()
    if every_k == 1:
        every_k = 16
    result: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "every_k": every_k,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    if "overhead" in args.parts:
        result["overhead"] = []
        with tempfile.TemporaryDirectory() as workdir:
            for name in args.sizes:
                size = SIZES[name]
                settings = overhead_settings(every_k, args.modes or size.modes)
                measured = run_overhead(name, size, settings, args.steps or size.steps, args.warmup, args.bf16, workdir)
                result["overhead"].append(measured)
                print(step_table(measured), "\n", flush=True)
        print(overhead_table(result["overhead"]), "\n", flush=True)
    if "breakdown" in args.parts:
        name = args.sizes[-1]
        result["breakdown"] = run_breakdown(name, SIZES[name], args.breakdown_repeats)
        print(breakdown_table(result["breakdown"]), "\n", flush=True)
    if "accuracy" in args.parts:
        size = SIZES[args.spike_size]
        result["accuracy"] = run_accuracy(args.spike_size, size, accuracy_settings(every_k), args.spike_steps,
                                          args.spike_lr, args.spike_factor, tuple(args.spike_radii))
        print(f"accuracy and LR spike on {args.spike_size}: AdamW lr {args.spike_lr}, x{args.spike_factor:g} for steps "
              f"{args.spike_steps // 3}-{2 * args.spike_steps // 3 - 1} of {args.spike_steps}")
        print(accuracy_table(result["accuracy"]), "\n", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
