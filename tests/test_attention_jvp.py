"""The blocked attention JVP against an explicit float64 eager attention differentiated by torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_ghosts.probe.attention_jvp import attention_jvp, query_blocks
from tests.references import attention_inputs as inputs
from tests.references import attention_reference as reference
from tests.references import reference_allowed


def assert_matches(result, expected, reduce=True, tol=1e-10):
    out, tangent, rows = expected
    torch.testing.assert_close(result.out.double(), out, atol=tol, rtol=tol)
    torch.testing.assert_close(result.tangent.double(), tangent, atol=tol, rtol=tol)
    wanted = rows.amax(-1) if reduce else rows
    # the spread is fp32 (as the eager capture's), each end rounded before the difference
    torch.testing.assert_close(result.spread.double(), wanted, atol=max(tol, 1e-6), rtol=max(tol, 1e-6))


@pytest.mark.parametrize("block_size", [1, 4, 7, 64])
def test_causal_matches_float64_reference(block_size: int) -> None:
    q, k, v, tq, tk, tv = inputs()
    allowed = reference_allowed(2, 4, 9, 9)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.3, block_size=block_size, reduce=False)
    assert_matches(result, reference(q, k, v, tq, tk, tv, allowed, scaling=0.3), reduce=False)


def test_query_blocks_cover_the_causal_key_ranges() -> None:
    blocks = list(query_blocks(5, 7, 2, causal=True, sliding_window=3))
    # query i at position i + 2; causal window 3: keys i..i + 2
    assert blocks == [(0, 2, 0, 4), (2, 4, 2, 6), (4, 5, 4, 7)]
    assert list(query_blocks(3, 3, 2, causal=False, sliding_window=None)) == [(0, 2, 0, 3), (2, 3, 0, 3)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("form", ["key_padding", "bool", "additive"])
def test_padding_and_fully_masked_rows(side: str, form: str) -> None:
    q, k, v, tq, tk, tv = inputs(batch=3)
    pad = torch.ones(3, 9, dtype=torch.bool)
    if side == "left":
        pad[0, :3] = False  # queries 0..2 of sequence 0 see no key at all
    else:
        pad[0, 6:] = False
    pad[1, :] = False  # a sequence of padding only: its [B, H] spread is -inf
    allowed = reference_allowed(3, 4, 9, 9, key_padding=pad)
    kwargs = {"key_padding": pad}
    if form != "key_padding":
        mask = allowed[:, :1]
        if form == "additive":
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
        kwargs = {"attention_mask": torch.cat([mask, mask[..., :2]], dim=-1)}  # longer masks are cut to Tk
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.4, block_size=4, reduce=False, **kwargs)
    expected = reference(q, k, v, tq, tk, tv, allowed, scaling=0.4)
    assert_matches(result, expected, reduce=False)
    if side == "left":
        assert torch.equal(result.out[0, :3], torch.zeros_like(result.out[0, :3]))
        assert torch.equal(result.tangent[0, :3], torch.zeros_like(result.tangent[0, :3]))
        assert torch.isneginf(result.spread[0, :, :3]).all()
    reduced = attention_jvp(q, k, v, tq, tk, tv, scaling=0.4, block_size=4, **kwargs).spread
    assert torch.isneginf(reduced[1]).all() and torch.isfinite(reduced[[0, 2]]).all()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_additive_mask_values_are_added_to_the_scores(kv_heads: int) -> None:
    """An additive float mask carries a bias (ALiBi: ``-slope_h * distance``) that sdpa adds to the scores: it moves
    the probabilities, hence the output and its tangent, and not the score slopes."""
    q, k, v, tq, tk, tv = inputs(batch=2, kv_heads=kv_heads)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :2] = False
    allowed = reference_allowed(2, 4, 9, 9, key_padding=pad)
    slopes = torch.tensor([0.5, 0.25, 0.125, 1.0], dtype=torch.float64)[None, :, None, None]
    distance = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).clamp_min(0).double()
    bias = (-slopes * distance).expand(2, 4, 9, 9)
    mask = bias.masked_fill(~allowed, torch.finfo(torch.float64).min)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.4, block_size=4, reduce=False, causal=False,
                           attention_mask=mask)
    expected = reference(q, k, v, tq, tk, tv, allowed, scaling=0.4, bias=bias)
    assert_matches(result, expected, reduce=False)
    unbiased = reference(q, k, v, tq, tk, tv, allowed, scaling=0.4)
    assert (result.out.double() - unbiased[0]).abs().max() > 1e-2  # the bias matters: the check above can fail


@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window(window: int) -> None:
    q, k, v, tq, tk, tv = inputs(q_len=11)
    allowed = reference_allowed(2, 4, 11, 11, window=window)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.5, sliding_window=window, block_size=3, reduce=False)
    assert_matches(result, reference(q, k, v, tq, tk, tv, allowed, scaling=0.5), reduce=False)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_attention(kv_heads: int) -> None:
    q, k, v, tq, tk, tv = inputs(kv_heads=kv_heads)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :2] = False
    allowed = reference_allowed(2, 4, 9, 9, key_padding=pad)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.3, key_padding=pad, block_size=4, reduce=False)
    assert_matches(result, reference(q, k, v, tq, tk, tv, allowed, scaling=0.3), reduce=False)
    # a per-head mask ([B, H, Tq, Tk]) is grouped the same way as the heads
    per_head = allowed.clone()
    per_head[:, 1, :, 0] = False  # head 1 is group 0's second head: (kv, g) order, not (g, kv)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.3, attention_mask=per_head, block_size=4, reduce=False)
    assert_matches(result, reference(q, k, v, tq, tk, tv, per_head, scaling=0.3), reduce=False)


def test_softcap_spread_is_of_the_capped_scores() -> None:
    q, k, v, tq, tk, tv = inputs(kv_heads=2)
    q = 3 * q  # scores of order softcap: the cap bends them
    allowed = reference_allowed(2, 4, 9, 9)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.5, softcap=2.0, block_size=4, reduce=False)
    expected = reference(q, k, v, tq, tk, tv, allowed, scaling=0.5, softcap=2.0)
    assert_matches(result, expected, reduce=False)
    uncapped = reference(q, k, v, tq, tk, tv, allowed, scaling=0.5)[2]
    assert not torch.allclose(expected[2], uncapped, rtol=0.05)  # the test can tell the two apart


def test_query_mask_offset_keys_and_non_causal() -> None:
    q, k, v, tq, tk, tv = inputs(q_len=5, k_len=8)
    rows = torch.tensor([[True, False, True, True, False], [False] * 5])
    allowed = reference_allowed(2, 4, 5, 8)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.3, query_mask=rows, block_size=2, reduce=False)
    assert_matches(result, reference(q, k, v, tq, tk, tv, allowed, scaling=0.3, query_mask=rows), reduce=False)
    assert torch.isneginf(result.spread[1]).all()
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, 5:] = False
    allowed = reference_allowed(2, 4, 5, 8, causal=False, key_padding=pad)
    result = attention_jvp(q, k, v, tq, tk, tv, scaling=0.3, causal=False, key_padding=pad, block_size=2)
    assert_matches(result, reference(q, k, v, tq, tk, tv, allowed, scaling=0.3))


@pytest.mark.parametrize("missing", ["tq", "tk", "tv", "tq+tk"])
def test_missing_tangents_are_zero(missing: str) -> None:
    q, k, v, tq, tk, tv = inputs(kv_heads=2)
    given = {"tq": tq, "tk": tk, "tv": tv}
    for name in missing.split("+"):
        given[name] = None
    zeros = [torch.zeros_like(t) if given[n] is None else t for n, t in (("tq", tq), ("tk", tk), ("tv", tv))]
    allowed = reference_allowed(2, 4, 9, 9)
    result = attention_jvp(q, k, v, given["tq"], given["tk"], given["tv"], scaling=0.3, block_size=4, reduce=False)
    assert_matches(result, reference(q, k, v, *zeros, allowed, scaling=0.3), reduce=False)


def test_bfloat16_against_float32_reference() -> None:
    """bf16 blocks (fp32 softmax) stay within 1% of the largest magnitude of an fp32 reference (seen: <= 0.7%)."""
    q, k, v, tq, tk, tv = inputs(batch=2, heads=4, kv_heads=2, q_len=40, dim=16)
    allowed = reference_allowed(2, 4, 40, 40)
    expected = reference(q.float(), k.float(), v.float(), tq.float(), tk.float(), tv.float(), allowed, scaling=0.25)
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v, tq, tk, tv)]
    result = attention_jvp(*bf16, scaling=0.25, block_size=16, reduce=False)
    assert result.out.dtype == result.tangent.dtype == torch.bfloat16 and result.spread.dtype == torch.float32
    for got, want in zip(result, expected, strict=True):
        want = want.float()
        error = (got.float() - want).abs().max() / want.abs().max()
        assert error < 0.01, error


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, torch.dtype | None, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, tuple | list) else (result,)
        for output in outputs:
            if isinstance(output, torch.Tensor):
                self.ops.append((str(func), output.dtype, output.numel()))
            else:
                self.ops.append((str(func), None, 0))
        return result


def test_no_full_score_tensor_and_no_host_sync() -> None:
    batch, heads, length = 2, 4, 64
    q, k, v, tq, tk, tv = (t.to(torch.bfloat16) for t in inputs(batch, heads, 2, length, dim=16))
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[0, :5] = False
    rows = torch.ones(batch, length, dtype=torch.bool)
    with _Recorder() as recorder:
        attention_jvp(q, k, v, tq, tk, tv, scaling=0.25, key_padding=pad, query_mask=rows, sliding_window=40, block_size=16)
    full = batch * heads * length * length
    biggest = max(numel for _, dtype, numel in recorder.ops if dtype == torch.float32)
    assert biggest <= full // 4, (biggest, full)
    syncs = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.nonzero.default"}
    assert not [op for op, _, _ in recorder.ops if op in syncs]
    assert "aten.repeat_interleave" not in " ".join(op for op, _, _ in recorder.ops)


def test_bad_shapes_raise() -> None:
    q, k, v, tq, tk, tv = inputs(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="attention_jvp: q \\[B, H, Tq, D\\]"):
        attention_jvp(q, k, v, tq, tk, tv)
    q, k, v, tq, tk, tv = inputs()
    with pytest.raises(ValueError, match="key_padding must be"):
        attention_jvp(q, k, v, tq, tk, tv, key_padding=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tk must have the shape"):
        attention_jvp(q, k, v, tq, tk[:, :, 1:], tv)
