"""RhoController in a plain PyTorch loop: ``controller.step(batch)`` replaces ``optimizer.step()``.

The model is a small ``nn.Module`` classifier (not transformers). Every check is made against an
independent reference: a plain ``torch.optim.AdamW`` copy stepped in lockstep (``AdamWReplay``) gives the update
``u`` AdamW proposes, and ``rho = pi / max spread`` comes from ``torch.func.jvp`` of the logits
in float64, without ``RadiusProbe``.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from hf_ghosts import RhoController
from tests.helpers import backward, batch_of, classifier, flat_norm, weights
from tests.references import AdamWReplay, reference_rho

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.mark.parametrize("mode", ["clip", "set"])
def test_plain_loop_applies_scale_times_the_adamw_update(mode: str) -> None:
    model = classifier()
    lr = 0.3 if mode == "clip" else 1e-3  # clip: steps far outside the radius; set: steps far inside it
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    replay = AdamWReplay(model, optimizer)
    r_target = 0.5
    controller = RhoController(model, optimizer, radii=("output",), mode=mode, r_target=r_target)
    scales = []
    for step in range(6):
        batch = batch_of(step)
        backward(model, batch)
        old = weights(model)
        u = replay.propose()
        record = controller.step(batch)
        applied = {name: p.detach() - old[name] for name, p in model.named_parameters()}
        rho = reference_rho(model, old, u, batch["x"])

        assert record.probed
        assert record.update_norm == pytest.approx(flat_norm(u), rel=1e-6)
        assert record.rho == pytest.approx(rho, rel=1e-4)
        assert record.r == pytest.approx(flat_norm(u) / rho, rel=1e-4)
        for name in u:
            torch.testing.assert_close(applied[name], record.scale * u[name], rtol=1e-5, atol=1e-7)
        if mode == "clip":
            assert record.r_applied <= r_target * (1 + 1e-12)
            assert record.scale == pytest.approx(min(1.0, r_target * rho / flat_norm(u)), rel=1e-4)
            assert flat_norm(applied) / rho <= r_target * (1 + 1e-4)
        else:
            assert record.r_applied == pytest.approx(r_target, rel=1e-6)
            assert flat_norm(applied) / rho == pytest.approx(r_target, rel=1e-4)
        scales.append(record.scale)
    if mode == "clip":
        assert min(scales) < 0.5, f"the learning rate is meant to force clipping; scales {scales}"
    else:
        assert min(scales) > 1.0, f"'set' is meant to lengthen these small steps; scales {scales}"
    assert controller.steps == controller.probes == 6


def test_plain_loop_window_aggregates_max_r_and_min_radii() -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    # every=2 with the triggers off: steps 1, 3, 5 are probed, 2 and 4 reuse the last rho.
    controller = RhoController(
        model, optimizer, radii=("output",), r_target=2.0, every=2, trigger_r=math.inf, trigger_growth=math.inf,
        granularity="global",  # one scale per step: the window's aggregates of r, scale and rho
    )
    records = []
    for step in range(5):
        batch = batch_of(step)
        backward(model, batch)
        records.append(controller.step(batch).scalars())
    metrics = controller.pop_metrics()
    probed = [rec for rec in records if rec["probed"]]
    assert [rec["probed"] for rec in records] == [True, False, True, False, True]
    assert metrics["ghosts/r"] == max(rec["r"] for rec in records)
    assert metrics["ghosts/r_applied"] == max(rec["r_applied"] for rec in records)
    assert metrics["ghosts/update_norm"] == max(rec["update_norm"] for rec in records)
    assert metrics["ghosts/scale"] == min(rec["scale"] for rec in records)
    assert metrics["ghosts/rho"] == min(rec["rho"] for rec in records)
    assert metrics["ghosts/rho_out"] == min(rec["rho_out"] for rec in probed)
    assert metrics["ghosts/clipped"] == pytest.approx(sum(rec["clipped"] for rec in probed) / len(probed))
    assert metrics["ghosts/probed"] == pytest.approx(3 / 5)
    assert metrics["ghosts/skipped_nonfinite"] == 0.0 and metrics["ghosts/would_skip"] == 0.0
    assert metrics["ghosts/would_clip"] == pytest.approx(sum(rec["r"] > 2.0 for rec in probed) / len(probed))
    assert metrics["ghosts/bottleneck/output"] == 3.0  # the one limiting radius bound every probed step
    # Steps between probes reuse the last measured radius.
    assert records[1]["rho"] == records[0]["rho"] and records[3]["rho"] == records[2]["rho"]
    # The window is emptied by pop_metrics.
    assert controller.pop_metrics() == {"ghosts/skipped_nonfinite": 0.0, "ghosts/would_skip": 0.0}


def test_attention_radius_on_a_plain_module_is_refused() -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"attention.*radii=\('output',\)"):
        RhoController(model, optimizer, radii=("attention",))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("mode", "clipp"), ("r_target", 0.0), ("r_target", math.inf), ("every", 0), ("every", 1.5)],
)
def test_invalid_controller_settings_name_the_setting(setting: str, value: object) -> None:
    model = classifier()
    with pytest.raises(ValueError, match=rf"RhoController\.{setting}: got"):
        RhoController(model, torch.optim.AdamW(model.parameters()), radii=("output",), **{setting: value})


def test_zero_update_is_not_probed_and_keeps_scale_one() -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.1)
    controller = RhoController(model, optimizer, radii=("output",))
    before = weights(model)
    for step in range(2):
        batch = batch_of(step)
        backward(model, batch)
        record = controller.step(batch)
        assert record.update_norm == 0.0 and record.scale == 1.0 and record.r == 0.0
        assert not record.probed
    assert controller.probes == 0 and controller.last_rho is None
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_nonfinite_gradient_skips_the_step(caplog: pytest.LogCaptureFixture) -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    controller = RhoController(model, optimizer, radii=("output",))
    batch = batch_of(0)
    backward(model, batch)
    controller.step(batch)  # one good step, so the optimizer has moments to protect
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    backward(model, batch)
    model.body[0].weight.grad[0, 0] = math.nan
    before = weights(model)
    with caplog.at_level(logging.WARNING, logger="hf_ghosts"):
        record = controller.step(batch)
    assert record.skipped == "gradient"
    assert "skipped optimizer step 2" in caplog.text
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][key], moments[i][key]) for i in moments for key in moments[i])
    assert controller.pop_metrics()["ghosts/skipped_nonfinite"] == 1.0


def test_nonfinite_update_from_a_nan_learning_rate_is_undone(caplog: pytest.LogCaptureFixture) -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = math.nan  # what a scheduler bug would do; AdamW's constructor refuses it
    controller = RhoController(model, optimizer, radii=("output",))
    batch = batch_of(0)
    backward(model, batch)
    before = weights(model)
    with caplog.at_level(logging.WARNING, logger="hf_ghosts"):
        record = controller.step(batch)
    assert record.skipped == "update"
    assert "non-finite update" in caplog.text
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert controller.pop_metrics()["ghosts/skipped_nonfinite"] == 1.0


def test_batch_without_labelled_positions_has_no_output_radius() -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3)
    controller = RhoController(model, optimizer, radii=("output",), r_target=0.5)
    batch = batch_of(0)
    backward(model, batch)
    unlabelled = {"x": batch["x"], "labels": torch.full_like(batch["labels"], -100)}
    old = weights(model)
    u = AdamWReplay(model, optimizer).propose()
    record = controller.step(unlabelled)  # measured on a batch with nothing to predict
    assert record.output_tokens == 0
    assert record.rho_out is None and record.rho is None  # not measured: no radius reported, none limits
    assert record.scale == 1.0 and record.r == 0.0 and not record.clipped
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - old[name], u[name], rtol=1e-5, atol=1e-7)
    assert controller.pop_metrics()["ghosts/no_output_tokens"] == 1.0
    backward(model, batch)
    again = controller.step(batch)  # nothing was measured, so nothing is reused: the next step probes
    assert again.probed and again.rho is not None and math.isfinite(again.rho) and again.output_tokens > 0


def test_step_is_refused_while_attached_to_the_optimizer_hooks() -> None:
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    controller = RhoController(model, optimizer, radii=("output",))
    controller.attach()
    with pytest.raises(RuntimeError, match="attached"):
        controller.step(batch_of(0))
    controller.detach()
    batch = batch_of(0)
    backward(model, batch)
    assert controller.step(batch).probed
