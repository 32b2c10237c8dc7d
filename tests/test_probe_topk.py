"""The probe's ``radius="topk_exact"``: against a brute-force nearest zero in float64, through every head path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ghosts import RadiusProbe, RhoController, RhoTrainingArguments
from hf_ghosts.radii import TOPK_POOL, rho_bound, topk_radius, widest_tokens
from tests.helpers import random_direction, tiny_causal_lm, token_batch
from tests.references import causal_output_positions, float64_copy, forward_logits, reference_logit_slopes, turns

pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force_radius(logits: np.ndarray, slopes: np.ndarray) -> float:
    """The nearest zero's modulus: circles from ``pi / Delta`` out by 10% until one holds a zero (the count only
    grows with the radius), then bisection."""
    low = math.pi / (slopes.max() - slopes.min())  # Theorem 4.6: nothing inside
    high = low
    while round(turns(logits, slopes, high, 2048)) == 0:
        low, high = high, high * 1.1
        assert high < 1e3 * math.pi / (slopes.max() - slopes.min()), "no zero found"
    for _ in range(24):
        middle = (low + high) / 2
        low, high = (middle, high) if round(turns(logits, slopes, middle, 2048)) == 0 else (low, middle)
    return low


def batch_truth(logits: torch.Tensor, slopes: torch.Tensor, valid: torch.Tensor) -> float:
    """``min_i rho_exact(i)`` over the valid tokens, widest first, stopping once ``pi / Delta_i`` exceeds the least."""
    z, a = logits[valid].numpy(), slopes[valid].numpy()
    widths = a.max(-1) - a.min(-1)
    least = math.inf
    for i in np.argsort(-widths):
        if math.pi / widths[i] >= least:
            break
        least = min(least, brute_force_radius(z[i], a[i]))
    return least


@pytest.fixture(scope="module")
def setting():
    """A tiny GPT-NeoX, its float64 copy, a batch, a direction, and the float64 logits, slopes and valid tokens."""
    model = float64_copy(tiny_causal_lm("gpt_neox"))
    batch = token_batch(batch=2, length=8)
    direction = random_direction(model)
    logits = forward_logits(model, batch).double()
    slopes = reference_logit_slopes(model, batch, direction, step=1e-5)
    valid = causal_output_positions(batch["labels"])
    return model, batch, direction, logits, slopes, valid, batch_truth(logits, slopes, valid)


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "chunked"), [("jvp", True), ("jvp", False), ("fd", True), ("fd", False)])
def test_topk_radius_between_the_bound_and_the_brute_force_batch_radius(setting, estimator: str, chunked: bool) -> None:
    model, batch, direction, _logits, slopes, valid, truth = setting
    options = dict(radii=("output",), estimator=estimator, chunked_head=chunked, dtype=torch.float64, fd_step=1e-5)
    bound = float(RadiusProbe(model, **options).measure(batch, direction).rho_out)
    assert bound == pytest.approx(float(rho_bound((slopes.amax(-1) - slopes.amin(-1))[valid].max())), rel=1e-6)
    previous = bound
    for k in (1, 2, 4, 14):  # 14: every valid token
        report = RadiusProbe(model, radius="topk_exact", topk=k, **options).measure(batch, direction)
        radius = float(report.rho_out)
        assert float(report.rho_out_bound) == pytest.approx(bound, rel=1e-6)
        assert bound * (1 - 1e-6) <= radius <= truth * (1 + 1e-6), (k, bound, radius, truth)
        assert radius >= previous * (1 - 1e-6)
        previous = radius
    assert previous == pytest.approx(truth, rel=1e-3)  # k covers every token: the exact batch radius
    assert previous > 1.2 * bound  # and it is tighter here


def test_repeated_rows_count_once() -> None:
    # three tokens: the widest twice (a repeated context), then a narrower one
    logits = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    slopes = torch.tensor([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [0.9, -0.9, 0.0]], dtype=torch.float64)
    widths = slopes.amax(-1) - slopes.amin(-1)
    chosen, following = widest_tokens(widths, None, 3)
    assert chosen.tolist() == [0, 1, 2] and following.item() == 0.0
    one = topk_radius(logits[chosen], slopes[chosen], following, k=1)
    # k = 1: the repeat is covered (not pi / 2 from it), the third token caps at pi / 1.8, below the first's exact 2.59
    exact_first = brute_force_radius(logits[0].numpy(), slopes[0].numpy())
    assert exact_first > math.pi / 1.8
    assert one.item() == pytest.approx(math.pi / 1.8, rel=1e-12)
    # k = 2: both distinct rows certified, against the brute-force nearest zeros
    two = topk_radius(logits[chosen], slopes[chosen], following, k=2)
    truth = min(exact_first, brute_force_radius(logits[2].numpy(), slopes[2].numpy()))
    assert truth * (1 - 3e-4) <= two.item() <= truth * (1 + 1e-9)
    assert TOPK_POOL >= 2


def test_trainer_arguments_and_controller_carry_the_radius(tmp_path) -> None:
    args = RhoTrainingArguments(output_dir=str(tmp_path), rho_radius="topk_exact", rho_topk=3, report_to=[])
    assert args.rho_settings().radius == "topk_exact" and args.rho_settings().topk == 3
    controller = RhoController(tiny_causal_lm("gpt_neox"), settings=args.rho_settings())
    assert controller.probe.settings.radius == "topk_exact" and controller.probe.settings.topk == 3
    with pytest.raises(ValueError, match=r"RhoTrainingArguments.rho_radius: got 'exact'; expected one of \['bound', 'topk_exact'\]"):
        RhoTrainingArguments(output_dir=str(tmp_path), rho_radius="exact", report_to=[])
    with pytest.raises(ValueError, match=r"RhoTrainingArguments.rho_topk: got 0; expected an integer >= 1"):
        RhoTrainingArguments(output_dir=str(tmp_path), rho_topk=0, report_to=[])
    with pytest.raises(ValueError, match=r"RadiusProbe.topk: got 2.5; expected an integer >= 1"):
        RadiusProbe(tiny_causal_lm("gpt_neox"), radius="topk_exact", topk=2.5)
    with pytest.raises(ValueError, match=r"RadiusProbe.radius: got 'tight'"):
        RadiusProbe(tiny_causal_lm("gpt_neox"), radius="tight")
