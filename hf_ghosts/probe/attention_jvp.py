"""Attention and its forward-mode derivative, in blocks of queries, with the score-slope spread on the fly.

Along a direction the queries, keys and values move as ``q + eps tq`` (and so on). With
``S = s tanh(S0 / s)`` (no softcap: ``S = S0``), ``S0 = scaling q k^T``, ``P = softmax(S)`` over the
allowed keys and ``O = P v``::

    tS0 = scaling (tq k^T + q tk^T),   tS = (1 - tanh^2(S0 / s)) tS0,
    tP  = P * (tS - rowsum(P * tS)),   tO = tP v + P tv = P tv + (P * tS) v - rowsum(P * tS) O.

The spread of a query row is ``max_k tS - min_k tS`` over its allowed keys (Section 6.6): the
slopes of the scores *after* softcapping, as the eager capture of :mod:`hf_ghosts.probe.attention`
records them. Nothing of size ``[B, H, Tq, Tk]`` is built: queries go ``block_size`` rows at a
time (in the input dtype, softmax in fp32 for half inputs, like the eager path), causal and
sliding-window blocks only see their key range, and grouped-query heads are views
(``[B, Hkv, g * rows, D]``), never ``repeat_kv`` copies. No host syncs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from hf_ghosts.probe.masks import allowed_keys

__all__ = ["AttentionJvp", "attention_jvp", "query_blocks"]


class AttentionJvp(NamedTuple):
    """``out`` and ``tangent``: ``[B, Tq, H, Dv]`` (the layout transformers' attention functions return);
    ``spread``: fp32 ``[B, H]`` (max over rows) or ``[B, H, Tq]`` (``reduce=False``), ``-inf`` where no
    row had an allowed key."""

    out: torch.Tensor
    tangent: torch.Tensor
    spread: torch.Tensor


def query_blocks(q_len: int, k_len: int, block_size: int, causal: bool, sliding_window: int | None):
    """Yield ``(r0, r1, lo, hi)``: query rows ``[r0, r1)`` and the key range ``[lo, hi)`` they can see.

    Query ``i`` sits at position ``i + k_len - q_len``; causally it sees keys ``<=`` that position,
    with a window only the last ``sliding_window`` of them. Plain Python ints (shapes only).
    """
    offset = k_len - q_len
    for r0 in range(0, q_len, block_size):
        r1 = min(r0 + block_size, q_len)
        lo, hi = 0, k_len
        if causal:
            hi = max(0, min(k_len, r1 + offset))
            if sliding_window is not None:
                lo = min(hi, max(0, r0 + offset - int(sliding_window) + 1))
        yield r0, r1, lo, hi


def _block_allowed(
    *,
    heads: int,
    kv_heads: int,
    rows: tuple[int, int],
    keys: tuple[int, int],
    offset: int,
    causal: bool,
    sliding_window: int | None,
    attention_mask: torch.Tensor | None,
    key_padding: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask broadcastable to ``[B, Hkv, g, rows, keys]`` (True = attend), or None (all keys): the causal rule
    and key padding of :func:`~hf_ghosts.probe.masks.allowed_keys`, and ``attention_mask``."""
    (r0, r1), (lo, hi) = rows, keys
    allowed = allowed_keys(rows, keys, offset, causal=causal, sliding_window=sliding_window, key_padding=key_padding,
                           device=device)
    if allowed is not None:
        allowed = allowed[:, :, None]  # [B|1, 1, 1, rows, keys]: every head of a GQA group alike
    if attention_mask is not None:
        mask = attention_mask[..., r0:r1, :] if attention_mask.shape[-2] != 1 else attention_mask
        mask = mask[..., lo:hi]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask_heads = mask.shape[1]
        if mask_heads == heads:
            mask = mask.unflatten(1, (kv_heads, heads // kv_heads))
        else:
            mask = mask[:, :, None]
        allowed = mask if allowed is None else allowed & mask
    return allowed



def _block_bias(attention_mask: torch.Tensor | None, rows: tuple[int, int], keys: tuple[int, int], heads: int,
                kv_heads: int) -> torch.Tensor | None:
    """The additive part of a float mask (ALiBi's position bias, added to the scores as sdpa adds it), broadcastable
    to ``[B, Hkv, g, rows, keys]``; ``None`` for no mask or a boolean one. Masked-out entries are left to ``allowed``."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return None
    (r0, r1), (lo, hi) = rows, keys
    bias = attention_mask[..., r0:r1, :] if attention_mask.shape[-2] != 1 else attention_mask
    bias = bias[..., lo:hi]
    return bias.unflatten(1, (kv_heads, heads // kv_heads)) if bias.shape[1] == heads else bias[:, :, None]

def validate_attention_inputs(q, k, v, tq, tk, tv, attention_mask, key_padding, query_mask, block_size) -> None:
    name = "attention_jvp"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: expects q, k, v as [B, H, T, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim or v.shape[:3] != k.shape[:3] or heads % kv_heads:
        raise ValueError(
            f"{name}: q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] with H a multiple of Hkv; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for tname, primal, tangent in (("tq", q, tq), ("tk", k, tk), ("tv", v, tv)):
        if tangent is not None and tangent.shape != primal.shape:
            raise ValueError(f"{name}: {tname} must have the shape of its primal {tuple(primal.shape)}; got {tuple(tangent.shape)}")
    if key_padding is not None and tuple(key_padding.shape) != (batch, k_len):
        raise ValueError(f"{name}: key_padding must be [B, Tk] = {(batch, k_len)}; got {tuple(key_padding.shape)}")
    if query_mask is not None and tuple(query_mask.shape) != (batch, q_len):
        raise ValueError(f"{name}: query_mask must be [B, Tq] = {(batch, q_len)}; got {tuple(query_mask.shape)}")
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if (
            len(shape) != 4
            or shape[0] not in (1, batch)
            or shape[1] not in (1, heads)
            or shape[2] not in (1, q_len)
            or shape[3] < k_len
        ):
            raise ValueError(
                f"{name}: attention_mask must be [B|1, H|1, Tq|1, >=Tk] = [{batch}|1, {heads}|1, {q_len}|1, >={k_len}]; got {shape}"
            )
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1; got {block_size}")


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    *,
    scaling: float | None = None,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block_size: int = 128,
    reduce: bool = True,
) -> AttentionJvp:
    """Attention output, its tangent and the per-(batch, head) spread of the score tangents.

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hkv, Tk, D]``; v: ``[B, Hkv, Tk, Dv]`` with ``H = g * Hkv`` (GQA).
        tq, tk, tv: tangents of the same shapes; None for a zero tangent.
        scaling: score scale, default ``D ** -0.5``.
        causal: query ``i`` (at position ``i + Tk - Tq``) sees keys up to its position;
            ``sliding_window=w`` keeps the last ``w`` of them (only with ``causal``).
        attention_mask: bool (True = attend) or additive float (allowed where ``> finfo.min / 2``, and added to
            the scores there, as sdpa adds it: ALiBi's bias), ``[B|1, H|1, Tq|1, >=Tk]`` (the eager/sdpa masks of
            transformers; extra keys are ignored).
        key_padding: ``[B, Tk]`` bool, True = a real key.
        query_mask: ``[B, Tq]`` bool: rows that count in the spread (the output is computed for all).
        softcap: ``S = softcap * tanh(S0 / softcap)``; the spread is of ``tS`` after the cap.
        block_size: query rows per block (``g * block_size`` rows per matmul under GQA).
        reduce: spread as ``[B, H]`` (max over rows) or per row ``[B, H, Tq]``.

    All masks are combined by AND. A query row with no allowed key outputs 0 (as sdpa does) with
    tangent 0, and its spread is ``-inf``, the identity of ``max``: reduced over rows, batch or ranks
    it contributes nothing, and a ``[B, H]`` entry stays ``-inf`` only when nothing was measured
    (never 0, which would read as a radius of ``inf``). NaN tangents propagate into the spread.

    Returns:
        :class:`AttentionJvp` ``(out, tangent, spread)``.

    Example: one query ``q = 3`` and two keys with ``tq = 0`` and ``tk = [[0], [1]]`` (D = 1, scaling 1,
    ``causal=False``): ``tS = q tk^T = [0, q]``, so the spread is ``|q|``.

    >>> q, k, v = torch.tensor([[[[3.0]]]]), torch.tensor([[[[3.0], [1.0]]]]), torch.ones(1, 1, 2, 1)
    >>> attention_jvp(q, k, v, None, torch.tensor([[[[0.0], [1.0]]]]), None, scaling=1.0, causal=False).spread
    tensor([[3.]])
    """
    validate_attention_inputs(q, k, v, tq, tk, tv, attention_mask, key_padding, query_mask, block_size)
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax for half inputs, fp64 kept
    offset = k_len - q_len
    out = q.new_zeros(batch, q_len, heads, v_dim)
    tangent = torch.zeros_like(out)
    rows_spread = torch.full((batch, heads, q_len), -math.inf, dtype=torch.float32, device=q.device)
    q_groups = q.unflatten(1, (kv_heads, groups))
    tq_groups = None if tq is None else tq.unflatten(1, (kv_heads, groups))

    for r0, r1, lo, hi in query_blocks(q_len, k_len, block_size, causal, sliding_window):
        if hi <= lo:
            continue  # no query of this block sees a key: output 0, spread -inf
        n = r1 - r0
        k_b, v_b = k[:, :, lo:hi], v[:, :, lo:hi]
        q_b = q_groups[:, :, :, r0:r1].reshape(batch, kv_heads, groups * n, dim)
        k_t = k_b.transpose(-1, -2)
        scores = torch.matmul(q_b, k_t)
        if tq_groups is not None:
            slopes = torch.matmul(tq_groups[:, :, :, r0:r1].reshape(batch, kv_heads, groups * n, dim), k_t)
            if tk is not None:
                slopes += torch.matmul(q_b, tk[:, :, lo:hi].transpose(-1, -2))
        elif tk is not None:
            slopes = torch.matmul(q_b, tk[:, :, lo:hi].transpose(-1, -2))
        else:
            slopes = torch.zeros_like(scores)
        scores *= scaling
        slopes *= scaling
        if softcap is not None:
            capped = torch.tanh(scores / softcap)
            slopes *= 1 - capped * capped
            scores = capped.mul_(softcap)
        scores = scores.unflatten(2, (groups, n))  # [B, Hkv, g, n, keys]
        slopes = slopes.unflatten(2, (groups, n))
        allowed = _block_allowed(
            heads=heads,
            kv_heads=kv_heads,
            rows=(r0, r1),
            keys=(lo, hi),
            offset=offset,
            causal=causal,
            sliding_window=sliding_window,
            attention_mask=attention_mask,
            key_padding=key_padding,
            device=q.device,
        )
        if allowed is None:
            high, low = slopes.amax(-1), slopes.amin(-1)
        else:
            high = torch.where(allowed, slopes, -math.inf).amax(-1)
            low = torch.where(allowed, slopes, math.inf).amin(-1)
        block_spread = high.float() - low.float()  # [B, Hkv, g, n]; -inf - inf = -inf for empty rows
        if query_mask is not None:
            block_spread.masked_fill_(~query_mask[:, None, None, r0:r1].to(torch.bool), -math.inf)
        rows_spread[:, :, r0:r1] = block_spread.flatten(1, 2)

        scores = scores.to(compute)
        slopes = slopes.to(compute)
        bias = _block_bias(attention_mask, (r0, r1), (lo, hi), heads, kv_heads)
        if bias is not None:  # a constant of the weights: it moves the probabilities, not the slopes
            scores += bias.to(compute) if allowed is None else bias.to(compute).masked_fill(~allowed, 0.0)
        if allowed is not None:
            scores.masked_fill_(~allowed, torch.finfo(compute).min)
            slopes.masked_fill_(~allowed, 0.0)
        probs = torch.softmax(scores, dim=-1)
        if allowed is not None:
            probs.masked_fill_(~allowed.any(-1, keepdim=True), 0.0)
        slopes -= (probs * slopes).sum(-1, keepdim=True)
        dprobs = slopes.mul_(probs).to(v.dtype).flatten(2, 3)
        probs = probs.to(v.dtype).flatten(2, 3)  # [B, Hkv, g * n, keys]
        out_b = torch.matmul(probs, v_b)
        tan_b = torch.matmul(dprobs, v_b)
        if tv is not None:
            tan_b += torch.matmul(probs, tv[:, :, lo:hi])
        out[:, r0:r1] = out_b.view(batch, heads, n, v_dim).transpose(1, 2)
        tangent[:, r0:r1] = tan_b.view(batch, heads, n, v_dim).transpose(1, 2)

    return AttentionJvp(out, tangent, rows_spread.amax(-1) if reduce else rows_spread)
