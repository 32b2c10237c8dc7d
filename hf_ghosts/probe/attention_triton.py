"""A fused Triton attention JVP on CUDA: output, tangent and score-slope spread in one pass over the keys.

Same quantities and semantics as :func:`hf_ghosts.probe.attention_jvp.attention_jvp` (see there), computed
flash-attention style: per query block, an online softmax over key blocks that also carries the
tangent accumulators and the running max / min of ``tS`` (``tS = scaling (tq k^T + q tk^T)``);
see :mod:`hf_ghosts.probe._attention_triton_kernel`. Nothing of size ``T x T`` is ever stored.

Supported: causal or not, sliding window (causal), key padding ``[B, Tk]``, a query mask for the
spread, GQA (``H = g Hkv``), fp16 / bf16 / fp32 (fp32 dots in IEEE precision). Not supported: softcap
and arbitrary 4-D masks; :func:`triton_available` says so and callers take the blocked path.
``triton`` is imported only when the kernel runs (the package imports without it).
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache

import torch

from hf_ghosts.probe.attention_jvp import AttentionJvp, validate_attention_inputs

__all__ = ["attention_jvp_triton", "triton_available"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


@cache
def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


def triton_available(
    q: torch.Tensor, *, softcap: float | None = None, attention_mask: torch.Tensor | None = None
) -> bool:
    """Whether :func:`attention_jvp_triton` applies: CUDA tensor, ``triton`` importable, no softcap,
    no 4-D mask (express padding as ``key_padding``), fp16/bf16/fp32, head dim ``<= 128``."""
    return (
        q.is_cuda
        and softcap is None
        and attention_mask is None
        and q.dtype in _DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and _triton_importable()
    )


def _as_flag(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.empty(1, dtype=torch.int8, device=like.device)  # never read (HAS_* is False)
    return mask.to(device=like.device, dtype=torch.int8).contiguous()


def attention_jvp_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    *,
    scaling: float | None = None,
    causal: bool = True,
    key_padding: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    reduce: bool = True,
) -> AttentionJvp:
    """Fused attention JVP; arguments, layouts and the ``-inf`` convention as :func:`attention_jvp`.

    ``block_m`` / ``block_n``: query / key rows per tile (powers of two, ``>= 16``). The spread is
    written per row (``[B, H, Tq]`` fp32) and reduced over rows on the device (no host sync).
    """
    from hf_ghosts.probe._attention_triton_kernel import attention_jvp_kernel  # needs triton

    validate_attention_inputs(q, k, v, tq, tk, tv, None, key_padding, query_mask, block_m)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"attention_jvp_triton: {name} must be a power of two >= 16; got {block}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention_jvp_triton: q, k, v must share a dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    tq = torch.zeros_like(q) if tq is None else tq
    tk = torch.zeros_like(k) if tk is None else tk
    tv = torch.zeros_like(v) if tv is None else tv
    out = q.new_empty(batch, q_len, heads, v_dim)
    tangent = torch.empty_like(out)
    rows = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    grid = (math.ceil(q_len / block_m), batch * heads)
    attention_jvp_kernel[grid](
        q, k, v, tq, tk, tv, out, tangent, rows, _as_flag(key_padding, q), _as_flag(query_mask, q),
        *q.stride(), *tq.stride(), *k.stride(), *tk.stride(), *v.stride(), *tv.stride(), *out.stride(),
        heads, heads // kv_heads, q_len, k_len, k_len - q_len, 0 if sliding_window is None else int(sliding_window),
        dim**-0.5 if scaling is None else float(scaling),
        HEAD_DIM=dim, V_DIM=v_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, 1 << (dim - 1).bit_length()), BLOCK_DV=max(16, 1 << (v_dim - 1).bit_length()),
        CAUSAL=causal, HAS_WINDOW=causal and sliding_window is not None,
        HAS_KP=key_padding is not None, HAS_QM=query_mask is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return AttentionJvp(out, tangent, rows.amax(-1) if reduce else rows)
