"""What one RadiusProbe.measure costs, in units of one training forward+backward.

    python benchmarks/probe_cost.py                      # ~5M-parameter GPT-NeoX, 8 x 128 tokens; ~1 min on 2 cores
    python benchmarks/probe_cost.py --tiny --out /tmp/probe_cost.json    # smoke run, a few seconds

Everything runs in ONE process on the same weights and batch. Each repetition times, in turn,
one forward+backward (``model(**batch).loss.backward()``, sdpa attention, train mode: the
Trainer's step without the optimizer) and each probe setting; the order rotates from one
repetition to the next, so that whatever else loads the machine hits every setting alike.
Warm-up repetitions are dropped; the table shows medians and their ratio to forward+backward.
The probe runs in fp32 along a random unit direction over all parameters (one JVP, or two
forwards for ``fd``); output + attention + FFN is the full probe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_ghosts import RadiusProbe

SETTINGS = {
    "jvp output": (("output",), "jvp"),
    "jvp output+attention": (("output", "attention"), "jvp"),
    "jvp output+attention+ffn": (("output", "attention", "ffn"), "jvp"),
    "fd output+attention": (("output", "attention"), "fd"),
}
FULL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=2048)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)


def build(tiny: bool, batch: int, length: int, seed: int) -> tuple[GPTNeoXForCausalLM, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    shape = TINY if tiny else FULL
    config = GPTNeoXConfig(**shape, max_position_embeddings=max(length, 64), attn_implementation="sdpa")
    model = GPTNeoXForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (batch, length))
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer hidden-32 model, 2 x 16 tokens, 3 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8; 2 with --tiny)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default 128; 16 with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/probe_cost.json"))
    args = parser.parse_args()
    reps = args.reps or (3 if args.tiny else 10)
    batch_size = args.batch or (2 if args.tiny else 8)
    length = args.length or (16 if args.tiny else 128)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, batch = build(args.tiny, batch_size, length, args.seed)
    model.train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    direction = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    probes = {name: RadiusProbe(model, radii, estimator) for name, (radii, estimator) in SETTINGS.items()}

    def run(name: str) -> None:
        if name == "forward+backward":
            forward_backward(model, batch)
        else:
            probes[name].measure(batch, direction)

    names = ["forward+backward", *SETTINGS]
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            run(name)
            elapsed = time.perf_counter() - start
            if rep >= args.warmup:
                times[name].append(elapsed)

    base = statistics.median(times["forward+backward"])
    reports = {name: probe.measure(batch, direction) for name, probe in probes.items()}
    rows = []
    for name in names:
        median = statistics.median(times[name])
        row = {"setting": name, "median_ms": 1e3 * median, "ratio": median / base, "times_ms": [1e3 * t for t in times[name]]}
        if name in reports:
            row["rho"] = float(reports[name].rho)
            row["bottleneck"] = reports[name].bottleneck
        rows.append(row)

    parameters = sum(p.numel() for p in model.parameters())
    print(f"GPT-NeoX {parameters / 1e6:.2f}M parameters, {batch_size} x {length} = {batch_size * length} tokens, "
          f"{torch.get_num_threads()} threads, median of {reps} after {args.warmup} warm-up")
    print()
    print("| measurement | median ms | x forward+backward |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['median_ms']:.1f} | {row['ratio']:.2f} |")

    result = {
        "model": {"type": "gpt_neox", **(TINY if args.tiny else FULL), "parameters": parameters},
        "batch": batch_size,
        "length": length,
        "reps": reps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
