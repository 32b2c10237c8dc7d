"""What the benchmarks share: model sizes, controller settings, data, peak memory, interleaved timing, tables.

Not a script: ``benchmarks/overhead.py`` and ``benchmarks/accuracy.py`` import it as ``harness``
(``python benchmarks/<name>.py`` puts ``benchmarks/`` on ``sys.path``). It puts ``recipes/`` there too: the model
presets and the LR spike are the recipes' (``recipes/presets.py``), imported as ``presets``.

Timing runs everything in ONE process, interleaved, so that whatever else loads the machine hits
every setting alike: :class:`RoundRobin` lets one ``Trainer`` (a thread each) run one optimizer step
at a time, in an order shuffled every round, :class:`StepTimer` times each step; :func:`interleaved_times`
does the same for plain callables in a rotating order.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback

from hf_ghosts import RhoController, RhoTrainingArguments
from hf_ghosts.settings import MODES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # for ``presets``, beside the recipes
from presets import build_model, preset_config, pydoc_text


# --------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    """A GPT-NeoX in Pythia's layout (a preset of ``recipes/presets.py``, shape overrides), its batch and LR."""

    preset: str
    vocab: int
    batch: int
    seq: int
    lr: float
    steps: int  # timed steps (after the warm-up) unless --steps says otherwise
    shape: tuple[tuple[str, int], ...] = ()  # config fields that differ from the preset's (hidden size, layers, ...)
    modes: tuple[str, ...] = MODES  # modes timed unless --modes says otherwise
    device: str = "cpu"

    def config(self) -> PretrainedConfig:
        return preset_config(self.preset, vocab_size=self.vocab, attn_implementation="sdpa", **dict(self.shape))

    def model(self, seed: int = 0) -> PreTrainedModel:
        """The model, weights drawn from ``torch.manual_seed(seed)``, on the size's device (sdpa attention)."""
        return build_model(self.preset, self.vocab, seed, attn_implementation="sdpa", **dict(self.shape)).to(self.device)

    def describe(self) -> dict[str, Any]:
        """The size as JSON: its preset, shape (hidden, layers, heads, vocab), batch, LR and device."""
        config = self.config()
        return {"preset": self.preset, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads, "vocab": self.vocab, "batch": self.batch, "seq": self.seq,
                "lr": self.lr, "steps": self.steps, "modes": list(self.modes), "device": self.device}


# "8 x 128 tokens = 1,024 tokens/step" on CPU; Pythia-160m's shape with 8 x 512 on a GPU.
# 40m on CPU: "clip" only (a probe costs the same in every mode; "set" probes every step by construction).
SIZES = {
    "tiny": Size("pythia-tiny", vocab=256, batch=4, seq=32, lr=1e-3, steps=48,
                 shape=(("hidden_size", 32), ("intermediate_size", 128))),
    "4m": Size("pythia-31m", vocab=2048, batch=8, seq=128, lr=6e-4, steps=24,
               shape=(("num_hidden_layers", 4), ("num_attention_heads", 4))),
    "5m": Size("pythia-31m", vocab=2048, batch=8, seq=128, lr=6e-4, steps=32),
    "40m": Size("pythia-70m", vocab=16384, batch=8, seq=128, lr=6e-4, steps=24, shape=(("num_hidden_layers", 8),),
                modes=("clip",)),
    "pythia-160m": Size("pythia-160m", vocab=50304, batch=8, seq=512, lr=6e-4, steps=48, device="cuda"),
}


def check_devices(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """``parser.error`` for a size that needs CUDA on a machine without it."""
    for name in dict.fromkeys(names):
        if SIZES[name].device == "cuda" and not torch.cuda.is_available():
            parser.error(f"size {name!r} needs a CUDA GPU; torch.cuda.is_available() is False here")


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One controller configuration; ``None`` fields take RhoTrainingArguments' defaults."""

    name: str
    mode: str | None = None
    estimator: str | None = None
    every: int | None = None
    trigger_r: float | None = None
    trigger_growth: float | None = None
    clip_reused: bool = False  # the rejected alternative to the r-trigger: see accuracy.ReuseClipController
    probe_dtype: str | None = None

    def controller_kwargs(self) -> dict[str, Any]:
        values = dict(mode=self.mode, estimator=self.estimator, every=self.every, trigger_r=self.trigger_r,
                      trigger_growth=self.trigger_growth, probe_dtype=self.probe_dtype)
        return {key: value for key, value in values.items() if value is not None}

    def is_default(self) -> bool:
        """Whether this is what ``RhoTrainingArguments()`` runs."""
        defaults = RhoTrainingArguments.__dataclass_fields__
        return not self.clip_reused and all(
            defaults[f"rho_{key}"].default == value for key, value in self.controller_kwargs().items())

    def rho_fields(self) -> dict[str, Any]:
        return {f"rho_{key}": value for key, value in self.controller_kwargs().items()}


# --------------------------------------------------------------------------------------------- data
def token_blocks(count: int, length: int, seed: int = 0, span: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``[count, length]`` byte-level token ids of the English text that ships with Python, random offsets within
    the ``span`` share of it (``(0.0, 0.8)`` and ``(0.8, 1.0)``: text for training and held-out text)."""
    data = torch.frombuffer(bytearray(pydoc_text().encode()), dtype=torch.uint8)
    data = data[int(span[0] * data.numel()) : int(span[1] * data.numel())]
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
    """Peak bytes allocated during a region, above what was alive when it began.

    On CUDA ``max_memory_allocated``; on CPU the allocator's events under ``torch.profiler``
    (``profile_memory=True``).
    """

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


# --------------------------------------------------------------------------------------------- timing
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


def run_interleaved(trainers: Mapping[str, Trainer], turns: RoundRobin) -> None:
    """``train()`` every trainer in a thread of its own, one optimizer step at a time as ``turns`` allows.

    Each trainer needs a :class:`StepTimer` (it hands over after each step). The first error is re-raised here.
    """
    errors: list[BaseException] = []

    def work(entry: str) -> None:
        try:
            turns.wait(entry)
            trainers[entry].train()
            turns.hand_over(entry, done=True)
        except BaseException as error:  # surface it in the main thread
            errors.append(error)
            turns.fail()

    threads = [threading.Thread(target=work, args=(entry,), name=entry) for entry in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class StepTimer(TrainerCallback):
    """Times each optimizer step, measures the first one's peak memory, and hands over to the next trainer.

    A step runs from ``on_step_begin`` to ``on_step_end``: forward, backward, grad clip, AdamW (+ probe
    and rescale), scheduler, zero_grad.
    """

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


def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one untimed call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Times of each ``fns[name]()``: every repetition runs each once, the order rotating by one each time.

    The first ``warmup`` repetitions are dropped.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            sync()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    return times


# --------------------------------------------------------------------------------------------- report
def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``| a | b |`` lines under a ``|---|---|`` rule."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_info(argv: Sequence[str] | None, **extra: Any) -> dict[str, Any]:
    """What a result JSON opens with: torch, threads, device, the command line."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), **extra,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "argv": list(sys.argv[1:] if argv is None else argv)}


def write_result(result: Mapping[str, Any], path: str | Path) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out}")
