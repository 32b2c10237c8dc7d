"""Where a probe's time goes on a GPU: pieces of a controlled step timed alone, and the probe's top kernels.

    python benchmarks/gpu_breakdown.py --out benchmarks/results/gpu_breakdown.json     # CUDA GPU (bf16 training)
    python benchmarks/gpu_breakdown.py --tiny --out /tmp/breakdown.json                 # CPU smoke form

Pythia-160m's shape, 8 x 1024 tokens: a plain bf16-autocast training step (forward, backward, AdamW), forwards
without tangents (sdpa, eager), and the JVP probe in bf16 with the output radius alone and with the attention
radii, and the fp32 finite-difference probe, each as a median time and as a multiple of the plain step; then
``torch.profiler``'s ten most expensive kernels of the bf16 JVP probe with attention.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import median_time
from presets import build_model

from hf_ghosts import RadiusProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (CPU smoke form)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    preset, vocab, batch, seq = ("pythia-tiny", 256, 2, 32) if args.tiny else ("pythia-160m", 50304, 8, 1024)
    model = build_model(preset, vocab, 0, attn_implementation="sdpa").to(device)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(direction.values()))).double()))
    half = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def train_step() -> None:
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(implementation: str) -> Callable[[], None]:
        def run() -> None:
            model.set_attn_implementation(implementation)
            model.eval()
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                model(input_ids=ids, attention_mask=inputs["attention_mask"])
            model.set_attn_implementation("sdpa")

        return run

    probes = {
        "probe jvp bf16, output": RadiusProbe(model, ("output",), "jvp", dtype=half),
        "probe jvp bf16, output + attention": RadiusProbe(model, ("output", "attention"), "jvp", dtype=half),
        "probe fd fp32, output + attention": RadiusProbe(model, ("output", "attention"), "fd"),
    }
    pieces: dict[str, Callable[[], Any]] = {
        "plain step (bf16 autocast: forward, backward, AdamW)": train_step,
        "forward, no tangents, sdpa (bf16 autocast)": forward("sdpa"),
        "forward, no tangents, eager (bf16 autocast)": forward("eager"),
        # as the controller calls it: |u| given (no host sync in a jvp probe)
        **{name: (lambda probe=probe: probe.measure(inputs, direction, norm=norm)) for name, probe in probes.items()},
    }
    rows = []
    plain = None
    for name, fn in pieces.items():
        ms = 1e3 * median_time(fn, args.repeats, sync)
        plain = plain or ms
        peak = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append({"piece": name, "ms": ms, "plain_steps": ms / plain, "peak_mib": peak})
        print(f"{name:55s} {ms:9.1f} ms  {ms / plain:6.2f} plain steps  peak {peak} MiB", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        probes["probe jvp bf16, output + attention"].measure(inputs, direction, norm=norm)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=15)
    print(table)
    kernels = sorted(probes["probe jvp bf16, output + attention"].attention_kernels)
    result = {"device": device, "preset": preset, "batch": batch, "seq": seq, "vocab": vocab, "rows": rows,
              "attention_kernels": kernels, "profile_top": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
