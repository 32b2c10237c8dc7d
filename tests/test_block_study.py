"""benchmarks/block_study.py and block_variants.py: the rules against hand cases, a KKT point found by bisection,
random feasible points and scipy's LP; the groupings against the product's blocks; ``kinds-prop2`` against the
product's block step bit for bit; every variant's step certified (and the sum bound holding with fresh spreads); a smoke
run of the study's command line."""

from __future__ import annotations

import json
import math
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_ghosts import RhoController
from hf_ghosts.blocks import ParameterBlocks
from tests.helpers import SMALL_DATA, tiny_causal_lm, token_batch

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def variants():
    return import_module("block_variants")  # benchmarks/ is on pytest's pythonpath


# --------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(("values", "costs", "budget", "expected"), [
    ([3, 1], [1, 1], 1.0, [0.75, 0.25]),          # nothing capped: shares 3/4, 1/4 of the budget
    ([3, 1], [1, 2], 1.0, [0.75, 0.125]),         # s_b = B d_b / (C_b sum d): the cost divides
    ([3, 1], [1, 1], 1.6, [1.0, 0.6]),            # 1.2 capped at 1, its 0.2 goes to the other block
    ([3, 1], [1, 1], 5.0, [1.0, 1.0]),            # budget beyond every cost: all whole
    ([1, 1, -1, 0], [0, 1, 1, 1], 0.5, [1.0, 0.5, 0.0, 0.0]),  # zero cost: whole, free; non-positive: 0
    ([3, 1], [1, 1], 0.0, [0.0, 0.0]),
])
def test_prop_scales_by_hand(variants, values, costs, budget, expected):
    np.testing.assert_allclose(variants.prop_scales(values, costs, budget), expected, rtol=1e-12)


def kkt_by_bisection(values: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """The KKT point of ``max sum_b values_b log s_b``, ``s @ costs <= budget``, ``s <= 1`` (all ``values, costs > 0``):
    ``s_b = min(1, values_b / (lam costs_b))`` with ``lam`` found by bisection (in log space) so the budget is used,
    or every block whole when that fits."""
    if costs.sum() <= budget:
        return np.ones_like(values)

    def used(lam: float) -> float:
        return float(np.minimum(1.0, values / (lam * costs)) @ costs)

    low, high = -60.0, 60.0  # log lam: used() falls as lam grows
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if used(np.exp(mid)) > budget else (low, mid)
    return np.minimum(1.0, values / (np.exp(high) * costs))


def test_prop_scales_against_a_numerical_maximiser(variants):
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(2, 8))
        values = rng.exponential(size=n) * (rng.random(n) < 0.8)  # some blocks without decrease
        values[0] = max(values[0], 0.1)
        costs = rng.exponential(size=n)
        budget = float(rng.uniform(0.05, 1.2) * costs.sum())
        scales = variants.prop_scales(values, costs, budget)
        assert np.all((scales >= 0) & (scales <= 1))
        assert scales @ costs <= budget * (1 + 1e-12)
        assert np.all(scales[values <= 0] == 0)
        if np.all(scales[values > 0] < 1):  # nothing capped: the budget is used exactly
            assert scales @ costs == pytest.approx(budget, rel=1e-12)
        pos = values > 0
        np.testing.assert_allclose(scales[pos], kkt_by_bisection(values[pos], costs[pos], budget), rtol=1e-9)
        best = float(values[pos] @ np.log(scales[pos]))
        for _ in range(200):  # no random feasible point does better (the objective is concave: a check, not a proof)
            other = rng.uniform(1e-3, 1.0, pos.sum())
            other *= min(1.0, budget / float(other @ costs[pos]))
            assert float(values[pos] @ np.log(other)) <= best + 1e-12


@pytest.mark.parametrize(("rule", "costs", "expected"), [
    ("prop", [1, 2], [2 / 3, 1 / 6]),        # budget shares 2 : 1
    ("sqrt", [1, 2], [2**0.5 / (2**0.5 + 1), 0.5 / (2**0.5 + 1)]),  # budget shares sqrt(2) : 1
    ("prop2", [1, 1], [0.8, 0.2]),           # s proportional to (d / C)^2 = 4 : 1
    ("prop2", [1, 2], [8 / 9, 1 / 18]),      # (2 : 0.5)^2 = 16 : 1, 16 k + 2 k = 2 ... k = 1 / 18
    ("knapsack", [1, 2], [1.0, 0.0]),
])
def test_choose_scales_rules_by_hand(variants, rule, costs, expected):
    """Two blocks of predicted decrease 2 and 1 and a third of -1, budget 1, one softmax instance (``spreads`` n x 1)."""
    spreads = np.array([[costs[0]], [costs[1]], [1.0]])
    scales = variants.choose_scales(np.array([2.0, 1.0, -1.0]), spreads, 1.0, rule, "zero", 0.0)
    np.testing.assert_allclose(scales, [*expected, 0.0], rtol=1e-12)
    assert float(scales @ spreads[:, 0]) == pytest.approx(1.0, rel=1e-12)  # nothing capped: the whole budget


def test_nonpositive_blocks_get_the_global_scale_reserved_first(variants):
    """``global``: the block of decrease -1 (cost 1) keeps the global scale 0.25, the others share the rest (0.75)."""
    spreads = np.array([[1.0], [1.0], [1.0]])
    scales = variants.choose_scales(np.array([2.0, 1.0, -1.0]), spreads, 1.0, "prop2", "global", 0.25)
    np.testing.assert_allclose(scales, [0.6, 0.15, 0.25], rtol=1e-12)  # 0.75 shared 4 : 1


def test_knapsack_is_the_lp_on_one_instance(variants):
    """With one softmax instance the LP is the fractional knapsack: same objective (scipy's HiGHS as reference)."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 7))
        values, costs = rng.normal(size=n), rng.exponential(size=n)
        budget = float(rng.uniform(0.1, 1.0) * costs.sum())
        knapsack = variants.knapsack_scales(values, costs, budget)
        lp = variants.lp_scales(values, costs[:, None], np.array([budget]))
        assert knapsack @ costs <= budget * (1 + 1e-12)
        assert float(knapsack @ values) == pytest.approx(float(lp @ values), rel=1e-7, abs=1e-9)


def test_variant_names_parse_and_bad_ones_are_refused(variants, monkeypatch):
    variant = variants.Variant
    assert variant.parse("kinds-prop2-r4") == variant("kinds", "prop2", refresh=4)
    assert variant.parse("layers-knapsack-global-r2-p2-m25") == variant("layers", "knapsack", "global", 2, 2, 0.25)
    for bad, match in (("kinds", "no variant"), ("rows-prop2", "no variant"), ("kinds-prop3", "no variant"),
                       ("kinds-prop2-r0", "unknown option 'r0'"), ("kinds-prop2-m150", "unknown option")):
        with pytest.raises(ValueError, match=match):
            variant.parse(bad)
    monkeypatch.setattr(variants, "scipy_installed", lambda: False)
    with pytest.raises(ValueError, match=r"'lp' needs scipy.*pip install scipy"):
        variant.parse("kinds-lp")


# --------------------------------------------------------------------------------------------- the groupings
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_groupings_split_the_update_exactly(variants, family):
    """Every grouping's pieces sum to ``u`` elementwise and do not overlap; ``kinds`` is the product's blocks;
    ``layers`` splits each per-layer kind into one block per layer, ``two`` is embeddings / the rest."""
    model = tiny_causal_lm(family)
    names, params = zip(*model.named_parameters(), strict=True)
    update = [torch.randn_like(p) for p in params]
    product = ParameterBlocks.of(model, names, params)
    layers = model.config.num_hidden_layers
    for grouping in variants.GROUPINGS:
        blocks = variants.grouping_blocks(model, names, params, grouping)
        pieces = blocks.pieces(update)
        for name, u in zip(names, update, strict=True):
            parts = [piece[name] for piece in pieces if name in piece]
            torch.testing.assert_close(sum(parts), u, rtol=0, atol=0)
            assert int(sum((part != 0).int() for part in parts).max()) == 1  # no element in two blocks
        squares = blocks.sums([u.double() ** 2 for u in update])  # |u_b|^2 adds up to |u|^2
        assert float(squares.sum()) == pytest.approx(sum(float(u.double().pow(2).sum()) for u in update), rel=1e-10)
        if grouping == "kinds":
            assert blocks.kinds == product.kinds
        elif grouping == "two":
            assert blocks.kinds == ("embed", "rest")
        else:
            per_layer = [k for k in product.kinds if k in variants.PER_LAYER]
            assert sorted(blocks.kinds) == sorted([f"L{i}.{k}" for i in range(layers) for k in per_layer]
                                                  + [k for k in product.kinds if k not in variants.PER_LAYER])


# --------------------------------------------------------------------------------------------- the step
def train_steps(controller: RhoController, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int):
    for step in range(steps):
        batch = token_batch(batch=4, length=12, seed=10 + step)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        controller.step(batch)
    return [p.detach().clone() for p in model.parameters()]


def run(variants, name: str | None, family: str = "llama", steps: int = 5, lr: float = 0.1, **settings):
    """``steps`` clipped AdamW steps of a tiny model under a study controller of variant ``name`` (``None``: the
    product's ``RhoController``), jvp, every step probed; (weights, controller)."""
    model = tiny_causal_lm(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    settings = {"granularity": "blocks", "estimator": "jvp", "every": 1, **settings}
    if name is None:
        controller = RhoController(model, optimizer, **settings)
    else:
        controller = variants.StudyController(model, optimizer, variant=variants.Variant.parse(name), **settings)
    return train_steps(controller, model, optimizer, steps), controller


def test_kinds_prop2_is_the_product_step_bit_for_bit(variants):
    """``kinds-prop2-r2`` against ``RhoController(granularity="blocks", block_refresh=2)``: the same weights, records."""
    mine, study = run(variants, "kinds-prop2-r2", block_refresh=2)
    theirs, product = run(variants, None, block_refresh=2)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert (study.last.scale, study.last.r_applied) == (product.last.scale, product.last.r_applied)
    assert study.last.block_scales == product.last.block_scales and study.last.block_probes == product.last.block_probes
    assert all("scales" in t for t in study.trace)  # lr 0.1: every step clipped and taken block-wise


@pytest.mark.parametrize("name", ["two-knapsack-r1", "layers-prop-r1", "kinds-sqrt-global-r1", "kinds-prop2-r1-m50",
                                  "kinds-lp-r1-p2"])  # lp: scipy, in [test]
def test_every_variant_is_certified_and_its_bound_holds(variants, name):
    """Each block step: ``r(applied) = c r(w) <= r*`` as measured, ``c s_b <= 1``, and with spreads measured on this
    step (``r1``) the sum bound ``spread_bound(s, D) / pi >= r(w)`` (by jvp at the same weights: the triangle
    inequality). ``p2`` takes one probe more per block step than ``p1``."""
    _, controller = run(variants, name, steps=4)
    blocks = [t for t in controller.trace if "scales" in t]
    assert len(blocks) == 4
    for t in blocks:
        assert t["r_applied"] <= 2.0 * (1 + 1e-9) and t["r_applied"] == pytest.approx(t["c"] * t["r_w"], rel=1e-9)
        assert max(t["scales"].values()) <= 1.0 + 1e-12
        assert t["bound"] >= t["r_w"] * (1 - 1e-6)
    if name.endswith("-p2"):
        _, one_pass = run(variants, name.removesuffix("-p2"), steps=1)
        _, two = run(variants, name, steps=1)
        assert two.trace[0]["probes"] == one_pass.trace[0]["probes"] + 1


# --------------------------------------------------------------------------------------------- the study's runs
@pytest.mark.slow
def test_block_study_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two variants for 4 steps on llama-tiny at a huge rate, then the tables: every step clipped and certified, the
    run files where ``--summarize`` finds them, a rerun trains nothing."""
    study = import_module("block_study")
    argv = ["--output_dir", str(tmp_path), "--presets", "llama-tiny", "--variants", "rho", "layers-knapsack-r2-m25",
            "--learning_rates", "30", "--seeds", "0", "--max_steps", "4", *SMALL_DATA]
    text = study.main(argv)
    row = json.loads((tmp_path / "runs" / "llama-tiny" / "layers-knapsack-r2-m25" / "lr30-seed0.json").read_text())
    trace = row["trace"]
    assert row["method"] == "layers-knapsack-r2-m25" and row["variant"]["mix"] == 0.25
    assert trace["steps"] == 3 and trace["clipped_fraction"] == 1.0  # the warm-up's first step has lr 0: no update and trace["r_applied_max"] <= 2.0 * (1 + 1e-9)
    assert "L0.qk" in trace["block_scale_mean"] and trace["probes_per_step"] > 2
    assert "| layers-knapsack-r2-m25 |" in text and (tmp_path / "summary_blocks.md").is_file()
    assert math.isfinite(row["final_eval_loss"])
    monkeypatch.setattr(study, "run_one", lambda *args: pytest.fail("a finished run was trained again"))
    assert study.main(argv) == text
    assert study.main([*argv, "--summarize"]) == text
