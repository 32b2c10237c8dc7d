"""Cost and tightness of the top-k batch radius (:func:`hf_ghosts.radii.topk_exact_radius`) at vocabulary scale.

    python benchmarks/topk_radius.py                         # 16k and 50k vocabularies, k = 8 and 32; ~minutes on CPU
    python benchmarks/topk_radius.py --vocabs 2048 --ks 4 --tokens 16 --repeats 1 --out /tmp/t.json   # smoke run

Inputs are synthetic, shaped like an LM head's: for ``--tokens`` positions, logits
``z = 2.5 * N(0, 1)`` with the label's logit raised by 8 on half the positions (confident tokens),
slopes ``a = N(0, 1)`` (the radius scales as ``1 / |a|``, so their scale does not matter). Timed
(median of ``--repeats``, one thread): the whole call, and its exact part alone
(:func:`~hf_ghosts.radii.certified_radius` on the ``k`` widest rows: what a probe adds once the
chunked head has the spreads). Tightness: the top-k radius over ``pi / max Delta`` (Theorem 4.6),
which cannot exceed ``Delta_(1) / Delta_(k+1)`` (the (k+1)-th token's ``pi / Delta`` caps it), and per
token, the certified radius over its own ``pi / Delta``;
with ``--exact-rows`` > 0, the certified radius of that many rows over :func:`~hf_ghosts.radii.exact_radius`
at the smallest vocabulary (exact_radius costs ~0.3 s per row per 1000 classes). Writes one JSON
(``--out``, default ``benchmarks/results/topk_radius.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hf_ghosts.radii import certified_radius, exact_radius, rho_bound, spread, topk_exact_radius


def synthetic_head(tokens: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and slopes ``[tokens, vocab]`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=generator) * 2.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    confident = torch.arange(tokens) % 2 == 0
    logits[confident, labels[confident]] += 8.0
    return logits, torch.randn(tokens, vocab, generator=generator)


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[16384, 50304])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=256, help="positions in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-rows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "topk_radius.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for vocab in args.vocabs:
        logits, slopes = synthetic_head(args.tokens, vocab, seed=vocab)
        bound = rho_bound(spread(slopes)).min().item()
        widest = spread(slopes).argsort(descending=True)
        for k in args.ks:
            radius = topk_exact_radius(logits, slopes, k).item()
            whole = median_seconds(partial(topk_exact_radius, logits, slopes, k), args.repeats)
            chosen = widest[:k]
            certified: list[torch.Tensor] = []
            exact_part = median_seconds(
                lambda c=chosen, out=certified: out.append(certified_radius(logits[c], slopes[c])),  # noqa: B023
                args.repeats,
            )
            widths = spread(slopes[widest[: k + 1]])
            # per token, the certified radius over its own pi / Delta; and the most top-k can gain, Delta_(1) / Delta_(k+1)
            per_token = (certified[-1] / rho_bound(widths[:k])).tolist()
            rows.append({
                "vocab": vocab, "k": k, "tokens": args.tokens, "seconds_total": whole, "seconds_exact_part": exact_part,
                "ms_per_row": 1e3 * exact_part / max(k, 1), "radius": radius, "bound": bound, "radius_over_bound": radius / bound,
                "ceiling_spread_ratio": (widths[0] / widths[k]).item(),
                "per_token_certified_over_bound": [min(per_token), statistics.median(per_token), max(per_token)]
                if per_token else [1.0, 1.0, 1.0],
            })
            print(f"vocab {vocab:6d} k {k:3d}: {whole:7.3f} s per probe ({exact_part:7.3f} s exact part, "
                  f"{1e3 * exact_part / max(k, 1):6.1f} ms/row); radius / (pi / max Delta) = {radius / bound:.3f} "
                  f"(ceiling {rows[-1]['ceiling_spread_ratio']:.3f}; per token min/median/max "
                  f"{', '.join(f'{x:.2f}' for x in rows[-1]['per_token_certified_over_bound'])})")

    check = []
    if args.exact_rows > 0:
        vocab = min(args.vocabs)
        logits, slopes = synthetic_head(args.tokens, vocab, seed=vocab)
        chosen = spread(slopes).argsort(descending=True)[: args.exact_rows]
        start = time.perf_counter()
        exact = exact_radius(logits[chosen].double(), slopes[chosen].double())
        exact_seconds = time.perf_counter() - start
        certified = certified_radius(logits[chosen], slopes[chosen].double())
        check = [{"vocab": vocab, "certified_over_exact": c, "exact_seconds_per_row": exact_seconds / args.exact_rows}
                 for c in (certified / exact).tolist()]
        print(f"vocab {vocab}: certified / exact = {[round(row['certified_over_exact'], 4) for row in check]} "
              f"(exact_radius {exact_seconds / args.exact_rows:.1f} s per row)")
        assert all(row["certified_over_exact"] <= 1 + 1e-9 for row in check), "certified above exact"

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": 1, "torch": torch.__version__},
        "inputs": "synthetic: logits 2.5 N(0,1) (+8 on the label for half the tokens), slopes N(0,1)",
        "rows": rows,
        "certified_vs_exact": check,
        "pi": math.pi,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
