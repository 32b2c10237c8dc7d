"""A jvp probe at speed: no host sync of its own, no float32 ``[B, H, T, T]``, the blocked attention JVP equal to the
eager capture in float64, and the report along ``d`` rescaled by ``|d|`` equal to the one along ``d / |d|``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from hf_ghosts import RadiusProbe
from hf_ghosts.probe.attention import Kernel, Pass, ScoreCapture, _eager_capture, _jvp_capture
from tests.helpers import random_direction, tiny_causal_lm, token_batch

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 160  # > the blocked path's 128 query rows per block: the whole [B, H, T, T] would be one tensor otherwise


def host_syncs(run) -> int:
    """How many ``aten::_local_scalar_dense`` (a tensor read on the host: ``.item()``, ``float()``, ``if t:``)
    ``run()`` performs, by the CPU profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key == "aten::_local_scalar_dense")


class LargestFloat32(TorchDispatchMode):
    """The float32 outputs of every op run under it whose size is at least ``limit`` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.numel() >= self.limit:
                self.seen.append((str(func), tuple(tensor.shape)))
        return out


def probe_and_batch(family: str, pad_left: int) -> tuple[RadiusProbe, dict, dict, torch.nn.Module]:
    model = tiny_causal_lm(family, max_position_embeddings=LENGTH)
    batch = token_batch(length=LENGTH, pad_left=pad_left)
    return RadiusProbe(model, ("output", "attention"), "jvp"), batch, random_direction(model), model


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("pad_left", [0, 5])
def test_a_jvp_probe_makes_no_host_sync_given_the_norm_and_one_without(family: str, pad_left: int) -> None:
    probe, batch, direction, _ = probe_and_batch(family, pad_left)
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
    assert host_syncs(lambda: probe.measure(batch, direction, norm=norm)) == 0
    assert host_syncs(lambda: probe.measure(batch, direction)) == 1  # |d|, checked finite and non-zero


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_jvp_probe_never_builds_a_float32_batch_heads_t_t_tensor(family: str) -> None:
    probe, batch, direction, model = probe_and_batch(family, pad_left=5)
    heads = model.config.num_attention_heads
    watch = LargestFloat32(limit=batch["input_ids"].shape[0] * heads * LENGTH * LENGTH)
    with watch:
        probe.measure(batch, direction, norm=1.0)
    assert watch.seen == []
    # the watch sees one: the fd probe's eager attention builds them
    fd = LargestFloat32(limit=watch.limit)
    with fd:
        RadiusProbe(model, ("output", "attention"), "fd").measure(batch, direction, norm=1.0)
    assert any(shape[-2:] == (LENGTH, LENGTH) for _, shape in fd.seen)


def dual(generator: torch.Generator, *shape: int) -> torch.Tensor:
    primal = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return fwAD.make_dual(primal, torch.randn(*shape, generator=generator, dtype=torch.float64))


class Module(torch.nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal, self.layer_idx = causal, 0


@pytest.mark.parametrize(
    "case", ["causal", "window", "padding_mask", "bidirectional_mask", "softcap", "not_causal", "query_mask"]
)
def test_the_blocked_jvp_capture_equals_the_eager_capture_in_float64(case: str) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 150, 8
    mask = window = softcap = query_mask = None
    if case == "padding_mask":  # a materialized causal & padding mask, as transformers' sdpa_mask makes it
        keys = torch.ones(batch, length, dtype=torch.bool)
        keys[1, :7] = False
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    elif case == "bidirectional_mask":
        mask = torch.rand(batch, 1, length, length, generator=generator) > 0.3
        mask[0, 0, 3] = False  # a query that sees nothing
    window = 17 if case == "window" else None
    softcap = 2.0 if case == "softcap" else None
    if case == "query_mask":
        query_mask = torch.rand(batch, length, generator=generator) > 0.2
    module = Module(causal=case != "not_causal")
    with fwAD.dual_level():
        query = dual(generator, batch, heads, length, dim)
        key, value = dual(generator, batch, kv_heads, length, dim), dual(generator, batch, kv_heads, length, dim)
        results = {}
        for name, path in (("eager", _eager_capture), ("blocked", _jvp_capture)):
            capture = ScoreCapture(Pass.JVP, query_mask)
            out = path(capture, module, query, key, value, mask, 0.3, softcap, window)
            results[name] = (*fwAD.unpack_dual(out), capture.spreads[0], capture)
    (out, tangent, spread, _), (out_b, tangent_b, spread_b, capture) = results["eager"], results["blocked"]
    assert capture.kernels == {Kernel.BLOCKED}
    torch.testing.assert_close(out_b, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent_b, tangent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spread_b, spread, rtol=1e-6, atol=0)  # float32 spreads, as the eager capture's


def test_a_zero_tangent_gives_zero_spreads_and_nan_propagates() -> None:
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 2, 9, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    capture = ScoreCapture(Pass.JVP)
    with fwAD.dual_level():
        out = _jvp_capture(capture, Module(True), query, key, value, None, None, None)
        assert fwAD.unpack_dual(out).tangent is None
        assert torch.equal(capture.spreads[0], torch.zeros(2))
        broken = torch.zeros_like(key)
        broken[0, 1, 2, 0] = math.nan
        second = Module(True)
        second.layer_idx = 1
        _jvp_capture(capture, second, query, fwAD.make_dual(key, broken), value, None, None, None)
    assert torch.isnan(capture.spreads[1][1]) and capture.spreads[1][0] == 0


def test_flat_buffer_casts_like_to_and_keeps_its_storage() -> None:
    from hf_ghosts.probe.buffers import FlatBuffer

    generator = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(4, 5, generator=generator), "b": torch.randn(7, generator=generator)}
    buffer = FlatBuffer(torch.bfloat16)
    first = buffer.fill(tensors)
    assert all(torch.equal(first[name], t.to(torch.bfloat16)) for name, t in tensors.items())
    pointer = first["a"].untyped_storage().data_ptr()
    assert first["b"].untyped_storage().data_ptr() == pointer  # one buffer
    moved = {name: t + 1 for name, t in tensors.items()}
    second = buffer.fill(moved)  # refilled in place: no new allocation
    assert second["a"].untyped_storage().data_ptr() == pointer
    assert all(torch.equal(second[name], t.to(torch.bfloat16)) for name, t in moved.items())
    other = buffer.fill({"c": torch.ones(3)})  # another layout: a buffer of its own
    assert other["c"].untyped_storage().data_ptr() != pointer and torch.equal(other["c"], torch.ones(3, dtype=torch.bfloat16))


def test_a_bf16_probe_reads_fp32_weights_and_direction_from_two_flat_buffers() -> None:
    model = tiny_causal_lm("llama")
    probe = RadiusProbe(model, ("output", "attention"), "jvp", dtype="bfloat16")
    direction = random_direction(model)
    weights = probe._weights(None)
    pieces, _ = probe._direction_and_norm(direction, norm=1.0)
    for got, source in ((weights, dict(model.named_parameters())), (pieces, direction)):
        assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1
        assert all(torch.equal(got[name], t.detach().to(torch.bfloat16)) for name, t in source.items())
    # in the parameters' own dtype nothing is copied: the tensors are the caller's
    same = RadiusProbe(model, ("output",), "jvp")
    pieces, _ = same._direction_and_norm(direction, norm=1.0)
    assert all(pieces[name] is direction[name] or pieces[name].data_ptr() == direction[name].data_ptr() for name in direction)
