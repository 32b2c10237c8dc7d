"""``granularity="blocks"``: the block-wise clip, checked against independent references.

The certificate is re-measured by float64 central differences of a float64 copy (``reference_output_spreads``,
``reference_attention_spreads``: no ``RadiusProbe``), the update ``u`` AdamW proposed comes from a plain AdamW replayed
in lockstep (``AdamWReplay``), and unclipped steps are compared bit for bit with ``granularity="global"``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_ghosts import RadiusProbe, RhoCallback, RhoController, RhoSettings, RhoTrainingArguments
from hf_ghosts.architectures import parameter_block
from hf_ghosts.probe.blocks import block_estimate, block_spreads, instance_spreads
from tests.helpers import tiny_causal_lm, token_batch
from tests.references import (
    AdamWReplay,
    causal_output_positions,
    float64_copy,
    reference_attention_spreads,
    reference_output_spreads,
)

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 6
R_TARGET = 2.0  # clip's default


def reference_r(model: torch.nn.Module, at: dict[str, torch.Tensor], step: dict[str, torch.Tensor], batch) -> float:
    """``r = |d| max_j Delta_j(d / |d|) / pi`` of the step ``d`` at the weights ``at``: output (predicting positions) and
    attention (every layer and head) spreads by float64 central differences of a float64 copy."""
    model64 = float64_copy(model)
    with torch.no_grad():
        for name, p in model64.named_parameters():
            p.copy_(at[name])
    output = reference_output_spreads(model64, batch, step)[causal_output_positions(batch["labels"])].max()
    attention = reference_attention_spreads(model64, batch, step).max()
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in step.values()))
    return norm * float(torch.maximum(output, attention)) / math.pi


def train(granularity: str | None, lr: float, steps: int = STEPS, family: str = "llama", **settings) -> list[dict]:
    """A plain loop of ``steps`` AdamW steps under a controller; per step its record, the old and new weights, the
    batch and the ``u`` a lockstep AdamW replay proposed."""
    model = tiny_causal_lm(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    replay = AdamWReplay(model, optimizer)
    controller = RhoController(model, optimizer, granularity=granularity, **{"estimator": "jvp", "every": 1, **settings})
    rows = []
    for step in range(steps):
        batch = token_batch(batch=4, length=12, seed=10 + step)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        old = {name: p.detach().clone() for name, p in model.named_parameters()}
        u = replay.propose()
        record = controller.step(batch)
        new = {name: p.detach().clone() for name, p in model.named_parameters()}
        rows.append({"record": record, "old": old, "new": new, "u": u, "batch": batch, "model": model})
    rows[-1]["controller"] = controller
    return rows


@pytest.fixture(scope="module")
def clipped_runs() -> dict[str, list[dict]]:
    """llama at lr 0.1 (every step clipped), block-wise (jvp and fd) and global."""
    return {name: train(granularity, 0.1, estimator=estimator)
            for name, granularity, estimator in (("blocks", "blocks", "jvp"), ("blocks fd", "blocks", "fd"),
                                                 ("global", "global", "jvp"))}


@pytest.mark.parametrize(("run", "tolerance"), [("blocks", 1e-3), ("blocks fd", 1e-2)])
def test_the_applied_step_is_certified(clipped_runs, run: str, tolerance: float) -> None:
    """Every block-wise step, re-measured along the update actually applied, has ``r <= r*``; where the scale-up
    reached the target it sits at ``r*`` (the reference measures what the controller measured)."""
    rows = clipped_runs[run]
    assert all(row["record"].block_probes for row in rows), "every step is meant to be clipped block-wise"
    at_target = 0
    for row in rows:
        applied = {name: row["new"][name].double() - row["old"][name].double() for name in row["old"]}
        r = reference_r(row["model"], row["old"], applied, row["batch"])
        assert r <= R_TARGET * (1 + tolerance), (row["record"].step, r)
        assert r == pytest.approx(row["record"].r_applied, rel=tolerance)
        at_target += row["record"].r_applied == pytest.approx(R_TARGET, rel=1e-9)
    assert at_target >= 2, "no step was scaled up to the target: the final measurement is untested"


def test_blocks_keep_more_of_the_step_and_scale_each_block_as_recorded(clipped_runs) -> None:
    blocks, flat = clipped_runs["blocks"], clipped_runs["global"]
    for row in blocks:
        record, model = row["record"], row["model"]
        assert set(record.block_scales) == {"embed", "qk", "vo", "mlp", "norm", "final_norm", "head"}
        assert all(0.0 <= scale <= 1.0 + 1e-12 for scale in record.block_scales.values())
        assert max(record.block_scales.values()) > 0
        u_norm = math.sqrt(sum(float(u.double().pow(2).sum()) for u in row["u"].values()))
        assert record.update_norm == pytest.approx(u_norm, rel=1e-6)
        applied = {name: row["new"][name] - row["old"][name] for name in row["u"]}
        kept = math.sqrt(sum(float(a.double().pow(2).sum()) for a in applied.values())) / u_norm
        assert record.scale == pytest.approx(kept, rel=1e-5) and record.clipped and record.scale < 1
        for name, u in row["u"].items():  # each parameter moved by its block's scale times AdamW's own update
            kind = parameter_block(name, tuple(u.shape), model)
            torch.testing.assert_close(applied[name], record.block_scales[kind] * u, rtol=1e-4, atol=1e-7)
    mean = {name: sum(row["record"].scale for row in rows) / len(rows) for name, rows in (("blocks", blocks), ("global", flat))}
    assert all(row["record"].clipped for row in flat)
    assert mean["blocks"] > 1.5 * mean["global"], mean


def test_unclipped_steps_are_bit_identical_to_the_global_clip() -> None:
    """A small rate: probed steps inside the radius and reused steps (every=16) take today's path, bit for bit."""
    runs = {granularity: train(granularity, 1e-4, estimator="auto", every=16) for granularity in ("global", "blocks")}
    records = [[row["record"] for row in rows] for rows in runs.values()]
    assert not any(record.clipped for record in records[1]) and any(not record.probed for record in records[1])
    for a, b in zip(*runs.values(), strict=True):
        assert all(torch.equal(a["new"][name], b["new"][name]) for name in a["new"])
    assert [r.scalars() for r in records[0]] == [r.scalars() for r in records[1]]
    assert runs["blocks"][-1]["controller"].pop_metrics()["ghosts/block_probes"] == 0.0


def test_reused_and_all_uphill_steps_take_the_global_scale() -> None:
    """Steps that reuse the last rho (``trigger_r`` off) are clipped globally; so is a step along which no block
    lowers the loss (here: no gradient, AdamW's momentum alone moves the weights)."""
    rows = train("blocks", 0.1, steps=3, every=3, trigger_r=math.inf, trigger_growth=math.inf)
    for row in rows[1:]:
        record = row["record"]
        assert not record.probed and record.clipped and record.block_probes is None
        for name, u in row["u"].items():
            torch.testing.assert_close(row["new"][name] - row["old"][name], record.scale * u, rtol=1e-4, atol=1e-7)
    model = tiny_causal_lm("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.0)
    controller = RhoController(model, optimizer, granularity="blocks", estimator="jvp", every=1)
    batch = token_batch(batch=4, length=12)
    model(**batch).loss.backward()
    controller.step(batch)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # g . u_b = 0 for every block
    record = controller.step(batch)
    assert record.clipped and record.block_probes is None and record.block_scales is None
    assert record.r_applied == pytest.approx(R_TARGET, rel=1e-9)


def test_moments_are_rescaled_per_block() -> None:
    model = tiny_causal_lm("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    replay = AdamWReplay(model, optimizer)
    controller = RhoController(model, optimizer, granularity="blocks", estimator="jvp", rescale_moments=True)
    batch = token_batch(batch=4, length=12)
    model(**batch).loss.backward()
    replay.propose()
    record = controller.step(batch)
    assert record.block_scales is not None
    for name, p in model.named_parameters():
        kind = parameter_block(name, tuple(p.shape), model)
        expected = replay.reference.state[replay.copies[name]]["exp_avg"] * record.block_scales[kind]
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], expected, rtol=1e-5, atol=1e-9)


def test_block_spreads_bound_the_whole_and_leave_the_fd_control_alone() -> None:
    """On a GPT-NeoX (a fused q/k/v split in two blocks): per instance, the sum of the blocks' spreads is at least the
    whole direction's; a block that does not move is not measured; fd's control is read, never changed."""
    model = tiny_causal_lm("gpt_neox")
    probe = RadiusProbe(model, ("output", "attention"), "fd")
    batch, old = token_batch(batch=2, length=10), {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    direction = {name: 0.01 * torch.randn(p.shape, generator=generator) for name, p in old.items()}
    whole = probe.measure(batch, direction, old)
    control = copy.deepcopy(probe.fd_control.state_dict())
    estimator, fd_step = block_estimate(probe)
    assert (estimator, fd_step) == ("fd", probe.fd_control.step)
    assert block_estimate(RadiusProbe(model, ("output",), "jvp")) == ("jvp", None)
    controller = RhoController(model, granularity="blocks", radii=("output", "attention"), estimator="fd")
    blocks = controller.block_step.blocks
    update = [direction[name] for name in blocks.names]
    pieces = blocks.pieces(update)
    norms = [math.sqrt(sum(float(t.pow(2).sum()) for t in piece.values())) for piece in pieces]
    norms[blocks.kinds.index("final_norm")] = 0.0  # as if it did not move
    unit, measured = block_spreads(probe, batch, pieces, norms, old, radii=("output", "attention"), estimator=estimator,
                                   fd_step=fd_step)
    assert probe.fd_control.state_dict() == control
    assert measured == [kind != "final_norm" for kind in blocks.kinds]
    assert bool((unit[blocks.kinds.index("final_norm")] == 0).all())
    total_norm = math.sqrt(sum(n * n for k, n in zip(blocks.kinds, norms, strict=True) if k != "final_norm"))
    pieces_sum = (unit * torch.tensor(norms, dtype=torch.float64)[:, None]).sum(0)
    without = {name: d for name, d in direction.items() if ".final_layer_norm." not in name}
    whole = probe.measure_with(batch, without, old, estimator="fd", fd_step=fd_step)
    assert bool((pieces_sum >= instance_spreads(whole, ("output", "attention")) * total_norm * (1 - 1e-5)).all())
    alone = probe.measure_with(batch, pieces[0], old, estimator="fd", fd_step=fd_step, norm=norms[0])
    torch.testing.assert_close(unit[0], instance_spreads(alone, ("output", "attention")))


# ----------------------------------------------------------------------------- settings and refusals
@pytest.mark.parametrize(("settings", "match"), [
    ({"granularity": "block"}, r"RhoController\.granularity: got 'block'; expected one of \['global', 'blocks'\]"),
    ({"block_refresh": 0}, r"RhoController\.block_refresh: got 0; expected an integer >= 1"),
    ({"block_refresh": 2.0}, r"RhoController\.block_refresh: got 2\.0"),
    ({"granularity": "blocks", "mode": "set"}, r"RhoController\.granularity: 'blocks' .* needs mode='clip'; got mode='set'"),
    ({"granularity": "blocks", "mode": "monitor"}, r"got mode='monitor' \('monitor' changes no step\)\. Fix: set mode='clip'"),
])
def test_bad_settings_are_refused_at_construction(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RhoController(tiny_causal_lm("llama"), **settings)


def test_the_trainer_arguments_and_the_callback_name_their_own_settings() -> None:
    with pytest.raises(ValueError, match=r"RhoTrainingArguments\.rho_granularity: .* needs rho_mode='clip'.*rho_granularity='global'"):
        RhoTrainingArguments(output_dir="out", rho_granularity="blocks", rho_mode="set")
    with pytest.raises(ValueError, match=r"RhoTrainingArguments\.rho_block_refresh: got -1"):
        RhoTrainingArguments(output_dir="out", rho_block_refresh=-1)
    with pytest.raises(ValueError, match=r"RhoCallback\.granularity: .*use RhoTrainer with rho_granularity='blocks'"):
        RhoCallback(granularity="blocks")
    assert RhoTrainingArguments(output_dir="out", rho_granularity="blocks").rho_settings().block_refresh == 4



def test_the_clip_defaults_to_blocks_and_the_other_modes_to_global(clipped_runs) -> None:
    """``granularity=None`` (the default) is the mode's: block-wise in ``"clip"``, global in ``"set"`` and ``"monitor"``
    (which clip no step); a controller at its defaults takes the block-wise step, bit for bit."""
    resolved = {mode: RhoSettings(mode=mode).granularity for mode in ("clip", "set", "monitor")}
    assert resolved == {"clip": "blocks", "set": "global", "monitor": "global"}
    args = RhoTrainingArguments(output_dir="out")
    assert args.rho_granularity is None and args.rho_settings().granularity == "blocks"
    assert RhoTrainingArguments(output_dir="out", rho_mode="set").rho_settings().granularity == "global"
    assert RhoCallback().settings.granularity == "global"
    default = train(None, 0.1, steps=2)
    for got, want in zip(default, clipped_runs["blocks"][:2], strict=True):
        assert got["record"].block_probes and got["record"].scalars() == want["record"].scalars()
        assert all(torch.equal(got["new"][name], want["new"][name]) for name in want["new"])
