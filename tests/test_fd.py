"""fd's step control (:mod:`hf_ghosts.probe.fd`): within 1% of a float64 JVP where the fixed step is not, when its
check runs, its fallback to jvp; and an FFN radius over no position is "not measured", never a radius."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import transformers

from hf_ghosts import RadiusProbe, RadiusReport, RhoController
from hf_ghosts.probe import fd
from hf_ghosts.radii import spread
from tests.helpers import tiny_causal_lm, token_batch
from tests.references import float64_copy

# Norms after the attention / MLP output (Gemma2/3: sandwich; OLMo2: post-norm) rescale outputs that are still tiny at
# initialization: along a gradient step the slopes bend within h = 0.01 (measured: 37% / 39% / 1.6% off the output
# radius at the fixed step).
HARD = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64)
RADII = ("output", "attention")


def hard_case(model_type: str) -> tuple[torch.nn.Module, dict, dict]:
    """A tiny ``model_type`` at initialization, a 4 x 32 token batch and one gradient step along it."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **HARD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, HARD["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    model.zero_grad()
    model(**batch).loss.backward()
    direction = {name: -p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return model, batch, direction


def backward(model: torch.nn.Module, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def errors(report, reference) -> dict[str, float]:
    return {name: abs(float(report.radii()[name]) / float(reference.radii()[name]) - 1) for name in RADII}


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "olmo2"])
def test_fd_is_within_1pct_of_float64_where_the_fixed_step_is_not(model_type: str, monkeypatch) -> None:
    model, batch, direction = hard_case(model_type)
    reference = RadiusProbe(float64_copy(model), RADII, "jvp", dtype=torch.float64).measure(batch, direction)
    report = RadiusProbe(model, RADII, "fd").measure(batch, direction)
    found = errors(report, reference)
    assert max(found.values()) < 1e-2, found
    assert float(report.fd_fallback) == 0.0 and float(report.fd_step) < 1e-2
    assert max(found.values()) < 2 * float(report.fd_error) + 1e-3 and float(report.fd_error) < 1e-2  # the estimate holds
    monkeypatch.setattr(fd, "FD_TOLERANCE", math.inf)  # accept the first step: the fixed h = 0.01 of before ...
    monkeypatch.setattr(fd, "FD_ERROR_LIMIT", math.inf)  # ... and no jvp in its place
    fixed = RadiusProbe(model, RADII, "fd").measure(batch, direction)
    assert float(fixed.fd_step) == 1e-2 and max(errors(fixed, reference).values()) > 1e-2


def counting_probe(model: torch.nn.Module, radii=RADII) -> tuple[RadiusProbe, list[float]]:
    """An fd probe that lists the step of every central-difference measurement it makes."""
    probe = RadiusProbe(model, radii, "fd")
    steps: list[float] = []
    measure_once = probe._measure_once

    def once(*args):
        if args[4] == "fd":  # (inputs, weights, pieces, norm, estimator, fd_step)
            steps.append(args[5])
        return measure_once(*args)

    probe._measure_once = once
    return probe, steps


def test_the_check_runs_first_every_k_probes_and_when_the_make_up_changes() -> None:
    model = tiny_causal_lm("llama")
    batch = token_batch(batch=2)
    backward(model, batch)
    direction = {name: p.grad.clone() for name, p in model.named_parameters()}
    probe, steps = counting_probe(model)
    per_probe = []
    for _ in range(fd.FD_CHECK_EVERY + 1):
        before = len(steps)
        probe.measure(batch, direction)
        per_probe.append(len(steps) - before)
    # smooth along the gradient: h = fd_step is accepted, h / 2 only checks it
    assert per_probe == [2] + [1] * (fd.FD_CHECK_EVERY - 1) + [2]
    check = [1e-2, 5e-3]
    assert steps == check + [1e-2] * (fd.FD_CHECK_EVERY - 1) + check
    before = len(steps)
    probe.measure(batch, {name: 3 * d for name, d in direction.items()})  # the same make-up: no check
    assert len(steps) - before == 1
    embeddings = {name: d for name, d in direction.items() if "embed" in name}
    probe.measure(batch, embeddings)  # all of it in the embeddings now: checked afresh
    assert len(steps) - before - 1 == 2


def test_where_fd_cannot_reach_its_limit_jvp_measures_instead_and_says_so(monkeypatch, caplog) -> None:
    model, batch, direction = hard_case("gemma2")
    jvp = RadiusProbe(model, RADII, "jvp").measure(batch, direction)
    monkeypatch.setattr(fd, "FD_ERROR_LIMIT", 1e-9)  # no step reaches it
    probe = RadiusProbe(model, RADII, "fd")
    with caplog.at_level(logging.WARNING, logger="hf_ghosts.probe.fd"):
        first, second = probe.measure(batch, direction), probe.measure(batch, direction)
    for report in (first, second):
        assert float(report.fd_fallback) == 1.0 and float(report.fd_error) > 1e-9
        torch.testing.assert_close(report.out_spread, jvp.out_spread, rtol=1e-6, atol=0)
        torch.testing.assert_close(report.attn_spread, jvp.attn_spread, rtol=1e-6, atol=0)
    assert [r.message.count("measuring by JVP") for r in caplog.records] == [1]  # warned once
    assert probe.estimator == "fd"
    without = RadiusProbe(model, RADII, "fd")  # as under FSDP2: no forward-mode AD to fall back on
    without.fd_control.forward_ad = False
    with caplog.at_level(logging.WARNING, logger="hf_ghosts.probe.fd"):
        report = without.measure(batch, direction)
    assert float(report.fd_fallback) == 0.0 and float(report.fd_error) > 1e-9
    assert not torch.equal(report.out_spread, jvp.out_spread)
    assert "no forward-mode AD" in caplog.records[-1].message


# ------------------------------------------------------------------------ an FFN radius over no position
def masked(batch: dict) -> dict:
    """``batch`` with every position masked (labels kept: the output radius is still measured)."""
    return {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_an_ffn_radius_over_no_position_is_not_measured(estimator: str) -> None:
    model = tiny_causal_lm("llama")
    batch = token_batch(batch=2, length=12)
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    radii = ("output", "ffn", "ffn_activation")
    seen = RadiusProbe(model, radii, estimator).measure(batch, direction)
    assert int(seen.ffn_tokens) == 2 * 12 and seen.unmeasured() == () and math.isfinite(float(seen.rho_ffn))
    report = RadiusProbe(model, radii, estimator).measure(masked(batch), direction)
    assert int(report.ffn_tokens) == 0 and report.unmeasured() == ("ffn", "ffn_activation")
    assert math.isnan(float(report.rho_ffn)) and math.isnan(float(report.rho_ffn_activation))
    assert math.isnan(float(report.radii()["ffn"]))
    assert float(report.rho_of(("output", "ffn"))) == float(report.rho_out) < math.inf  # not limiting
    assert report.bottleneck_of(("output", "ffn")) == "output" and report.bottleneck == "output"
    assert float(report.rho_of(("ffn",))) == math.inf


def test_the_controller_neither_limits_nor_logs_an_unmeasured_ffn_radius() -> None:
    model = tiny_causal_lm("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    controller = RhoController(model, optimizer, radii=("ffn",), watch_radii=("output",), r_target=1.0)
    batch = masked(token_batch(batch=2))
    backward(model, batch)
    record = controller.step(batch)
    assert record.skipped is None and record.probed and record.ffn_tokens == 0
    assert record.rho_ffn is None and "rho_ffn" not in record.radii and record.rho_out is not None
    assert record.rho is None and record.scale == 1.0 and record.bottleneck == "none"  # no limiting radius measured
    metrics = controller.pop_metrics()
    assert metrics["ghosts/no_ffn_tokens"] == 1.0 and "ghosts/rho_ffn" not in metrics and "ghosts/rho" not in metrics
    assert math.isfinite(metrics["ghosts/rho_out"])


# ------------------------------------------------------------------------ the check's floor, rule by rule
def bending(c: float, widen: dict[float, float] | None = None):
    """``at(h)`` of a direction whose spread is ``1 + c h^2`` (the truncation error, exactly), listing the steps; the
    rounding guard asks for ``widen[h]`` where given."""
    steps: list[float] = []

    def at(h: float):
        steps.append(h)
        return RadiusReport(out_spread=torch.tensor(1.0 + c * h * h, dtype=torch.float64)), (widen or {}).get(h)

    return at, steps


def checked(at) -> fd.FdStepControl:
    control = fd.FdStepControl(1e-2, forward_ad=False)  # where the error stays large: no jvp in fd's place
    control.measure(at, jvp=lambda: pytest.fail("no jvp expected"), pieces={"w": torch.ones(3)})
    return control


def test_the_check_never_tries_below_its_share_of_fd_step(monkeypatch) -> None:
    monkeypatch.setattr(fd, "FD_MIN_STEP_SHARE", 1 / 4)
    at, steps = bending(1e9)  # bends so sharply that the check aims far below 1e-2 / 4
    checked(at)
    assert min(steps) == 1e-2 / 4 and steps[:2] == [1e-2, 5e-3]


def test_the_check_stays_above_half_the_step_the_rounding_guard_widened() -> None:
    at, steps = bending(1e9, widen={1e-2: 4e-2})  # rounding: measure at 4e-2 instead of 1e-2
    control = checked(at)
    assert steps == [1e-2, 4e-2, 2e-2] and control.step == 2e-2  # never below 4e-2 / 2


def test_the_first_try_halves_the_step_whatever_the_floor(monkeypatch) -> None:
    monkeypatch.setattr(fd, "FD_MIN_STEP_SHARE", 1.0)  # a floor at fd_step itself: no further try, but the first
    at, steps = bending(1e9)
    control = checked(at)
    assert steps == [1e-2, 5e-3] and control.step == 5e-3 and control.error > fd.FD_ERROR_LIMIT


# ------------------------------------------------------------------------ logit_slopes at the control's step
def test_logit_slopes_of_an_fd_probe_are_within_its_tolerance_where_the_fixed_step_is_not() -> None:
    model, batch, direction = hard_case("gemma2")
    _, reference = RadiusProbe(float64_copy(model), RADII, "jvp", dtype=torch.float64).logit_slopes(batch, direction)
    probe = RadiusProbe(model, RADII, "fd")
    _, slopes = probe.logit_slopes(batch, direction)
    _, fixed = probe.logit_slopes(batch, direction, estimator="fd", fd_step=1e-2)  # the fixed step of before

    def error(found: torch.Tensor) -> float:  # the largest spread, as the output radius takes it
        return abs(float(spread(found.double(), dim=-1).amax() / spread(reference, dim=-1).amax()) - 1)

    assert probe.slope_estimator(batch, direction) == ("fd", probe.fd_control.step) and probe.fd_control.step < 1e-2
    assert error(slopes) < 2 * probe.fd_control.error + 1e-3 and probe.fd_control.error < fd.FD_ERROR_LIMIT
    assert error(fixed) > 0.1
