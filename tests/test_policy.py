"""Probing every k steps with triggers: when the controller measures afresh, and what it guarantees in between.

The decisions are checked on an SGD step with a fixed gradient, so that ``|u| = lr * |g|`` is known
exactly and each trigger can be crossed on purpose; the LR spike runs on a tiny GPT-NeoX.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from presets import spike_loop
from torch import nn

from hf_ghosts import RhoController, RhoTrainer, RhoTrainingArguments, policy
from hf_ghosts.policy import ProbeSchedule, reused_scale
from hf_ghosts.probe import attention
from hf_ghosts.settings import DEFAULT_TARGETS, DEFAULT_TRIGGER_R
from tests.helpers import tiny_causal_lm, token_batch, token_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def inputs(rows: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {"input": torch.randn(rows, 6, generator=generator)}


class FixedStep:
    """SGD (no momentum) with a fixed gradient ``g``: the proposed update is ``-lr * g``, so ``|u| = lr * |g|``."""

    def __init__(self, **controller_kwargs: object) -> None:
        self.model = mlp()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        generator = torch.Generator().manual_seed(7)
        self.gradient = [torch.randn(p.shape, generator=generator) for p in self.model.parameters()]
        self.gradient_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in self.gradient))
        self.controller = RhoController(self.model, self.optimizer, radii=("output",), **controller_kwargs)
        self.batch = inputs()

    def step(self, norm: float, gradient: list[torch.Tensor] | None = None) -> dict:
        """One step whose proposed update has length ``norm``."""
        for group in self.optimizer.param_groups:
            group["lr"] = norm / self.gradient_norm
        for p, g in zip(self.model.parameters(), gradient or self.gradient, strict=True):
            p.grad = g.clone()
        return self.controller.step(self.batch).scalars()


def test_every_one_probes_every_step_whatever_the_triggers() -> None:
    run = FixedStep(every=1, trigger_r=math.inf, trigger_growth=math.inf)
    records = [run.step(1e-4) for _ in range(4)]
    assert [rec["probed"] for rec in records] == [True] * 4
    assert run.controller.probes == 4


def test_without_triggers_every_k_is_a_fixed_schedule() -> None:
    run = FixedStep(every=3, trigger_r=math.inf, trigger_growth=math.inf)
    records = [run.step(1e-4) for _ in range(7)]
    assert [rec["probed"] for rec in records] == [True, False, False, True, False, False, True]
    assert records[1]["rho"] == records[0]["rho"] and records[4]["rho"] == records[3]["rho"]


def test_the_target_and_the_scale_are_computed_once_per_step(monkeypatch) -> None:
    """``r*`` once per step; the scale once for the rho a step applies (a reused one inside ``reused_scale``, a
    fresh one after the probe): the only second ``step_scale`` is the estimate with the old rho that a probe replaces."""
    import hf_ghosts.controller as controller_module

    calls: list[str] = []

    def counted(name, function):
        def wrapper(*args):
            calls.append(name)
            return function(*args)

        return wrapper

    monkeypatch.setattr(controller_module, "scheduled_target", counted("target", policy.scheduled_target))
    monkeypatch.setattr(controller_module, "step_scale", counted("scale", policy.step_scale))
    monkeypatch.setattr(policy, "step_scale", counted("scale", policy.step_scale))
    run = FixedStep(every=3, trigger_r=math.inf, trigger_growth=math.inf)
    per_step = []
    for _ in range(4):
        calls.clear()
        record = run.step(1e-4)
        per_step.append((record["probed"], sorted(calls)))
    # probed (no rho yet), reused, reused, probed again after every = 3 steps (estimate with the old rho, then the new)
    assert per_step == [(True, ["scale", "target"]), (False, ["scale", "target"]), (False, ["scale", "target"]),
                        (True, ["scale", "scale", "target"])]


def test_reused_scale_is_the_scale_of_the_last_rho_or_none_where_a_probe_is_due() -> None:
    schedule = ProbeSchedule(every=4, trigger_r=0.5, trigger_growth=2.0)
    # |u| = 0.3 against rho = 1 and r* = 2: r = 0.3 <= 0.5 * 2, clip leaves it (1.0); set scales to r* rho / |u|
    assert reused_scale(schedule, "clip", 0.3, 2.0, 1.0, 1, 0.3) == 1.0
    setting = ProbeSchedule(every=4, trigger_r=1.0, trigger_growth=2.0)  # "set" applies r = r*: trigger_r 1 reuses
    assert reused_scale(setting, "set", 0.3, 2.0, 1.0, 1, 0.3) == pytest.approx(2.0 / 0.3)
    assert reused_scale(schedule, "clip", 0.3, 2.0, None, 1, 0.3) is None  # no rho yet
    assert reused_scale(schedule, "clip", 0.3, 2.0, math.nan, 1, 0.3) is None
    assert reused_scale(schedule, "clip", 0.3, 2.0, 1.0, None, 0.3) is None  # the last probe is not to be trusted
    assert reused_scale(schedule, "clip", 0.3, 2.0, 1.0, 4, 0.3) is None  # every
    assert reused_scale(schedule, "clip", 0.7, 2.0, 1.0, 1, 0.3) is None  # |u| grew 2.3x
    assert reused_scale(schedule, "clip", 1.1, 2.0, 1.0, 1, 1.0) is None  # r = 1.1 > 0.5 * 2
    assert reused_scale(schedule, "monitor", 1.1, 2.0, 1.0, 1, 1.0) == 1.0  # the r trigger guards a rescale only
    assert reused_scale(setting, "set", 0.3, 1.0, 1.0, 1, 0.3) == pytest.approx(1.0 / 0.3)  # the target it is given


def test_a_tenfold_jump_of_the_update_norm_probes_at_once() -> None:
    run = FixedStep(every=100, trigger_r=math.inf, trigger_growth=2.0)
    norms = [1e-4, 1e-4, 1e-4, 1e-3, 1e-3, 1.9e-3, 2.1e-3, 1e-4]
    records = [run.step(norm) for norm in norms]
    # first step; x10 jump; 1.9x (< 2) the |u| of the last probe reuses; 2.1x probes; shrinking never probes
    assert [rec["probed"] for rec in records] == [True, False, False, True, False, False, True, False]
    assert records[3]["update_norm"] == pytest.approx(1e-3, rel=1e-5)


def test_a_step_near_the_target_is_measured_afresh() -> None:
    run = FixedStep(every=100, trigger_r=0.5, trigger_growth=math.inf, r_target=1.0)
    first = run.step(1e-4)
    rho = first["rho"]
    below = run.step(0.45 * rho)  # estimated r = 0.45 <= 0.5: reuses the last rho
    above = run.step(0.55 * rho)  # estimated r = 0.55 > 0.5: measured afresh
    assert (first["probed"], below["probed"], above["probed"]) == (True, False, True)
    assert below["rho"] == rho and below["r"] == pytest.approx(0.45, rel=1e-5)
    assert above["rho"] != rho


def test_a_reused_step_passes_unchanged_and_every_clip_is_measured() -> None:
    run = FixedStep(every=100, r_target=1.0)
    rho = run.step(1e-4)["rho"]
    records = [run.step(factor * rho) for factor in (0.01, 0.02, 0.04, 0.3, 3.0, 0.02, 50.0)]
    for rec in records:
        if rec["probed"]:
            assert rec["r_applied"] <= 1.0 + 1e-12
        else:
            assert rec["scale"] == 1.0 and not rec["clipped"]
            assert rec["r_applied"] <= DEFAULT_TRIGGER_R * 1.0
    assert all(rec["probed"] for rec in records if rec["clipped"])
    assert records[4]["probed"] and records[4]["clipped"] and records[6]["probed"] and records[6]["clipped"]


def test_set_mode_measures_every_step() -> None:
    run = FixedStep(every=100, mode="set", r_target=0.5, set_schedule=False)  # lr here sizes |u|, not a schedule
    records = [run.step(1e-4) for _ in range(4)]
    assert all(rec["probed"] for rec in records)
    assert all(rec["r_applied"] == pytest.approx(0.5, rel=1e-6) for rec in records)


def test_a_skipped_step_makes_the_next_one_probe(caplog: pytest.LogCaptureFixture) -> None:
    run = FixedStep(every=100, trigger_r=math.inf, trigger_growth=math.inf)
    assert run.step(1e-4)["probed"]
    assert not run.step(1e-4)["probed"]
    nan_gradient = [torch.full_like(g, math.nan) for g in run.gradient]
    assert run.step(1e-4, nan_gradient)["skipped"] == "gradient"
    assert run.step(1e-4)["probed"]


def test_probed_fraction_is_logged() -> None:
    run = FixedStep(every=2, trigger_r=math.inf, trigger_growth=math.inf)
    for _ in range(3):
        run.step(1e-4)
    assert run.controller.pop_metrics()["ghosts/probed"] == pytest.approx(2 / 3)


def test_resume_keeps_the_reference_of_the_last_probe() -> None:
    run = FixedStep(every=100, trigger_r=math.inf, trigger_growth=2.0)
    run.step(1e-4)
    state = run.controller.state_dict()
    resumed = RhoController(run.model, run.optimizer, radii=("output",), every=100, trigger_r=math.inf, trigger_growth=2.0)
    resumed.load_state_dict(state)
    run.controller = resumed
    assert not run.step(1.5e-4)["probed"]  # within 2x of the |u| of the probe before the resume
    assert run.step(2.5e-4)["probed"]
    partial = {key: value for key, value in state.items() if key not in ("probe_step", "probe_norm")}
    with pytest.raises(ValueError, match=r"RhoController.load_state_dict: the state lacks \['probe_norm', 'probe_step'\]"):
        resumed.load_state_dict(partial)  # no silent default: a state is what state_dict() returns
    assert "config" not in state  # nothing is saved that load_state_dict does not read


@pytest.mark.parametrize(
    ("setting", "value"), [("trigger_r", 0.0), ("trigger_r", -1.0), ("trigger_growth", 0.5), ("trigger_growth", "2")]
)
def test_invalid_triggers_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        RhoController(mlp(), radii=("output",), **{setting: value})


@pytest.mark.parametrize(("field", "value"), [("rho_trigger_r", 0.0), ("rho_trigger_growth", 0.9), ("rho_every", 0)])
def test_invalid_trigger_arguments_name_the_field(tmp_path, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"RhoTrainingArguments.{field}"):
        RhoTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{field: value})


def test_trainer_passes_the_triggers_to_its_controller(tmp_path) -> None:
    args = RhoTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, rho_every=5, rho_trigger_r=0.25,
                                rho_trigger_growth=math.inf)
    trainer = RhoTrainer(model=tiny_causal_lm(), args=args, train_dataset=token_dataset())
    controller = trainer.rho_controller
    assert (controller.schedule.every, controller.schedule.trigger_r, controller.schedule.trigger_growth) == (5, 0.25, math.inf)


def spike_run(controlled: bool, steps: int = 20, start: int = 8, factor: float = 1000.0) -> tuple[list[float], list[dict]]:
    """Tiny GPT-NeoX, AdamW at 1e-3 with the LR x ``factor`` from step ``start`` on; default controller settings.

    Returns the loss of every step and the controller's records (none without control).
    """
    model = tiny_causal_lm(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = RhoController(model, optimizer) if controlled else None
    batches = [token_batch(batch=4, length=16, seed=step % 4) for step in range(steps)]  # 4 batches in turn: something to learn
    rows = spike_loop(model, optimizer, batches, start=start, factor=factor,
                      step=(lambda batch: controller.step(batch).scalars()) if controlled else None)
    return [row["loss"] for row in rows], [row["record"] for row in rows if controlled]


def test_default_settings_survive_a_thousandfold_learning_rate_spike() -> None:
    (plain, _), (controlled, records) = spike_run(controlled=False), spike_run(controlled=True)
    assert plain[:9] == pytest.approx(controlled[:9], abs=0.3)  # the loss at step 8 is computed before the spike
    before = controlled[7]
    assert max(plain[9:]) > before + 5, f"the spike is meant to wreck plain AdamW; losses {plain}"
    assert max(controlled[9:]) < before + 0.5, f"the controller let the spike through; losses {controlled}"
    # Every spiked step was measured afresh (|u| jumped) and clipped to the target; few steps before it were.
    assert all(rec["probed"] and rec["clipped"] and rec["r_applied"] <= rec["target"] * (1 + 1e-12) for rec in records[8:])
    assert records[8]["target"] == DEFAULT_TARGETS["clip"]
    assert sum(rec["probed"] for rec in records[:8]) < 8


# ----------------------------------------------------------------------------- a cheaper fd probe
def test_fd_attention_keeps_queries_and_keys_and_repeats_the_score_difference() -> None:
    """Between its two passes fd keeps ``q`` and ``k`` (not the ``[b, h, q, k]`` scores), with the same slopes."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim, step, scaling = 2, 4, 2, 16, 3, 0.1, 0.7  # grouped-query attention

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q_plus, q_minus = draw(batch, heads, length, dim), draw(batch, heads, length, dim)
    k_plus, k_minus = draw(batch, kv_heads, length, dim), draw(batch, kv_heads, length, dim)
    value = draw(batch, kv_heads, length, dim)
    layer = SimpleNamespace(layer_idx=0, is_causal=True)
    capture = attention.ScoreCapture(mode="fd_plus", fd_step=step)
    attention._eager_capture(capture, layer, q_plus, k_plus, value, None, scaling, None)
    stored = capture.plus_scores[0]
    assert isinstance(stored, tuple) and sum(t.numel() for t in stored) < batch * heads * length * length
    capture.mode = "fd_minus"
    attention._eager_capture(capture, layer, q_minus, k_minus, value, None, scaling, None)

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.repeat_interleave(heads // kv_heads, dim=1).transpose(2, 3) * scaling

    slopes = (scores(q_plus, k_plus) - scores(q_minus, k_minus)) / (2 * step)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    high = slopes.masked_fill(~causal, -math.inf).amax(-1)
    low = slopes.masked_fill(~causal, math.inf).amin(-1)
    torch.testing.assert_close(capture.spreads[0], (high - low).amax(dim=(0, 2)).float(), rtol=1e-6, atol=0)  # spreads are fp32
