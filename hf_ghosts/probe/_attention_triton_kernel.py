# ruff: noqa: N803  (Triton style: pointers and constexpr arguments in capitals)
"""The Triton kernel behind :mod:`hf_ghosts.probe.attention_triton` (imported only when it runs: needs ``triton``).

One program per (query block, batch x head); it streams the key blocks its queries can see
(flash-attention style, online softmax) and keeps, per query row::

    m   running max of S,            l   = sum_k exp(S_k - m),
    acc = sum_k exp(S_k - m) v_k,    mu  = sum_k exp(S_k - m) tS_k,
    acc_t = sum_k exp(S_k - m) (tS_k v_k + tv_k),    hi / lo: max / min of tS over allowed keys,

rescaling by ``exp(m_old - m_new)`` when ``m`` grows. At the end ``O = acc / l`` and
``tO = acc_t / l - (mu / l) O``; the row spread is ``hi - lo`` (``-inf`` for a row without keys). Which keys a
query sees is :func:`hf_ghosts.probe.masks.causal_keys`, compiled by ``triton.jit``.
"""

from __future__ import annotations

import types

import triton
import triton.language as tl

from hf_ghosts.probe.masks import causal_keys

# The keys a query may see: the torch paths' definition itself, compiled. Bound to this module's globals, where
# triton.language is (Triton's CPU interpreter looks for it there; hf_ghosts.probe.masks does not import triton).
_causal_keys = triton.jit(types.FunctionType(causal_keys.__code__, globals(), causal_keys.__name__))


@triton.jit
def attention_jvp_kernel(
    Q, K, V, TQ, TK, TV, OUT, TOUT, SPREAD, KP, QM,
    sqb, sqh, sqt, sqd, stqb, stqh, stqt, stqd,
    skb, skh, skt, skd, stkb, stkh, stkt, stkd,
    svb, svh, svt, svd, stvb, stvh, stvt, stvd,
    sob, sot, soh, sod,
    heads, groups, q_len, k_len, offset, window, scaling,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KP: tl.constexpr, HAS_QM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    hk = h // groups
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < V_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqt + offs_d[None, :] * stqd, mask=q_mask, other=0.0)
    q_pos = offs_m + offset

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mu = tl.zeros([BLOCK_M], tl.float32)
    t_hi = tl.full([BLOCK_M], float("-inf"), tl.float32)
    t_lo = tl.full([BLOCK_M], float("inf"), tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M + offset)
        if HAS_WINDOW:
            lo = tl.maximum(0, start_m * BLOCK_M + offset - window + 1)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        k_mask = n_valid[:, None] & d_valid[None, :]
        v_mask = n_valid[:, None] & dv_valid[None, :]
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=k_mask, other=0.0)
        tk = tl.load(TK + b * stkb + hk * stkh + offs_n[:, None] * stkt + offs_d[None, :] * stkd, mask=k_mask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_dv[None, :] * svd, mask=v_mask, other=0.0)
        tv = tl.load(TV + b * stvb + hk * stvh + offs_n[:, None] * stvt + offs_dv[None, :] * stvd, mask=v_mask, other=0.0)
        k_t = tl.trans(k)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scaling
        ts = tl.dot(tq, k_t, input_precision=DOT_PRECISION)
        ts = (ts + tl.dot(q, tl.trans(tk), input_precision=DOT_PRECISION)) * scaling
        allowed = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:  # the rule of hf_ghosts.probe.masks, compiled here
            allowed = _causal_keys(allowed, q_pos[:, None], offs_n[None, :], window, HAS_WINDOW)
        if HAS_KP:
            keep = tl.load(KP + b * k_len + offs_n, mask=n_valid, other=0)
            allowed = allowed & (keep != 0)[None, :]
        t_hi = tl.maximum(t_hi, tl.max(tl.where(allowed, ts, float("-inf")), 1))
        t_lo = tl.minimum(t_lo, tl.min(tl.where(allowed, ts, float("inf")), 1))
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        pts = tl.where(allowed, p * ts, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        mu = mu * alpha + tl.sum(pts, 1)
        p_v = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)
        acc_t = acc_t * alpha[:, None] + tl.dot(pts.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc_t = acc_t + tl.dot(p_v, tv, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tout = acc_t / l_safe[:, None] - (mu / l_safe)[:, None] * out
    o_offs = b * sob + offs_m[:, None] * sot + h * soh + offs_dv[None, :] * sod
    o_mask = m_valid[:, None] & dv_valid[None, :]
    tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(TOUT + o_offs, tout.to(TOUT.dtype.element_ty), mask=o_mask)
    spread = t_hi - t_lo
    if HAS_QM:
        counted = tl.load(QM + b * q_len + offs_m, mask=m_valid, other=0)
        spread = tl.where(counted != 0, spread, float("-inf"))
    tl.store(SPREAD + bh * q_len + offs_m, spread, mask=m_valid)
