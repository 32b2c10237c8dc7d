"""Rank-consistent radii on 2 real processes (gloo, CPU): DDP and FSDP2 through RhoTrainer.

Two launches of tests/distributed_scripts/rho_ranks.py with the shipped accelerate configs
(about 40 s each on 2 CPU cores, mostly imports). The script records, on every rank, each step's
rho and scale, each probe's report before and after the cross-process reduction, the first
probe's batch, old weights and direction, and the final weights.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_ghosts.distributed import (
    any_rank,
    check_fsdp_plugin,
    detect_backend,
    full_norm,
    global_norm,
    local_offset,
    shard_sum,
)
from hf_ghosts.probe import RadiusProbe, RadiusReport
from hf_ghosts.radii import update_norm
from tests.helpers import tiny_causal_lm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed_scripts" / "rho_ranks.py"
CONFIGS = REPO / "recipes" / "accelerate"
STEPS = 4  # rho_ranks.STEPS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, suite: str, out: Path, *extra: str) -> dict[str, list[dict]]:
    """``accelerate launch --config_file <config> --num_processes 2 rho_ranks.py``; ``{run: [rank0, rank1]}``."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *extra,
        str(SCRIPT), "--suite", suite, "--out", str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),  # the root: tests.helpers
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    runs = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and (p / "rank0.pt").exists()):
        files = sorted(folder.glob("rank*.pt"))
        runs[folder.name] = [torch.load(f, weights_only=False) for f in files]
    return runs


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    return launch("multi_gpu.yaml", "ddp", tmp_path_factory.mktemp("ddp"), "--mixed_precision", "no")


@pytest.fixture(scope="module")
def fsdp_mixed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """``fsdp_mixed_loop.py`` on 2 processes (torchrun, gloo): RhoController, fully_shard with bf16 param_dtype."""
    out = tmp_path_factory.mktemp("fsdp_mixed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "distributed_scripts" / "fsdp_mixed_loop.py"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),  # tests.helpers
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    return launch("fsdp.yaml", "fsdp", tmp_path_factory.mktemp("fsdp"))


def union_probe(probe_record: dict, other: dict, estimator: str, radii=("output", "attention")) -> RadiusReport:
    """One process, fp32, unsharded: one batch = both ranks' batches, same old weights and direction."""
    model = tiny_causal_lm("gpt_neox")
    batch = {key: torch.cat([probe_record["batch"][key], other["batch"][key]]) for key in probe_record["batch"]}
    probe = RadiusProbe(model, radii=radii, estimator=estimator)
    return probe.measure(batch, probe_record["direction"], params=probe_record["old"])


def expected_rho(fields: dict) -> float:
    report = RadiusReport(out_spread=fields["out_spread"], attn_spread=fields["attn_spread"], ffn_radius=fields["ffn_radius"])
    return float(report.rho)


def assert_ranks_agree(ranks: list[dict]) -> None:
    first, second = ranks
    assert len(first["steps"]) == len(second["steps"]) == STEPS
    for a, b in zip(first["steps"], second["steps"], strict=True):
        assert a["rho"] == b["rho"] and a["scale"] == b["scale"] and a["update_norm"] == b["update_norm"], (a, b)
    for name, value in first["final"].items():
        assert torch.equal(value, second["final"][name]), name


def assert_reduction_is_max(ranks: list[dict]) -> None:
    """Every probe's reduced report is the MAX of the ranks' spreads, MIN of their FFN radii, SUM of tokens."""
    for step, (a, b) in enumerate(zip(ranks[0]["probes"], ranks[1]["probes"], strict=True)):
        local_a, local_b = a["local"], b["local"]
        assert not torch.equal(local_a["out_spread"], local_b["out_spread"]), "ranks saw the same batch: vacuous test"
        for reduced in (a["reduced"], b["reduced"]):
            assert torch.equal(reduced["out_spread"], torch.maximum(local_a["out_spread"], local_b["out_spread"]))
            assert torch.equal(reduced["attn_spread"], torch.maximum(local_a["attn_spread"], local_b["attn_spread"]))
            assert torch.equal(reduced["ffn_radius"], torch.minimum(local_a["ffn_radius"], local_b["ffn_radius"]))
            assert int(reduced["output_tokens"]) == int(local_a["output_tokens"]) + int(local_b["output_tokens"])
            assert int(reduced["attention_tokens"]) == int(local_a["attention_tokens"]) + int(local_b["attention_tokens"]) > 0
        assert ranks[0]["steps"][step]["rho"] == pytest.approx(expected_rho(a["reduced"]), rel=1e-6)


# ----------------------------------------------------------------------------------------- DDP
@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_runs_two_real_processes(ddp):
    assert set(ddp) == {"ddp_jvp", "ddp_noreduce", "ddp_fd", "ddp_blocks", "ddp_blocks_fd"}
    for ranks in ddp.values():
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
        assert not ranks[0]["fsdp"] and ranks[0]["probes"][0]["backend"] == "ddp"
        assert not torch.equal(ranks[0]["probes"][0]["batch"]["input_ids"], ranks[1]["probes"][0]["batch"]["input_ids"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp_jvp", "ddp_fd"])
def test_ddp_same_rho_scale_and_weights_on_every_rank(ddp, run):
    ranks = ddp[run]
    assert all(step["scale"] < 1.0 for step in ranks[0]["steps"])  # "set" mode: the scale really acted
    assert_ranks_agree(ranks)
    assert_reduction_is_max(ranks)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("run", "estimator", "rtol"), [("ddp_jvp", "jvp", 1e-5), ("ddp_fd", "fd", 1e-4)])
def test_ddp_rho_equals_the_union_batch_probe(ddp, run, estimator, rtol):
    first, second = (ranks["probes"][0] for ranks in ddp[run])
    union = union_probe(first, second, estimator)
    torch.testing.assert_close(union.out_spread, first["reduced"]["out_spread"], rtol=rtol, atol=0)
    torch.testing.assert_close(union.attn_spread, first["reduced"]["attn_spread"], rtol=rtol, atol=1e-7)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_without_the_reduction_ranks_diverge(ddp):
    first, second = ddp["ddp_noreduce"]
    assert first["steps"][0]["rho"] != second["steps"][0]["rho"]
    assert first["steps"][0]["rho"] == pytest.approx(expected_rho(first["probes"][0]["local"]), rel=1e-6)
    assert any(not torch.equal(value, second["final"][name]) for name, value in first["final"].items())
    with pytest.raises(AssertionError):
        assert_ranks_agree([first, second])


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_block_steps_are_rank_identical(ddp):
    """Every step clipped block-wise (the block reports and the applied step's reduced like the step's own): the same
    records, block scales included, and the same weights on both ranks."""
    ranks = ddp["ddp_blocks"]
    steps = ranks[0]["steps"]
    assert all(step["clipped"] and step.get("block_probes") for step in steps), steps
    for step in steps:  # not one scale for all: the blocks were scaled one by one
        assert len({value for key, value in step.items() if key.startswith("block_scale/")}) >= 3, step
    assert_ranks_agree(ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert all(step["r_applied"] <= 0.5 * (1 + 1e-6) for step in steps)
    assert len(ranks[0]["probes"]) == len(ranks[1]["probes"]) > STEPS  # the blocks' reports went through reduce too


# ----------------------------------------------------------------------------------------- FSDP2
@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_really_shards_and_uses_the_sharded_fd_probe(fsdp):
    assert {"fsdp2", "fsdp2_keep_unsharded", "fsdp2_bf16", "fsdp2_noreduce", "fsdp2_monitor", "fsdp2_plain", "fsdp2_callback"} <= set(fsdp)
    ranks = fsdp["fsdp2"]
    assert all(r["world_size"] == 2 and r["fsdp"] for r in ranks)
    probe = ranks[0]["probes"][0]
    assert (probe["backend"], probe["probe"], probe["estimator"]) == ("fsdp2", "ShardedRadiusProbe", "fd")
    full_shape, local_shape = probe["shards"]["gpt_neox.embed_in.weight"]
    assert local_shape == (full_shape[0] // 2, full_shape[1])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("run", ["fsdp2", "fsdp2_keep_unsharded"])
def test_fsdp2_rank_consistent_and_equal_to_ddp(fsdp, ddp, run):
    ranks = fsdp[run]
    assert_ranks_agree(ranks)
    assert_reduction_is_max(ranks)
    union = union_probe(ranks[0]["probes"][0], ranks[1]["probes"][0], "fd")
    torch.testing.assert_close(union.out_spread, ranks[0]["probes"][0]["reduced"]["out_spread"], rtol=1e-4, atol=0)
    torch.testing.assert_close(union.attn_spread, ranks[0]["probes"][0]["reduced"]["attn_spread"], rtol=1e-4, atol=1e-7)
    # Same data, same fd estimator: FSDP2 (sharded norm, in-place probe, shard-local rescale) matches DDP.
    reference = ddp["ddp_fd"][0]
    for got, want in zip(ranks[0]["steps"], reference["steps"], strict=True):
        assert got["rho"] == pytest.approx(want["rho"], rel=1e-4)
        assert got["scale"] == pytest.approx(want["scale"], rel=1e-4)
        assert got["update_norm"] == pytest.approx(want["update_norm"], rel=1e-5)
    for name, value in ranks[0]["final"].items():
        torch.testing.assert_close(value, reference["final"][name], rtol=0, atol=2e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_without_the_reduction_ranks_disagree(fsdp):
    first, second = fsdp["fsdp2_noreduce"]
    assert first["steps"][0]["rho"] != second["steps"][0]["rho"]
    assert first["steps"][0]["scale"] != second["steps"][0]["scale"]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_probe_restores_the_shards_exactly(fsdp):
    monitored, plain = fsdp["fsdp2_monitor"][0], fsdp["fsdp2_plain"][0]
    assert all(step["scale"] == 1.0 and math.isfinite(step["rho"]) for step in monitored["steps"])
    for name, value in plain["final"].items():
        assert torch.equal(monitored["final"][name], value), name


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_rho_callback_only_watches(fsdp):
    watched, plain, monitor = fsdp["fsdp2_callback"][0], fsdp["fsdp2_plain"][0], fsdp["fsdp2_monitor"][0]
    assert watched["probes"][0]["backend"] == "fsdp2"
    for got, want in zip(watched["steps"], monitor["steps"], strict=True):
        assert got["rho"] == want["rho"] and got["scale"] == 1.0
    for name, value in plain["final"].items():
        assert torch.equal(watched["final"][name], value), name


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_bf16_loop_probes_in_fp32_and_matches_the_unsharded_probe(fsdp_mixed):
    """Plain loop, fully_shard(MixedPrecisionPolicy(param_dtype=bf16)): training all-gathers bf16, the probe fp32;
    rho equals the fp32 unsharded probe's on the union batch (fd tolerance), the ranks agree, the clip holds."""
    first, second = fsdp_mixed
    assert first["train_dtypes"] == [torch.bfloat16]  # the policy really acts in training
    probe = first["probes"][0]
    assert (probe["backend"], probe["estimator"], probe["dtype"]) == ("fsdp2", "fd", torch.float32)
    assert probe["probe_dtypes"] == [torch.float32] * 4  # every fd forward (at h and h / 2: its step check) gathered fp32
    union = union_probe(probe, second["probes"][0], "fd", radii=("output", "attention"))
    torch.testing.assert_close(union.out_spread, probe["reduced"]["out_spread"], rtol=1e-4, atol=0)
    torch.testing.assert_close(union.attn_spread, probe["reduced"]["attn_spread"], rtol=1e-4, atol=1e-7)
    for a, b in zip(first["steps"], second["steps"], strict=True):
        assert a == b and a["r_applied"] == pytest.approx(0.5) and a["scale"] < 1  # "set" at r* = 0.5 acted
    for name, value in first["final"].items():
        assert torch.equal(value, second["final"][name]), name


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_bf16_probe_restores_shards_and_the_policy(fsdp_mixed):
    for rank in fsdp_mixed:
        assert rank["restored"]  # the local shards bit for bit after a measurement
        assert rank["param_dtypes_after"] == ["torch.bfloat16"]
        assert rank["train_dtypes_after"] == [torch.bfloat16]  # the next training forward all-gathers bf16 again


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_bf16_through_rho_trainer(fsdp):
    """Accelerate's FSDP2 with mixed precision bf16 (param, reduce and output dtype): RhoTrainer serves it."""
    ranks = fsdp["fsdp2_bf16"]
    probe = ranks[0]["probes"][0]
    assert (probe["backend"], probe["estimator"], probe["param_dtypes"]) == ("fsdp2", "fd", ["torch.bfloat16"])
    assert_ranks_agree(ranks)
    assert_reduction_is_max(ranks)
    union = union_probe(probe, ranks[1]["probes"][0], "fd")
    torch.testing.assert_close(union.out_spread, probe["reduced"]["out_spread"], rtol=1e-4, atol=0)
    torch.testing.assert_close(union.attn_spread, probe["reduced"]["attn_spread"], rtol=1e-4, atol=1e-7)
    assert all(step["r_applied"] == pytest.approx(0.5) for step in ranks[0]["steps"])


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp1_is_refused(fsdp):
    error = fsdp["fsdp1"][0]["error"]
    assert error is not None and "FSDP2 only" in error


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_block_steps_are_rank_identical_and_equal_to_ddp(fsdp, ddp):
    """Block-wise clip under FSDP2 (fd, the first moment scaled per element): every step clipped block by block, the
    same records and weights on both ranks, and the same steps as DDP's block-wise fd run (GPT-2): the blocks' sums and
    norms over the shards, the fused c_attn's slices of each rank's piece, the moments' local pieces."""
    ranks, reference = fsdp["fsdp2_blocks"], ddp["ddp_blocks_fd"][0]
    full_shape, local_shape = ranks[0]["probes"][0]["shards"]["transformer.h.0.attn.c_attn.bias"]
    assert local_shape == (full_shape[0] // 2,)  # the fused q | k | v bias is split across the ranks: rank 0 q and k
    steps = ranks[0]["steps"]
    assert all(step["clipped"] and step.get("block_probes") for step in steps), steps
    assert_ranks_agree(ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert all(step["r_applied"] <= 0.5 * (1 + 1e-6) for step in steps)
    for got, want in zip(steps, reference["steps"], strict=True):
        assert got.keys() == want.keys()
        for key in ("rho", "scale", "r_applied", "update_norm", *(k for k in want if k.startswith("block_scale/"))):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), key
    for name, value in ranks[0]["final"].items():
        torch.testing.assert_close(value, reference["final"][name], rtol=0, atol=2e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_bf16_block_steps_are_rank_identical_and_certified(fsdp):
    """Block-wise clip under FSDP2 with a bf16 policy (training all-gathers bf16, every block measurement fp32): every
    step clipped block by block, the same records and weights on both ranks, r <= r* as measured, the policy restored."""
    ranks = fsdp["fsdp2_blocks_bf16"]
    steps = ranks[0]["steps"]
    assert ranks[0]["probes"][0]["param_dtypes"] == ["torch.bfloat16"]
    assert all(step["clipped"] and step.get("block_probes") for step in steps), steps
    assert_ranks_agree(ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert all(step["r_applied"] <= 0.5 * (1 + 1e-6) for step in steps)


# ----------------------------------------------------------------------------------------- one process
def test_check_fsdp_plugin_refuses_fsdp1_and_serves_16_bit_params():
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(ValueError, match="FSDP2 only"):
        check_fsdp_plugin(SimpleNamespace(fsdp_version=1, mixed_precision_policy=None))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    check_fsdp_plugin(plugin)
    plugin.set_mixed_precision("bf16")  # the probe all-gathers in fp32 (compat.fsdp_full_precision)
    check_fsdp_plugin(plugin)


def test_single_process_helpers():
    model = tiny_causal_lm("gpt_neox")
    assert detect_backend(model) == "single"
    assert any_rank(True) and not any_rank(False)
    pieces = [torch.full((3,), 2.0), torch.full((2, 2), -1.0)]
    assert float(global_norm(pieces, pieces)) == pytest.approx(math.sqrt(4 * 3 + 4))
    calls = []

    def sum_of(indices: list[int]) -> torch.Tensor:
        calls.append(list(indices))
        return torch.stack([pieces[i].sum() for i in indices])

    # plain tensors are replicas: one call over every parameter, no reduction
    assert torch.equal(shard_sum(sum_of, pieces), torch.tensor([6.0, -4.0], dtype=torch.float64)) and calls == [[0, 1]]
    assert local_offset(pieces[1]) == (0, 0)
    assert torch.equal(full_norm(pieces, pieces), update_norm(pieces))
