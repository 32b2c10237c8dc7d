"""hf_ghosts.radii.step: r = |u| / rho, the clip / set scale and |u|, against hand values and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from hf_ghosts import radii
from tests.helpers import randn64

pytestmark = pytest.mark.usefixtures("single_thread")


def test_normalized_step_values() -> None:
    torch.testing.assert_close(normalized := radii.normalized_step(torch.tensor([0.5, 2.0, 0.0]), torch.tensor([1.0, 0.5, 3.0])), torch.tensor([0.5, 4.0, 0.0]))
    assert normalized.dtype == torch.float32
    assert radii.normalized_step(3.0, 1.5).item() == 2.0
    assert radii.normalized_step(3.0, math.inf).item() == 0.0


@pytest.mark.parametrize(("update_norm", "rho"), [(-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (math.nan, 1.0), (1.0, math.nan)])
def test_normalized_step_of_invalid_input_is_nan(update_norm: float, rho: float) -> None:
    assert math.isnan(radii.normalized_step(update_norm, rho).item())
    for mode in radii.CLIP_MODES:  # never the scale 1 of a zero step: the NaN reaches the caller
        assert math.isnan(radii.clip_scale(update_norm, rho, mode=mode).item())
    batch = radii.normalized_step(torch.tensor([update_norm, 2.0]), torch.tensor([rho, 4.0]))
    assert math.isnan(batch[0].item()) and batch[1].item() == 0.5


def test_clip_scale_hand_values() -> None:
    assert radii.clip_scale(4.0, 1.0).item() == 0.25
    assert radii.clip_scale(0.5, 1.0).item() == 1.0
    assert radii.clip_scale(0.5, 1.0, mode="set").item() == 2.0
    assert radii.clip_scale(4.0, 1.0, r_target=2.0).item() == 0.5


def test_clip_scale_invariants() -> None:
    norms = torch.exp(randn64(200, seed=15, scale=3)).abs()
    rho = torch.exp(randn64(200, seed=16, scale=3)).abs()
    for target in (0.25, 1.0, 3.0):
        scale = radii.clip_scale(norms, rho, r_target=target)
        applied = radii.normalized_step(norms * scale, rho)
        assert (scale <= 1).all()
        assert (applied <= target * (1 + 1e-12)).all()
        # inside the target the step is untouched; outside it lands exactly on the target
        inside = radii.normalized_step(norms, rho) <= target
        assert (scale[inside] == 1).all()
        torch.testing.assert_close(applied[~inside], torch.full_like(applied[~inside], target), rtol=1e-12, atol=0)
        # clipping twice changes nothing
        again = radii.clip_scale(norms * scale, rho, r_target=target)
        torch.testing.assert_close(again, torch.ones_like(again), rtol=1e-12, atol=0)
        # "set" gives exactly r_target, whether it shrinks or grows the step
        exact = radii.normalized_step(norms * radii.clip_scale(norms, rho, r_target=target, mode="set"), rho)
        torch.testing.assert_close(exact, torch.full_like(exact, target), rtol=1e-12, atol=0)


def test_clip_scale_zero_update_and_infinite_radius_give_one() -> None:
    for mode in radii.CLIP_MODES:
        assert radii.clip_scale(0.0, 1.0, mode=mode).item() == 1.0
        assert radii.clip_scale(5.0, math.inf, mode=mode).item() == 1.0


def test_clip_scale_validates_mode_and_target() -> None:
    with pytest.raises(ValueError, match=r"clip_scale: mode must be one of \('clip', 'set'\); got 'clamp'"):
        radii.clip_scale(1.0, 1.0, mode="clamp")
    for target in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="r_target"):
            radii.clip_scale(1.0, 1.0, r_target=target)



def test_update_norm_is_the_float64_norm_of_the_concatenation() -> None:
    tensors = [randn64(3, 4, seed=50).float(), randn64(7, seed=51, scale=1e3).float(), torch.zeros(2)]
    expected = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    norm = radii.update_norm(tensors)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(expected, rel=1e-6)
    assert radii.update_norm([torch.tensor([3.0]), torch.tensor([4.0])]).item() == 5.0
    assert radii.update_norm([]).item() == 0.0
    assert math.isnan(radii.update_norm([torch.tensor([1.0, math.nan])]).item())


@pytest.mark.parametrize("rho", [2.0, math.inf, 1e-30])
def test_check_radius_passes_a_radius(rho: float) -> None:
    assert radii.check_radius(rho, "caller") == rho


@pytest.mark.parametrize("rho", [math.nan, 0.0, -1.0, -math.inf])
def test_check_radius_names_the_caller_and_the_value(rho: float) -> None:
    with pytest.raises(ValueError, match=rf"^caller: the measured radius is {rho!r}, .*contain NaN or inf"):
        radii.check_radius(rho, "caller")


# ----------------------------------------------------------------------------- block-wise steps
def bisected_allocation(decrease: list[float], cost: list[float], budget: float) -> list[float]:
    """An independent solution of ``max sum_b d_b sqrt(s_b)``, ``sum_b s_b c_b <= B``, ``0 <= s <= 1``: by KKT the paid
    blocks (``d > 0, c > 0``) have ``s_b(lam) = min(1, (d_b / (lam c_b))^2)``; ``lam`` by bisection on the budget."""
    paid = [d > 0 and c > 0 for d, c in zip(decrease, cost, strict=True)]

    def scales(lam: float) -> list[float]:
        return [(1.0 if lam <= d / c else (d / c / lam) ** 2) if ok else float(d > 0)
                for d, c, ok in zip(decrease, cost, paid, strict=True)]

    def used(lam: float) -> float:
        return sum(s * c for s, c, ok in zip(scales(lam), cost, paid, strict=True) if ok)

    ratios = [d / c for d, c, ok in zip(decrease, cost, paid, strict=True) if ok]
    if not ratios or used(min(ratios)) <= budget:  # every paid block whole
        return scales(min(ratios, default=1.0))
    low, high = min(ratios), max(ratios) * 1e12
    for _ in range(3000):
        middle = math.sqrt(low * high) if high / low > 4 else (low + high) / 2
        low, high = (middle, high) if used(middle) > budget else (low, middle)
    return scales(high)


def utility(scales: torch.Tensor, decrease: torch.Tensor) -> float:
    return float((decrease.clamp_min(0) * scales.clamp_min(0).sqrt()).sum())


@pytest.mark.parametrize("seed", range(40))
def test_block_allocation_is_the_optimum_of_its_objective(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = 1 + seed % 7
    decrease = torch.randn(n, generator=generator, dtype=torch.float64)
    cost = torch.rand(n, generator=generator, dtype=torch.float64) * 3
    cost[torch.rand(n, generator=generator) < 0.2] = 0.0  # some blocks move nothing that bends
    budget = float(torch.rand((), generator=generator, dtype=torch.float64) * cost.sum() * 1.2)
    scales = radii.block_allocation(decrease, cost, budget)
    assert scales.dtype == torch.float64 and bool(((scales >= 0) & (scales <= 1)).all())
    assert float(scales @ cost) <= budget * (1 + 1e-9) + 1e-12
    assert bool((scales[decrease <= 0] == 0).all())  # a block that would raise the loss is not taken
    assert bool((scales[(decrease > 0) & (cost == 0)] == 1).all())  # a free block that lowers it is taken whole
    expected = torch.tensor(bisected_allocation(decrease.tolist(), cost.tolist(), budget), dtype=torch.float64)
    torch.testing.assert_close(scales, expected, rtol=1e-7, atol=1e-9)
    for _ in range(50):  # no feasible point does better
        other = torch.rand(n, generator=generator, dtype=torch.float64)
        other = other * min(1.0, budget / max(float(other @ cost), 1e-300))
        assert utility(other, decrease) <= utility(scales, decrease) * (1 + 1e-9) + 1e-12


def test_block_allocation_closed_forms() -> None:
    # below the caps the budget is shared as d^2 / c: s_b c_b = B (d_b^2 / c_b) / sum (d^2 / c)
    torch.testing.assert_close(radii.block_allocation(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0]), 1.0),
                               torch.tensor([8 / 9, 1 / 18], dtype=torch.float64))
    # a capped block leaves the rest of the budget to the others: [2, 1] at cost 1 each, budget 1.5 -> [1, 0.5]
    torch.testing.assert_close(radii.block_allocation(torch.tensor([2.0, 1.0]), torch.ones(2), 1.5),
                               torch.tensor([1.0, 0.5], dtype=torch.float64))
    # budget above every cost: every positive block whole, the rest 0
    torch.testing.assert_close(radii.block_allocation(torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.ones(4), 10.0),
                               torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # no budget (or a negative one): only the free blocks
    torch.testing.assert_close(radii.block_allocation(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), -3.0),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="block_allocation: expects decrease and cost of one shape"):
        radii.block_allocation(torch.ones(3), torch.ones(2), 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_spread_bound_bounds_the_spread_of_the_sum(seed: int) -> None:
    """The certificate the block step relies on: the spread of ``sum_b s_b a_b`` (slopes per class, per instance)
    is at most ``spread_bound(s, D)``, ``D_bj`` the spread of ``a_b`` on instance ``j``; the bound as its definition."""
    slopes = randn64(4, 3, 11, seed=seed)  # [blocks, instances, classes]
    spreads = slopes.amax(-1) - slopes.amin(-1)
    scales = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    combined = torch.einsum("b,bjk->jk", scales, slopes)
    bound = radii.spread_bound(scales, spreads)
    assert float((combined.amax(-1) - combined.amin(-1)).max()) <= float(bound) * (1 + 1e-12)
    assert float(bound) == pytest.approx(max(sum(float(scales[b] * spreads[b, j]) for b in range(4)) for j in range(3)))
    assert float(radii.spread_bound(scales, spreads[:, :0])) == 0.0
    with pytest.raises(ValueError, match=r"spread_bound: expects scales \[blocks\]"):
        radii.spread_bound(scales[:3], spreads)


def test_block_scale_up() -> None:
    assert radii.block_scale_up(2.0, 1.0, 0.25) == 2.0  # up to the target: r(c w) = 2
    assert radii.block_scale_up(2.0, 1.0, 0.8) == 1.25  # never past the optimizer's own step: c * 0.8 = 1
    assert radii.block_scale_up(2.0, 5.0, 1.0) == 0.4  # down to the target where the bound was exceeded
    assert radii.block_scale_up(2.0, 0.0, 0.5) == 2.0  # nothing bends along w
    for bad in ((2.0, 1.0, 0.0), (2.0, math.nan, 1.0), (0.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="block_scale_up: expects"):
            radii.block_scale_up(*bad)
