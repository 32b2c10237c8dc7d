"""RhoTrainer on 2 real processes (gloo, CPU): records what every rank measured and applied.

Launched by tests/test_distributed.py with the shipped accelerate configs, from the repository root and with it on
``PYTHONPATH`` (for ``tests.helpers``)::

    PYTHONPATH=. accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 2 \
        --mixed_precision no tests/distributed_scripts/rho_ranks.py --suite ddp --out DIR
    PYTHONPATH=. accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
        tests/distributed_scripts/rho_ranks.py --suite fsdp --out DIR

Each run writes ``DIR/<run>/rank<r>.pt``: the world size, per-step controller records, the
report of every probe before and after the cross-process reduction, the first probe's batch,
old weights and direction (gathered to full tensors), and the final full weights.

On CPU, Accelerate 1.15 silently ignores FSDP (``AcceleratorState`` enables it only for GPU-like
distributed types and falls back to DDP), so the ``fsdp`` suite switches the state to FSDP after
the Accelerator is built (:class:`CpuFsdp`). Everything after that is Accelerate's and torch's
real FSDP2 path: ``fully_shard`` on the model, DTensor parameters, sharded AdamW.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_ghosts import RhoCallback, RhoController, RhoTrainer, RhoTrainingArguments, all_reduce_report, compat
from tests.helpers import tiny_causal_lm, token_batch

STEPS = 4
ROWS = 32
# clipped every step block by block, by fd (the sharded probe's estimator), Adam's first moment scaled per element;
# on GPT-2, whose fused c_attn splits q | k | v along the columns: FSDP2's dim-0 shards hold all the weight's columns
# and different halves of the bias (rank 0: q and half of k; rank 1: the rest of k and v)
BLOCKS_FD = dict(rho_mode="clip", rho_radii=["output", "attention"], rho_granularity="blocks", rho_estimator="fd",
                 rho_rescale_moments=True)


class Rows(torch.utils.data.Dataset):
    """``ROWS`` random token rows of length 12 (no padding: every rank's batch has the same token count)."""

    def __init__(self) -> None:
        batch = token_batch(batch=ROWS, length=12, seed=5)
        self.rows = [{key: value[i] for key, value in batch.items()} for i in range(ROWS)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


class CpuFsdp:
    """Mixin: turn on Accelerate's FSDP plugin on CPU, where ``AcceleratorState`` would silently run DDP instead."""

    fsdp_overrides: ClassVar[dict[str, Any]] = {}

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.is_fsdp_enabled or os.environ.get("ACCELERATE_USE_FSDP", "false") != "true":
            return
        assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.fsdp_overrides)  # the rest from the launch config
        self.is_fsdp_enabled = True


class CpuFsdpRhoTrainer(CpuFsdp, RhoTrainer):
    pass


class CpuFsdpTrainer(CpuFsdp, Trainer):
    pass


def full(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full tensor whose local piece on this rank is ``local`` (collective under FSDP2)."""
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()).full_tensor()
    return local.detach().clone()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p.to_local() if isinstance(p, DTensor) else p, p) for name, p in model.named_parameters()}


def report_fields(report: Any) -> dict[str, Any]:
    return {
        key: None if value is None else value.detach().clone()
        for key, value in (
            ("out_spread", report.out_spread),
            ("attn_spread", report.attn_spread),
            ("ffn_radius", report.ffn_radius),
            ("output_tokens", report.output_tokens),
            ("attention_tokens", report.attention_tokens),
        )
    }


class Recorder(TrainerCallback):
    """Per optimizer step: the controller's record; per probe: the local and the reduced report."""

    def __init__(self, controller: RhoController, reduce: bool) -> None:
        self.controller = controller
        self.steps: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        controller.reduce = self.reduce if reduce else self.keep_local

    def keep_local(self, report: Any) -> Any:  # the bug the tests must catch: no cross-process reduction
        return self.record(report, report)

    def reduce(self, report: Any) -> Any:
        return self.record(report, all_reduce_report(report))

    def record(self, local: Any, reduced: Any) -> Any:
        entry = {"local": report_fields(local), "reduced": report_fields(reduced)}
        if not self.probes:
            controller = self.controller
            entry["batch"] = {key: value.detach().clone() for key, value in controller.batch.items() if torch.is_tensor(value)}
            old = {name: full(t, p) for name, t, p in zip(controller.names, controller._old, controller.params, strict=True)}
            new = {name: full(local_piece, p) for name, local_piece, p in zip(controller.names, controller._shards(), controller.params, strict=True)}
            entry["old"] = old
            entry["direction"] = {name: new[name] - old[name] for name in old}
            entry["shards"] = {
                name: (tuple(p.shape), tuple(p.to_local().shape) if isinstance(p, DTensor) else None)
                for name, p in zip(controller.names, controller.params, strict=True)
            }
            entry["backend"] = controller.backend
            entry["probe"] = type(controller.probe).__name__
            entry["estimator"] = controller.probe.estimator
            entry["param_dtypes"] = sorted({  # FSDP2's all-gather dtype after the probe: the policy's, restored
                str(p.param_dtype) for m in controller.model.modules() if hasattr(m, "_get_fsdp_state")
                for g in compat.fsdp_param_groups(m) for p in g.fsdp_params
            })
        self.probes.append(entry)
        return reduced

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        last = self.controller.last
        self.steps.append(last.scalars())


class CallbackRecorder(TrainerCallback):
    """Per optimizer step: the record of a :class:`RhoCallback`'s controller (built at train begin)."""

    def __init__(self, callback: RhoCallback) -> None:
        self.callback = callback
        self.steps: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        last = self.callback.controller.last
        self.steps.append(last.scalars())
        if not self.probes:
            self.probes.append({"backend": self.callback.controller.backend})


def run(
    name: str, out: Path, *, trainer_cls: type = RhoTrainer, reduce: bool = True, callback: bool = False,
    family: str = "gpt_neox", **rho: Any,
) -> None:
    model = tiny_causal_lm(family)
    args = TrainingArguments(
        output_dir=str(out / name),
        per_device_train_batch_size=2,  # x 2 ranks = 4 rows of 12 tokens per optimizer step
        max_steps=STEPS,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    if trainer_cls in (RhoTrainer, CpuFsdpRhoTrainer):
        defaults = dict(rho_mode="set", rho_target=0.5, rho_radii=["output", "attention", "ffn"], rho_estimator="jvp")
        args = RhoTrainingArguments.from_training_arguments(args, **{**defaults, **rho})
    trainer = trainer_cls(model=model, args=args, train_dataset=Rows())
    recorder = None
    if hasattr(trainer, "rho_controller"):
        recorder = Recorder(trainer.rho_controller, reduce)
        trainer.add_callback(recorder)
    if callback:
        recorder = CallbackRecorder(RhoCallback.install(trainer, radii=("output", "attention", "ffn")))
        trainer.add_callback(recorder)
    trainer.train()
    record = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "fsdp": trainer.is_fsdp_enabled,
        "steps": [] if recorder is None else recorder.steps,
        "probes": [] if recorder is None else recorder.probes,
        "final": full_weights(trainer.model),
        "log_history": trainer.state.log_history,
    }
    (out / name).mkdir(parents=True, exist_ok=True)
    torch.save(record, out / name / f"rank{dist.get_rank()}.pt")
    dist.barrier()


def refusal(out: Path, name: str, build: Callable[[], object]) -> None:
    """Save on rank 0, under ``out/name``, the ValueError ``build()`` raised (``None``: it raised none)."""
    try:
        build()
        message = None
    except ValueError as error:
        message = str(error)
    if dist.get_rank() == 0:
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save({"error": message}, out / name / "rank0.pt")


def fsdp1_refused(out: Path) -> None:
    """A torch FSDP1 model: the controller must refuse it (FSDP1 would probe stale root weights)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(tiny_causal_lm("gpt_neox"), use_orig_params=True, device_id=torch.device("cpu"))
    refusal(out, "fsdp1", lambda: RhoController(model, torch.optim.AdamW(model.parameters())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    out = options.out
    if options.suite == "ddp":
        run("ddp_jvp", out)
        run("ddp_noreduce", out, reduce=False)
        run("ddp_fd", out, rho_estimator="fd")
        # clipped every step, block by block (the fused query_key_value split into q/k and v)
        run("ddp_blocks", out, rho_mode="clip", rho_radii=["output", "attention"], rho_granularity="blocks")
        run("ddp_blocks_fd", out, family="gpt2", **BLOCKS_FD)  # the reference of fsdp2_blocks
    else:
        run("fsdp2", out, trainer_cls=CpuFsdpRhoTrainer)  # asks for jvp: the sharded probe uses fd
        CpuFsdp.fsdp_overrides = {"reshard_after_forward": False}
        run("fsdp2_keep_unsharded", out, trainer_cls=CpuFsdpRhoTrainer)
        CpuFsdp.fsdp_overrides = {"mixed_precision_policy": "bf16"}  # what `mixed_precision: bf16` sets for FSDP2
        run("fsdp2_bf16", out, trainer_cls=CpuFsdpRhoTrainer, rho_estimator="fd")
        CpuFsdp.fsdp_overrides = {}
        run("fsdp2_noreduce", out, trainer_cls=CpuFsdpRhoTrainer, reduce=False)
        run("fsdp2_monitor", out, trainer_cls=CpuFsdpRhoTrainer, rho_mode="monitor")
        run("fsdp2_plain", out, trainer_cls=CpuFsdpTrainer)
        run("fsdp2_callback", out, trainer_cls=CpuFsdpTrainer, callback=True)  # RhoCallback on plain Trainer
        fsdp1_refused(out)
        run("fsdp2_blocks", out, trainer_cls=CpuFsdpRhoTrainer, family="gpt2", **BLOCKS_FD)
        CpuFsdp.fsdp_overrides = {"mixed_precision_policy": "bf16"}  # training all-gathers bf16, the probe fp32
        run("fsdp2_blocks_bf16", out, trainer_cls=CpuFsdpRhoTrainer, family="gpt2", **BLOCKS_FD)
        CpuFsdp.fsdp_overrides = {}
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
