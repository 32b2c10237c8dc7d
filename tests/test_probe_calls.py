"""One measurement's estimator and fd step are its arguments: ``measure_with``, a probe whose attributes no call
writes, ``settings=`` or keywords (one rule for the four callers), and the report's field kinds."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from hf_ghosts import RadiusProbe, RadiusReport, RhoCallback, RhoController
from hf_ghosts.probe import ShardedRadiusProbe, fd
from hf_ghosts.probe.radius_probe import MODEL_KEYWORDS
from hf_ghosts.settings import RADIUS_TABLE, REDUCTIONS, REPORT_FIELDS, RhoSettings
from tests.helpers import random_direction, tiny_causal_lm, token_batch

RADII = ("output", "attention", "ffn")


def case() -> tuple[torch.nn.Module, dict, dict]:
    model = tiny_causal_lm("llama")
    return model, token_batch(length=12, pad_left=2), random_direction(model)


def assert_same(first: RadiusReport, second: RadiusReport, names=("out_spread", "attn_spread", "ffn_radius")) -> None:
    for name in names:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


# ------------------------------------------------------------------------ measure_with
def test_measure_with_a_step_is_what_the_control_measured_at_that_step_and_leaves_it_alone() -> None:
    model, batch, direction = case()
    probe = RadiusProbe(model, RADII, "fd")
    report = probe.measure(batch, direction)  # the first probe checks: h = fd_step accepted, h / 2 only checked
    control = probe.fd_control.state_dict()
    step = probe.fd_control.step
    assert step == float(report.fd_step) == 1e-2
    again = probe.measure_with(batch, direction, estimator="fd", fd_step=step)
    assert_same(again, report)
    assert float(again.fd_step) == step and again.fd_error is None and again.fd_fallback is None
    half = probe.measure_with(batch, direction, estimator="fd", fd_step=step / 2)  # another step: another report
    assert not torch.equal(half.out_spread, report.out_spread)
    assert probe.fd_control.state_dict() == control  # the step control neither read nor moved
    jvp = probe.measure_with(batch, direction, estimator="jvp")  # the fd probe measures by jvp when asked
    assert_same(jvp, RadiusProbe(model, RADII, "jvp").measure(batch, direction))
    assert jvp.fd_step is None


@pytest.mark.parametrize(
    ("estimator", "fd_step", "message"),
    [("auto", None, "estimator 'auto'; expected one of"), ("fd", None, "estimator 'fd' needs fd_step"),
     ("fd", 0.0, "estimator 'fd' needs fd_step"), ("fd", math.inf, "estimator 'fd' needs fd_step")],
)
def test_measure_with_refuses_what_it_cannot_measure(estimator: str, fd_step: float | None, message: str) -> None:
    model, batch, direction = case()
    with pytest.raises(ValueError, match=rf"RadiusProbe.measure_with: {message}"):
        RadiusProbe(model, ("output",), "jvp").measure_with(batch, direction, estimator=estimator, fd_step=fd_step)


def test_measure_with_refuses_a_jvp_without_forward_ad_and_fd_in_16_bits() -> None:
    model, batch, direction = case()
    probe = RadiusProbe(model, ("output",), "fd")
    probe.forward_ad = False  # as ShardedRadiusProbe
    with pytest.raises(ValueError, match="no forward-mode AD"):
        probe.measure_with(batch, direction, estimator="jvp")
    sixteen = RadiusProbe(model, ("output",), "jvp", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"RadiusProbe\.dtype: torch\.bfloat16 with the 'fd' estimator"):
        sixteen.measure_with(batch, direction, estimator="fd", fd_step=1e-2)


# ------------------------------------------------------------------------ no hidden state
class WatchedProbe(RadiusProbe):
    """A probe that lists every attribute written on it once it is armed."""

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_armed"):
            self.__dict__.setdefault("_written", []).append(name)
        super().__setattr__(name, value)


def test_no_measurement_writes_the_probe_but_the_kernels_it_ran(monkeypatch) -> None:
    model, batch, direction = case()
    probe = WatchedProbe(model, RADII, "fd")
    probe.__dict__["_armed"] = True
    probe.measure(batch, direction)  # a check: fd at two steps
    probe.measure(batch, direction)  # fd at the accepted step
    monkeypatch.setattr(fd, "FD_ERROR_LIMIT", 1e-12)
    probe.fd_control.reset()
    assert float(probe.measure(batch, direction).fd_fallback) == 1.0  # a check, then jvp in fd's place
    probe.measure_with(batch, direction, estimator="fd", fd_step=3e-3)
    probe.logit_slopes(batch, direction)
    assert set(probe.__dict__.get("_written", [])) <= {"attention_kernels"}
    assert (probe.estimator, probe.settings.fd_step) == ("fd", 1e-2)


def test_the_settings_are_the_one_store() -> None:
    probe = RadiusProbe(tiny_causal_lm("llama"), ("output",), "fd", fd_step=5e-3)
    assert (probe.estimator, probe.dtype, probe.settings.fd_step) == ("fd", torch.float32, 5e-3)
    with pytest.raises(AttributeError):
        probe.estimator = "jvp"  # read-only: RhoSettings is frozen and the probe holds no copy
    assert probe.radii == ("output",) == probe.settings.measured
    for copy in ("fd_step", "ffn_mode", "ffn_quantile", "vocab_chunk", "radius", "topk"):
        assert not hasattr(probe, copy), copy


# ------------------------------------------------------------------------ settings= or keywords, one rule
def test_settings_and_keywords_together_are_refused_by_every_caller() -> None:
    model = tiny_causal_lm("llama")
    settings = RhoSettings(estimator="fd", probe_dtype="float32")
    for make in (
        lambda: RhoController(model, settings=settings, every=4),
        lambda: RadiusProbe(model, settings=settings, fd_step=1e-3),
        lambda: ShardedRadiusProbe(model, settings=settings, fd_step=1e-3),
    ):
        with pytest.raises(TypeError, match=r"either as settings= or as keywords, not both \(\['(every|fd_step)'\]\)"):
            make()


@pytest.mark.parametrize(
    ("make", "caller"),
    [(lambda m: RhoController(m, chunked_haed=True), "RhoController"),
     (lambda m: RadiusProbe(m, chunked_haed=True), "RadiusProbe"),
     (lambda m: ShardedRadiusProbe(m, chunked_haed=True), "ShardedRadiusProbe"),
     (lambda m: RhoCallback(chunked_haed=True), "RhoCallback")],
)
def test_a_misspelt_keyword_is_refused_at_construction_naming_the_allowed_ones(make, caller: str) -> None:
    with pytest.raises(TypeError, match=rf"{caller}: unknown keyword\(s\) \['chunked_haed'\]; settings: \[.*'fd_step'.*\]; "
                                        r"other keywords: \['chunked_head', 'ffn_spec', 'shift_labels'\]"):
        make(tiny_causal_lm("llama"))


def test_the_model_keywords_are_the_probes_own_parameters() -> None:
    import inspect

    keyword_only = [name for name, parameter in inspect.signature(RadiusProbe).parameters.items()
                    if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    assert set(MODEL_KEYWORDS) == set(keyword_only) - {"dtype", "settings"}


# ------------------------------------------------------------------------ the report's field kinds
def test_every_report_field_reduces_and_scales_as_its_kind_in_the_radius_table() -> None:
    assert set(REPORT_FIELDS) == set(REDUCTIONS) == {f.name for f in fields(RadiusReport)}
    for radius in RADIUS_TABLE:  # a spread: MAX across ranks, per unit length; a radius: MIN, a length
        assert (REDUCTIONS[radius.raw], REPORT_FIELDS[radius.raw].length_power) == (
            ("max", -1) if radius.spread else ("min", 1)
        ), radius.name
        if radius.exact is not None:
            assert (REDUCTIONS[radius.exact], REPORT_FIELDS[radius.exact].length_power) == ("min", 1), radius.exact
        if radius.tokens is not None:
            assert (REDUCTIONS[radius.tokens], REPORT_FIELDS[radius.tokens].length_power) == ("sum", 0), radius.tokens
    assert {name: REDUCTIONS[name] for name in ("fd_step", "fd_error", "fd_fallback")} == {
        "fd_step": "min", "fd_error": "max", "fd_fallback": "max"
    }


def test_along_unit_scales_spreads_down_radii_up_and_leaves_counts_and_fd_alone() -> None:
    report = RadiusReport(**{name: torch.tensor(3.0) for name in REPORT_FIELDS})
    unit = report.along_unit(torch.tensor(2.0))
    expected = {"out_spread": 1.5, "attn_spread": 1.5, "ffn_radius": 6.0, "ffn_activation_radius": 6.0,
                "out_radius": 6.0, "output_tokens": 3.0, "ffn_tokens": 3.0, "attention_tokens": 3.0, "fd_step": 3.0,
                "fd_error": 3.0, "fd_fallback": 3.0}
    assert {name: float(getattr(unit, name)) for name in REPORT_FIELDS} == expected


def test_a_jvp_report_does_not_depend_on_the_directions_length() -> None:
    model, batch, direction = case()
    probe = RadiusProbe(model, ("output", "attention", "ffn", "ffn_activation"), "jvp", radius="topk_exact", topk=2)
    one, three = probe.measure(batch, direction), probe.measure(batch, {n: 3 * d for n, d in direction.items()})
    for name in ("out_spread", "attn_spread", "ffn_radius", "ffn_activation_radius", "out_radius"):
        torch.testing.assert_close(getattr(three, name), getattr(one, name), rtol=1e-5, atol=0)
    assert int(three.output_tokens) == int(one.output_tokens) > 0
