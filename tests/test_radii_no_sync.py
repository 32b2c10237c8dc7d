"""hf_ghosts.radii makes no host sync on the training path; a NaN or inf reaches the caller, which still reports it.

The radii no longer check their inputs (a check is a host sync, once per attention layer per probe): NaN or inf
slopes give a NaN radius on the device, and the caller checks the one scalar it reads
(:func:`hf_ghosts.radii.check_radius`). The controller, the CLI and the rank reduction are checked here.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from hf_ghosts import RadiusProbe, RadiusReport, RhoController, all_reduce_report, radii
from hf_ghosts.cli.diagnose import Checkpoint, diagnose
from hf_ghosts.cli.errors import CliError
from tests.helpers import randn64, tiny_causal_lm, token_batch

pytestmark = pytest.mark.usefixtures("single_thread")

HOST_SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")
SLOPES = randn64(2, 3, 6, 8, seed=0).float()
SLOPES[0, 1, 2, 3] = math.nan
KEYS = torch.rand(2, 1, 6, 8, generator=torch.Generator().manual_seed(1)) > 0.3
UPDATE = [randn64(5, 4, seed=2).float(), randn64(9, seed=3).float()]

# Every radii function a training step runs (probe, reduction, controller), on inputs holding a NaN.
TRAINING_PATH: dict[str, Callable[[], object]] = {
    "spread": lambda: radii.spread(SLOPES),
    "spread masked": lambda: radii.spread(SLOPES, KEYS),
    "rho_bound": lambda: radii.rho_bound(radii.spread(SLOPES, KEYS)),
    "normalized_step": lambda: radii.normalized_step(radii.update_norm(UPDATE), torch.tensor([0.5, math.nan, 0.0])),
    "normalized_step floats": lambda: radii.normalized_step(3.0, math.nan),
    "clip_scale clip": lambda: radii.clip_scale(radii.update_norm(UPDATE), torch.tensor([0.5, math.nan]), 0.8),
    "clip_scale set": lambda: radii.clip_scale(2.0, math.inf, 1.5, mode="set"),
    "update_norm": lambda: radii.update_norm(UPDATE),
    "spread_bound": lambda: radii.spread_bound(torch.tensor([0.5, 1.0]), SLOPES[0, 0, :2]),
    "block_allocation": lambda: radii.block_allocation(SLOPES[0, 0, 0], SLOPES[0, 1, 0].abs(), radii.update_norm(UPDATE)),
    "binary_radius": lambda: radii.binary_radius(SLOPES[..., 0], SLOPES[..., 1]),
    "top2_radius": lambda: radii.top2_radius(SLOPES.flip(-1), SLOPES),
    **{
        f"activation_radius {name}": lambda name=name: radii.activation_radius(SLOPES, SLOPES.flip(-1), name)
        for name in ("relu", "silu", "tanh", "gelu_new", "gelu")
    },
}


def host_syncs(run: Callable[[], object]) -> list[str]:
    """The ops ``run`` dispatches that read a tensor's value on the host."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return [event.name for event in prof.events() if event.name in HOST_SYNCS]


@pytest.mark.parametrize("name", sorted(TRAINING_PATH))
def test_training_path_makes_no_host_sync(name: str) -> None:
    assert host_syncs(TRAINING_PATH[name]) == []


def test_the_sync_detector_sees_item_and_bool() -> None:
    assert host_syncs(lambda: SLOPES.sum().item()) == ["aten::item", "aten::_local_scalar_dense"]
    assert "aten::is_nonzero" in host_syncs(lambda: bool(torch.isfinite(SLOPES).all()))


# ----------------------------------------------------------------------------- the callers
class NanTangent(torch.autograd.Function):
    """The identity, whose forward-mode derivative is NaN: finite weights, loss and gradient, NaN slopes."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return torch.full_like(tangent, math.nan)


class NanSlopeClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NanTangent.apply(self.body(x))


def test_probe_report_holds_the_nan() -> None:
    model = NanSlopeClassifier()
    direction = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    batch = {"x": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 3])}
    report = RadiusProbe(model, radii=("output",), estimator="jvp").measure(batch, direction)
    assert math.isnan(report.out_spread.item()) and math.isnan(report.rho.item())


@pytest.mark.parametrize("mode", ["clip", "monitor"])
def test_controller_skips_a_step_whose_radius_is_nan(mode: str) -> None:
    """The controller reads one scalar per probed step; a NaN limiting radius (NaN slopes) skips the step like a NaN
    gradient: ``clip`` puts the old weights back (``skipped="radius"``), ``monitor`` lets AdamW's step stand."""
    model = NanSlopeClassifier()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    controller = RhoController(model, optimizer, radii=("output",), mode=mode, estimator="jvp")
    batch = {"x": torch.randn(16, 8, generator=torch.Generator().manual_seed(4)), "labels": torch.arange(16) % 5}
    old = {name: p.detach().clone() for name, p in model.named_parameters()}
    for net in (model, twin):
        F.cross_entropy(net(batch["x"]), batch["labels"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    record = controller.step(batch)
    plain = torch.optim.AdamW(twin.parameters(), lr=0.1)
    plain.step()
    expected = old if mode == "clip" else dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name].detach(), rtol=0, atol=0)
    assert (record.skipped, record.would_skip) == (("radius", None) if mode == "clip" else (None, "radius"))
    assert controller.pop_metrics()["ghosts/" + ("skipped_nonfinite" if mode == "clip" else "would_skip")] == 1.0


def test_diagnose_still_reports_a_nan_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf-ghosts diagnose``: a NaN radius with finite weights is the CliError a raising probe gave."""
    nan_report = RadiusReport(out_spread=torch.tensor(math.nan), output_tokens=torch.tensor(22))
    monkeypatch.setattr(RadiusProbe, "measure", lambda self, inputs, direction, **kwargs: nan_report)
    model = tiny_causal_lm("gpt_neox")
    batch = token_batch()
    batch["labels"] = batch["input_ids"].clone()
    checkpoint = Checkpoint(source="tiny", model=model, tokenizer=None)
    with pytest.raises(CliError, match=r"the probe failed on batch 0: RadiusProbe.measure: the measured radius is nan"):
        diagnose(checkpoint, [batch], radii_names=("output",), learning_rate=1e-3)


def _reduce_with_a_nan(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    found = []
    for nan_rank in (0, 1):  # the NaN on either side of the MAX
        nan = math.nan if rank == nan_rank else 0.0
        report = RadiusReport(
            out_spread=torch.tensor(2.0 + rank + nan), attn_spread=torch.tensor([[1.0 + rank, 3.0 - rank + nan]]),
            ffn_radius=torch.tensor(5.0 - rank), out_radius=torch.tensor(4.0 + rank + nan), output_tokens=torch.tensor(3),
        )
        reduced = all_reduce_report(report)
        found.append([reduced.out_spread.item(), *reduced.attn_spread.flatten().tolist(), reduced.ffn_radius.item(),
                      reduced.out_radius.item(), reduced.output_tokens.item()])
    torch.save(found, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank_reduction_keeps_a_nan_whichever_rank_holds_it(tmp_path) -> None:
    torch.multiprocessing.spawn(_reduce_with_a_nan, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected = [math.nan, 2.0, math.nan, 4.0, math.nan, 6]  # MAX of spreads, MIN of radii, SUM of counts
    for rank in (0, 1):
        for values in torch.load(tmp_path / f"rank{rank}.pt"):
            assert [str(v) for v in values] == [str(float(v)) if isinstance(v, float) else str(v) for v in expected]
