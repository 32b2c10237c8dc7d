"""RhoController in a plain loop on a ``fully_shard`` model with a bf16 ``MixedPrecisionPolicy`` (2 gloo processes).

Launched by tests/test_distributed.py::fsdp_mixed, from the repository root and with it on ``PYTHONPATH`` (for
``tests.helpers``)::

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/distributed_scripts/fsdp_mixed_loop.py --out DIR

Writes ``DIR/rank<r>.pt``: the first step's batch, old weights and direction (full tensors), the local and
reduced reports, each step's record, the dtypes the weights had in the probe's forwards and in training's, the
shards before and after a direct ``measure`` call, the FSDP params' ``param_dtype`` after it, the final weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from hf_ghosts import RhoController, all_reduce_report, compat
from tests.helpers import tiny_causal_lm, token_batch

STEPS = 3


def full(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride()).full_tensor()
    return tensor.detach().clone()


def fields(report: Any) -> dict[str, Any]:
    return {"out_spread": report.out_spread.clone(), "attn_spread": report.attn_spread.clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = tiny_causal_lm("gpt_neox")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in model.gpt_neox.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    controller = RhoController(model, optimizer, mode="set", r_target=0.5, radii=("output", "attention"))
    seen: list[torch.dtype] = []  # the dtype of the first layer's query-key-value weight in each forward
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    qkv.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    record: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size(), "steps": [], "probes": []}

    def reduce(report: Any) -> Any:
        reduced = all_reduce_report(report)
        entry = {"local": fields(report), "reduced": fields(reduced), "probe_dtypes": list(seen)}
        if not record["probes"]:
            entry["batch"] = {k: v.clone() for k, v in controller.batch.items()}
            old = {n: full(t, p) for n, t, p in zip(controller.names, controller._old, controller.params, strict=True)}
            new = {n: full(t, p) for n, t, p in zip(controller.names, controller._shards(), controller.params, strict=True)}
            entry["old"], entry["direction"] = old, {n: new[n] - old[n] for n in old}
            entry["estimator"], entry["dtype"] = controller.probe.estimator, controller.probe.dtype
            entry["backend"] = controller.backend
        record["probes"].append(entry)
        return reduced

    controller.reduce = reduce
    for step in range(STEPS):
        batch = token_batch(batch=2, length=12, seed=10 * step + rank)  # each rank its own rows
        seen.clear()
        model(**batch).loss.backward()
        record.setdefault("train_dtypes", list(seen))
        seen.clear()
        record["steps"].append(controller.step(batch).scalars())
        optimizer.zero_grad()
    # a direct measurement: the shards and the all-gather dtype are restored exactly
    batch = token_batch(batch=2, length=12, seed=99 + rank)
    direction = {n: torch.ones_like(p) for n, p in zip(controller.names, controller.params, strict=True)}
    before = [p.to_local().clone() for p in controller.params]
    controller.probe.measure(batch, direction)
    record["restored"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, controller.params, strict=True))
    record["param_dtypes_after"] = sorted({
        str(p.param_dtype) for m in model.modules() if hasattr(m, "_get_fsdp_state")
        for g in compat.fsdp_param_groups(m) for p in g.fsdp_params
    })
    seen.clear()
    model(**batch).loss.backward()
    record["train_dtypes_after"] = list(seen)
    record["final"] = {n: full(p, p) for n, p in model.named_parameters()}
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
