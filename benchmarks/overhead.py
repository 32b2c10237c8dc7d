"""What RhoTrainer costs over a plain Trainer step, what a probe costs, and (with ``accuracy``) how accurate it is.

    python benchmarks/overhead.py                             # CPU: tiny, 5m, 40m; ~50 min on 2 cores
    python benchmarks/overhead.py --sizes tiny --steps 2 --warmup 1 --spike-steps 6   # smoke run (tests/test_benchmarks.py)
    python benchmarks/overhead.py --sizes 4m --parts probe --threads 1                 # docs/cost.md's probe-cost table
    python benchmarks/overhead.py --sizes pythia-160m --parts overhead --bf16            # needs a CUDA GPU

Everything runs in ONE process and writes one JSON (``--out``, default ``outputs/overhead.json``);
the timing harness (interleaving, step timer, peak memory, tables) is ``benchmarks/harness.py``.

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
3. ``probe``: one ``RadiusProbe.measure`` per radii/estimator setting against one training
   forward+backward (sdpa, train mode: the Trainer's step without the optimizer), on the last size,
   same weights and batch, fp32, along a random direction over all parameters. Each repetition runs
   every setting once, the order rotating; ``--warmup`` repetitions are dropped, ``--probe-repeats`` timed.
4. ``accuracy`` (and the LR spike): ``benchmarks/accuracy.py``, with the same ``--spike-*`` options.

Sizes (``harness.SIZES``) are presets of ``recipes/presets.py`` (GPT-NeoX in Pythia's layout: parallel
residual, 25% rotary, untied embeddings) with their batch: "8 x 128 tokens = 1,024 tokens/step" on
CPU; Pythia-160m with 8 x 512 on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import accuracy
import torch
from harness import (
    SIZES,
    Blocks,
    PeakMemory,
    RoundRobin,
    Setting,
    Size,
    StepTimer,
    batch_of,
    check_devices,
    fmt,
    interleaved_times,
    markdown_table,
    median_time,
    run_info,
    run_interleaved,
    step_cost,
    token_blocks,
    write_result,
)
from transformers import Trainer, TrainingArguments

from hf_ghosts import RadiusProbe, RhoTrainer, RhoTrainingArguments
from hf_ghosts.radii import update_norm
from hf_ghosts.settings import ESTIMATORS, MODES

PARTS = ("overhead", "breakdown", "probe", "accuracy")
PROBE_SETTINGS = {  # label -> (radii, estimator)
    "jvp output": (("output",), "jvp"),
    "jvp output+attention": (("output", "attention"), "jvp"),
    "jvp output+attention+ffn": (("output", "attention", "ffn"), "jvp"),
    "fd output+attention": (("output", "attention"), "fd"),
    "fd output+attention, watching ffn+ffn_activation": (("output", "attention", "ffn", "ffn_activation"), "fd"),  # main job
}


def overhead_settings(every_k: int, modes: Sequence[str] = MODES) -> list[Setting]:
    """Each mode and estimator, probing every step and every ``every_k`` steps with the default triggers."""
    return [
        Setting(f"{mode}/{estimator}/every{every}", mode=mode, estimator=estimator, every=every)
        for mode in modes
        for estimator in ESTIMATORS
        for every in dict.fromkeys((1, every_k))
    ]


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# --------------------------------------------------------------------------------------------- overhead
def run_overhead(name: str, size: Size, settings: Sequence[Setting], steps: int, warmup: int, bf16: bool,
                 workdir: str, base: torch.nn.Module | None = None, data: Blocks | None = None,
                 lr: float | None = None) -> dict[str, Any]:
    """Plain ``Trainer`` and one ``RhoTrainer`` per setting, interleaved step by step, from ``base`` (default: the
    size's fresh model) on ``data`` (default: pydoc blocks) at ``lr`` (default: the size's)."""
    base = size.model() if base is None else base
    params = sum(p.numel() for p in base.parameters())
    total = warmup + steps
    data = Blocks(token_blocks(size.batch * total, size.seq)) if data is None else data
    entries: list[tuple[str, Setting | None]] = [("plain", None), *((s.name, s) for s in settings)]
    turns = RoundRobin([entry for entry, _ in entries])
    trainers: dict[str, Trainer] = {}
    timers: dict[str, StepTimer] = {}
    for entry, setting in entries:
        common = dict(
            output_dir=f"{workdir}/{len(trainers)}", per_device_train_batch_size=size.batch, max_steps=total,
            learning_rate=size.lr if lr is None else lr, lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
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
    warm = PeakMemory(size.device)  # start the profiler once in this thread: kineto refuses a first start elsewhere
    warm.start()
    warm.stop()
    run_interleaved(trainers, turns)
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
        probe = getattr(getattr(trainers[entry], "rho_controller", None), "probe", None)  # "auto" as resolved
        row["probe"] = None if probe is None else f"{probe.estimator}/{str(probe.dtype).removeprefix('torch.')}"
        row["time_ratio"] = cost["cost_s"] / plain["cost_s"]
        row["probed_step_ratio"] = cost["probed_step_s"] / plain["cost_s"]
        row["reused_step_ratio"] = cost["reused_step_s"] / plain["cost_s"]
        row["peak_ratio"] = timer.peak_bytes / timers["plain"].peak_bytes
        rows.append(row)
    trainers.clear()
    gc.collect()
    return {"size": name, **size.describe(), "params": params, "steps": steps, "warmup": warmup, "rows": rows}


# --------------------------------------------------------------------------------------------- breakdown
def run_breakdown(name: str, size: Size, repeats: int) -> dict[str, Any]:
    """Each piece of a controlled step, timed alone (median of ``repeats``), in ms and in plain steps."""
    model = size.model()
    batch = batch_of(token_blocks(size.batch, size.seq), size.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def train_step() -> None:
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    old = [p.detach().clone() for p in params]
    direction = {n: torch.randn_like(p) for n, p in zip(names, params, strict=True)}
    norm = float(update_norm(list(direction.values())))
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
        "update and its norm": lambda: update_norm(torch._foreach_sub([p.detach() for p in params], old)),
        "forward without tangents, sdpa": forward("sdpa"),
        "forward without tangents, eager attention": forward("eager"),
        # as the controller calls it: |u| given (a jvp probe then makes no host sync)
        "probe, jvp": lambda: probes["jvp"].measure(batch, direction, norm=norm),
        "probe, fd": lambda: probes["fd"].measure(batch, direction, norm=norm),
    }
    results = {piece: median_time(fn, repeats, _sync(size.device)) for piece, fn in pieces.items()}
    step = results["plain step (forward, backward, AdamW)"]
    return {"size": name, "params": sum(p.numel() for p in params), "repeats": repeats,
            "pieces": [{"piece": k, "ms": v * 1e3, "steps": v / step} for k, v in results.items()]}


# --------------------------------------------------------------------------------------------- probe cost
def run_probe_cost(name: str, size: Size, repeats: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Median time of one ``RadiusProbe.measure`` per ``PROBE_SETTINGS`` entry, and its ratio to forward+backward."""
    model = size.model(seed)
    model.train()
    batch = batch_of(token_blocks(size.batch, size.seq, seed=seed), size.device)
    generator = torch.Generator().manual_seed(seed + 1)
    direction = {n: torch.randn(p.shape, generator=generator).to(size.device) for n, p in model.named_parameters()}
    probes = {label: RadiusProbe(model, radii, estimator) for label, (radii, estimator) in PROBE_SETTINGS.items()}

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    calls = {"forward+backward": forward_backward,
             **{label: partial(probe.measure, batch, direction) for label, probe in probes.items()}}
    times = interleaved_times(calls, repeats, warmup, _sync(size.device))
    base = statistics.median(times["forward+backward"])
    rows = []
    for label, measured in times.items():
        median = statistics.median(measured)
        row = {"setting": label, "median_ms": 1e3 * median, "ratio": median / base, "times_ms": [1e3 * t for t in measured]}
        if label in probes:
            report = probes[label].measure(batch, direction)
            row["rho"], row["bottleneck"] = float(report.rho), report.bottleneck
        rows.append(row)
    return {"size": name, **size.describe(), "params": sum(p.numel() for p in model.parameters()), "repeats": repeats,
            "warmup": warmup, "threads": torch.get_num_threads(), "rows": rows}


# --------------------------------------------------------------------------------------------- report
def overhead_table(results: Sequence[dict[str, Any]]) -> str:
    """Settings down, sizes across: time per step / plain step (peak memory / plain); "-" where not timed."""
    head = ["setting", *(f"{r['size']} ({r['params'] / 1e6:.2f}M params, {r['batch']}x{r['seq']} tokens)" for r in results)]
    lines = [["plain Trainer step", *(f"{r['rows'][0]['cost_s'] * 1e3:.0f} ms" for r in results)]]
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
        lines.append(cells)
    return markdown_table(head, lines)


def step_table(result: dict[str, Any]) -> str:
    title = (f"{result['size']}: {result['params'] / 1e6:.2f}M params, batch {result['batch']} x {result['seq']}, "
             f"{result['steps']} timed steps after {result['warmup']} warm-up")
    header = ["setting", "time / plain", "probed step / plain", "reused step / plain", "probed", "peak MB", "peak / plain"]
    rows = [[row["setting"], fmt(row["time_ratio"]), fmt(row["probed_step_ratio"]), fmt(row["reused_step_ratio"]),
             f"{row['probed_fraction']:.0%}", f"{row['peak_bytes'] / 2**20:.1f}", fmt(row["peak_ratio"])]
            for row in result["rows"]]
    return title + "\n" + markdown_table(header, rows)


def breakdown_table(result: dict[str, Any]) -> str:
    title = f"breakdown, {result['size']} ({result['params'] / 1e6:.2f}M params), median of {result['repeats']}"
    rows = [[p["piece"], f"{p['ms']:.1f}", f"{p['steps']:.3f}"] for p in result["pieces"]]
    return title + "\n" + markdown_table(["piece", "ms", "plain steps"], rows)


def probe_table(result: dict[str, Any]) -> str:
    title = (f"probe cost, {result['size']}: GPT-NeoX {result['params'] / 1e6:.2f}M parameters, {result['batch']} x "
             f"{result['seq']} = {result['batch'] * result['seq']} tokens, {result['threads']} threads, median of "
             f"{result['repeats']} after {result['warmup']} warm-up")
    rows = [[row["setting"], f"{row['median_ms']:.1f}", f"{row['ratio']:.2f}"] for row in result["rows"]]
    return title + "\n" + markdown_table(["measurement", "median ms", "x forward+backward"], rows)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "5m", "40m"], choices=list(SIZES))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per trainer, after the warm-up (default: the size's)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed first steps (the first also measures memory); untimed repetitions of the probe part")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES), help="controller modes to time (default: the size's)")
    parser.add_argument("--every", type=int, default=None, help="k of the every-k rows (default: rho_every's default)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (rho_probe_dtype \"auto\": on CUDA the default probe is then a bf16 jvp)")
    parser.add_argument("--breakdown-repeats", type=int, default=5)
    parser.add_argument("--probe-repeats", type=int, default=10, help="timed repetitions of the probe part")
    accuracy.add_arguments(parser)
    parser.add_argument("--out", default="outputs/overhead.json")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first step measures peak memory and is never timed")
    check_devices(parser, [*args.sizes, args.spike_size])
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")
    every_k = accuracy.every_k(args.every)
    result = run_info(argv, every_k=every_k)
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
    if "probe" in args.parts:
        name = args.sizes[-1]
        result["probe"] = run_probe_cost(name, SIZES[name], args.probe_repeats, args.warmup)
        print(probe_table(result["probe"]), "\n", flush=True)
    if "accuracy" in args.parts:
        result["accuracy"] = accuracy.run(args)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
