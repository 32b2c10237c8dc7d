"""The fused Triton attention JVP against the float64 eager reference of test_attention_jvp.

Without CUDA the kernel runs in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be set before
``triton`` is first imported (``triton.language``'s own ``@jit`` helpers such as ``tl.max`` are made
at import), and conftest's transformers import already imports it through ``torch._dynamo``; so on
CPU ``test_kernel_in_the_triton_interpreter`` reruns this module in a fresh process with the variable
set, and the kernel tests run there (they are skipped in the outer process only; the launcher
checks that every one of them passed). ``triton`` is in the ``test`` extra (~1 GB installed; the package runs
without it): the kernel tests need it importable; ``triton_available`` and the import without triton are tested everywhere. The
interpreter cannot do bf16 dots (triton-lang/triton#11584), so bf16 is checked on GPU only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from hf_ghosts.probe.attention_jvp import attention_jvp
from hf_ghosts.probe.attention_triton import attention_jvp_triton, triton_available
from tests.references import attention_inputs as inputs
from tests.references import attention_reference as reference
from tests.references import reference_allowed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_RUNS_HERE = HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not KERNEL_RUNS_HERE,
    reason="triton not installed (optional), or on CPU: run by test_kernel_in_the_triton_interpreter in a fresh process",
)
KERNEL_TESTS = 9  # the needs_triton tests below, with their parameters


def run(q, k, v, tq, tk, tv, **kwargs):
    on = [t.to(DEVICE) for t in (q, k, v, tq, tk, tv)]
    for name in ("key_padding", "query_mask"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].to(DEVICE)
    result = attention_jvp_triton(*on, block_m=16, block_n=16, reduce=False, **kwargs)
    return [t.cpu() for t in result]


def check(result, expected, tol) -> None:
    for got, want in zip(result, expected, strict=True):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))  # empty rows: -inf in both
        torch.testing.assert_close(got.double()[finite], want[finite], atol=tol, rtol=tol)


@needs_triton
def test_causal_padding_gqa_and_a_fully_masked_row() -> None:
    q, k, v, tq, tk, tv = (t.float() for t in inputs(batch=2, heads=2, kv_heads=1, q_len=20, dim=16))
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[0, :3] = False  # left padding: queries 0..2 of sequence 0 see nothing
    pad[1, 17:] = False
    rows = pad.clone()
    expected = reference(q, k, v, tq, tk, tv, reference_allowed(2, 2, 20, 20, key_padding=pad), scaling=0.25, query_mask=rows)
    result = run(q, k, v, tq, tk, tv, scaling=0.25, key_padding=pad, query_mask=rows)
    check(result, expected, tol=1e-5)
    assert torch.equal(result[0][0, :3], torch.zeros_like(result[0][0, :3]))


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize(
    ("kv_heads", "causal", "window", "q_len", "k_len"),
    [(4, True, None, 33, 33), (2, True, 5, 33, 33), (1, False, None, 18, 25), (2, True, None, 9, 30)],
)
def test_against_float64_reference(kv_heads, causal, window, q_len, k_len) -> None:
    q, k, v, tq, tk, tv = (t.float() for t in inputs(2, 4, kv_heads, q_len, k_len, dim=24))  # D = 24: padded to 32
    pad = torch.ones(2, k_len, dtype=torch.bool)
    pad[1, :4] = False
    allowed = reference_allowed(2, 4, q_len, k_len, causal=causal, window=window, key_padding=pad)
    expected = reference(q, k, v, tq, tk, tv, allowed, scaling=0.2)
    result = run(q, k, v, tq, tk, tv, scaling=0.2, causal=causal, sliding_window=window, key_padding=pad)
    check(result, expected, tol=1e-5)


@pytest.mark.slow
@needs_triton
def test_float16_against_float32_reference() -> None:
    """fp16 tiles (fp32 accumulators) within 1% of the largest magnitude of the reference."""
    q, k, v, tq, tk, tv = inputs(2, 2, 1, 40, dim=16)
    expected = reference(q, k, v, tq, tk, tv, reference_allowed(2, 2, 40, 40), scaling=0.25)
    result = run(*(t.half() for t in (q, k, v, tq, tk, tv)), scaling=0.25)
    assert result[0].dtype == torch.float16 and result[2].dtype == torch.float32
    for got, want in zip(result, expected, strict=True):
        assert (got.double() - want).abs().max() / want.abs().max() < 0.01


@needs_triton
def test_the_probe_through_the_kernel_matches_the_blocked_path(monkeypatch) -> None:
    """The glue: a jvp probe of a padded tiny llama with the kernel taken wherever it applies (here forced, on CPU
    under the interpreter) reports what the blocked path reports; the causal & padding mask went in as key padding."""
    import hf_ghosts.probe.attention as ghosts
    from hf_ghosts import RadiusProbe
    from tests.helpers import random_direction, tiny_causal_lm, token_batch

    model = tiny_causal_lm("llama").to(DEVICE)
    batch = {key: value.to(DEVICE) for key, value in token_batch(length=20, pad_left=4).items()}
    direction = {name: t.to(DEVICE) for name, t in random_direction(model).items()}
    probe = RadiusProbe(model, ("output", "attention"), "jvp")
    blocked = probe.measure(batch, direction)
    assert probe.attention_kernels == ("blocked",) or DEVICE == "cuda"
    monkeypatch.setattr(ghosts, "triton_available", lambda q, softcap=None, attention_mask=None: attention_mask is None)
    fused = probe.measure(batch, direction)
    assert probe.attention_kernels == ("triton",)
    torch.testing.assert_close(fused.attn_spread, blocked.attn_spread, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.out_spread, blocked.out_spread, rtol=1e-5, atol=0)


# (heads, kv_heads, q_len, k_len, causal, window): GQA throughout, one query block longer than the keys' offset
MASK_CASES = [(4, 2, 20, 20, True, None), (4, 1, 20, 20, True, 5), (2, 2, 9, 14, False, None), (4, 2, 9, 20, True, 4)]


@needs_triton
def test_every_attention_path_sees_the_keys_of_one_reference_mask() -> None:
    """The allowed-keys rule (hf_ghosts.probe.masks) as each path applies it, against ``reference_allowed`` (the
    definition, loop by loop): the eager capture, the path of fd's forwards, here in forward mode to compare tangents
    too (no mask given: the rule makes it; with padding it is handed transformers' 4-D mask instead), the blocked JVP
    and the Triton kernel (key padding beside the rule)."""
    import types

    import torch.autograd.forward_ad as fwAD

    from hf_ghosts.probe.attention import Pass, ScoreCapture, _eager_capture

    for heads, kv_heads, q_len, k_len, causal, window in MASK_CASES:
        q, k, v, tq, tk, tv = inputs(2, heads, kv_heads, q_len, k_len, dim=16)
        pad = torch.ones(2, k_len, dtype=torch.bool)
        pad[0, :3], pad[1, k_len - 2 :] = False, False  # left padding in one sequence, right in the other
        options = dict(causal=causal, window=window)

        # eager: no mask given, the keys the rule allows
        expected = reference(q, k, v, tq, tk, tv, reference_allowed(2, heads, q_len, k_len, **options), scaling=0.3)
        capture = ScoreCapture(Pass.JVP)
        with fwAD.dual_level():
            dual = [fwAD.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))]
            module = types.SimpleNamespace(is_causal=causal, layer_idx=0)
            out = fwAD.unpack_dual(_eager_capture(capture, module, *dual, None, 0.3, None, window))
        torch.testing.assert_close(out.primal, expected[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.tangent, expected[1], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(capture.spreads[0].double(), expected[2].amax(dim=(0, 2)), atol=1e-6, rtol=1e-6)

        # blocked and Triton: the rule and key padding
        allowed = reference_allowed(2, heads, q_len, k_len, key_padding=pad, **options)
        expected = reference(q, k, v, tq, tk, tv, allowed, scaling=0.3)
        rule = dict(causal=causal, sliding_window=window, key_padding=pad)
        blocked = attention_jvp(q, k, v, tq, tk, tv, scaling=0.3, block_size=4, reduce=False, **rule)
        check(blocked, expected, tol=1e-6)  # the spread in fp32, as the eager capture's
        check(run(*(t.float() for t in (q, k, v, tq, tk, tv)), scaling=0.3, **rule), expected, tol=1e-5)


@pytest.mark.gpu
def test_bfloat16_kernel_matches_blocked_path_on_gpu() -> None:
    q, k, v, tq, tk, tv = (t.to("cuda", torch.bfloat16) for t in inputs(4, 8, 2, 300, dim=64))
    pad = torch.ones(4, 300, dtype=torch.bool, device="cuda")
    pad[0, :50] = False
    assert triton_available(q)
    fused = attention_jvp_triton(q, k, v, tq, tk, tv, scaling=0.125, key_padding=pad)
    blocked = attention_jvp(*(t.float() for t in (q, k, v, tq, tk, tv)), scaling=0.125, key_padding=pad)
    for got, want in zip(fused, blocked, strict=True):
        assert (got.float() - want).abs().max() / want.abs().max() < 0.02


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or KERNEL_RUNS_HERE, reason="triton not installed, or the kernel tests run in this process")
def test_kernel_in_the_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not in_the_triton_interpreter and not without_triton"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env, check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "skipped" not in summary and "failed" not in summary, summary
    assert f"{KERNEL_TESTS + 1} passed" in summary, summary  # the kernel tests and triton_available


def test_triton_available_says_when_the_kernel_applies() -> None:
    q = torch.zeros(1, 2, 4, 16)
    assert not triton_available(q)  # a CPU tensor: the blocked path
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        q = q.cuda()
        assert triton_available(q) and triton_available(q.half())
    assert not triton_available(q, softcap=30.0)
    assert not triton_available(q, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert not triton_available(q.double())
    assert not triton_available(torch.zeros(1, 2, 4, 256, device=q.device))


@pytest.mark.slow
def test_package_imports_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from hf_ghosts.probe.attention_triton import triton_available\n"
        "assert not triton_available(torch.zeros(1, 1, 2, 8))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "ok", done.stderr[-2000:]


@needs_triton
def test_bad_blocks_raise() -> None:
    q, k, v, tq, tk, tv = (t.float() for t in inputs(1, 2, 2, 4))
    with pytest.raises(ValueError, match="attention_jvp_triton: block_m must be a power of two"):
        attention_jvp_triton(q, k, v, tq, tk, tv, block_m=24)
