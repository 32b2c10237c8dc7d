"""The ``"ghosts"`` attention implementation: sdpa outside a probe, forward-mode or eager with score capture inside.

Registered with both ``transformers.AttentionInterface`` and ``AttentionMaskInterface`` (without
the mask registration ``masking_utils`` passes ``attention_mask=None`` and attention silently
turns non-causal). Outside a probe it calls transformers' own ``sdpa_attention_forward`` with the
sdpa mask, so training is bit-identical to ``attn_implementation="sdpa"``. Inside
:func:`capture_scores` it records, per layer and head, the spread of the pre-softmax score slopes
over the keys the mask allows (Section 6.6 of the paper): a forward-mode pass (``Pass.JVP``) runs the
query-blocked attention JVP (:mod:`~hf_ghosts.probe.attention_jvp`; the fused Triton kernel of
:mod:`~hf_ghosts.probe.attention_triton` on CUDA where it applies) with the spread on the fly, no
``[B, H, T, T]`` tensor and no host sync; central differences' forwards run eager attention.
Inside a probe the mask never reads the padding on the host (:func:`~hf_ghosts.compat.sdpa_mask_without_sync`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import torch
import torch.autograd.forward_ad as fwAD
from transformers import AttentionInterface, AttentionMaskInterface

from hf_ghosts.compat import repeat_kv, sdpa_attention_forward, sdpa_mask, sdpa_mask_without_sync
from hf_ghosts.probe.attention_jvp import attention_jvp
from hf_ghosts.probe.attention_triton import attention_jvp_triton, triton_available
from hf_ghosts.probe.masks import allowed_keys
from hf_ghosts.radii import spread

__all__ = [
    "ATTENTION_NAME", "Kernel", "Pass", "ScoreCapture", "capture_scores", "ghosts_attention_forward", "ghosts_mask",
    "register",
]

ATTENTION_NAME = "ghosts"
logger = logging.getLogger(__name__)


class Pass(StrEnum):
    """Which forward of a measurement runs: the forward-mode one, or central differences' two."""

    JVP = "jvp"  # weights theta + v eps (dual tensors): slopes are the tangents
    FD_PLUS = "fd_plus"  # weights theta + h v: keep what the slopes will be differenced from
    FD_MINUS = "fd_minus"  # weights theta - h v: slopes (plus - minus) / 2h


class Kernel(StrEnum):
    """Which attention JVP ran in a forward-mode pass."""

    TRITON = "triton"  # the fused kernel (CUDA; causal, key padding, window, GQA; no softcap, no other mask)
    BLOCKED = "blocked"  # the query-blocked pure-torch path (every mask, softcap)


@dataclass
class ScoreCapture:
    """What one probe forward records from every attention call.

    ``mode=Pass.JVP``: slopes are the tangents of the scores. ``Pass.FD_PLUS`` stores the queries
    and keys of the ``theta + h v`` pass (the scores, under softcapping); ``Pass.FD_MINUS`` forms
    ``(s_plus - s_minus) / (2 h)`` against the ``theta - h v`` pass. Keeping ``q`` and ``k`` instead of
    the scores costs ``2 d / k_len`` of the memory, all layers being held between the two passes.
    ``record=False``: attention only, nothing recorded (a probe that needs the eager path for its JVP
    but does not measure attention).
    """

    mode: Pass
    query_mask: torch.Tensor | None = None
    fd_step: float | None = None  # the step h of central differences (None: a jvp)
    spreads: dict[int, torch.Tensor] = field(default_factory=dict)
    plus_scores: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    calls: int = 0
    record: bool = True
    # masks made inside the capture that are exactly ``causal & key padding``: (mask, [B, Tk] padding)
    causal_masks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kernels: set[Kernel] = field(default_factory=set)  # the attention JVPs that ran

    def __post_init__(self) -> None:
        self.mode = Pass(self.mode)

    def begin(self, mode: Pass) -> None:
        """Start the forward ``mode``: layers are counted afresh."""
        self.mode = mode
        self.calls = 0

    def layer_key(self, module: torch.nn.Module) -> int:
        layer = getattr(module, "layer_idx", None)
        key = self.calls if layer is None else int(layer)
        self.calls += 1
        return key


_STATE = threading.local()
_LOGGED: set[Kernel] = set()


def _active() -> ScoreCapture | None:
    return getattr(_STATE, "capture", None)


@contextlib.contextmanager
def capture_scores(capture: ScoreCapture) -> Iterator[ScoreCapture]:
    """Route every ``"ghosts"`` attention call in this thread through the eager capturing path."""
    if _active() is not None:
        raise RuntimeError("capture_scores: a score capture is already active in this thread (nested probes)")
    _STATE.capture = capture
    try:
        yield capture
    finally:
        _STATE.capture = None


def _causal_call(module: torch.nn.Module, q_len: int, sliding_window: int | None) -> bool:
    """Whether an attention call without a mask is causal: a causal module (``is_causal``, default True), unless it
    attends with one query and no window (decoding: every key is in the past)."""
    return getattr(module, "is_causal", True) and (q_len > 1 or sliding_window is not None)


def _allowed_keys(
    module: torch.nn.Module,
    attention_mask: torch.Tensor | None,
    q_len: int,
    k_len: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean ``[b|1, 1, q, k]`` mask of the keys each query may attend to.

    Accepts what the sdpa and eager mask functions produce: ``None`` (causal for a causal
    module, within ``sliding_window`` keys of the query if given, else everything), a boolean
    mask (True = attend) or an additive float mask. sdpa's mask function returns ``None`` for a
    batch without padding when causal attention (``is_causal``) is the same; with a window it is
    materialized here by :func:`~hf_ghosts.probe.masks.allowed_keys`: query ``q`` (at ``q + k_len - q_len``) sees
    keys ``q - window < k <= q``.
    """
    if attention_mask is None:
        if _causal_call(module, q_len, sliding_window):
            return allowed_keys((0, q_len), (0, k_len), k_len - q_len, causal=True, sliding_window=sliding_window, device=device)
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] > torch.finfo(attention_mask.dtype).min / 2


def _eager_capture(
    capture: ScoreCapture,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    own_key = key
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = _allowed_keys(module, attention_mask, query.shape[2], key.shape[2], query.device, sliding_window)
    rows = allowed
    if capture.query_mask is not None and capture.query_mask.shape[-1] == query.shape[2]:
        rows = allowed & capture.query_mask[:, None, :, None].to(torch.bool)
    layer = capture.layer_key(module)
    primal, tangent = fwAD.unpack_dual(scores)
    if not capture.record:
        slopes = None
    elif capture.mode == Pass.JVP:
        slopes = torch.zeros_like(primal) if tangent is None else tangent
    elif capture.mode == Pass.FD_PLUS:
        # Without softcapping keep what the scores are made of: [b, h, q, d] + [b, kv, k, d] instead of [b, h, q, k].
        capture.plus_scores[layer] = primal.detach() if softcap is not None else (query.detach(), own_key.detach())
        slopes = None
    elif capture.mode == Pass.FD_MINUS:
        plus = capture.plus_scores.pop(layer)
        if isinstance(plus, tuple):
            # (q+ k+^T - q- k-^T) = ((q+ - q-)(k+ + k-)^T + (q+ + q-)(k+ - k-)^T) / 2, exactly
            query_plus, key_plus = plus
            key_sum, key_gap = repeat_kv(key_plus + own_key, groups), repeat_kv(key_plus - own_key, groups)
            gap = torch.matmul(query_plus - query, key_sum.transpose(2, 3))
            gap += torch.matmul(query_plus + query, key_gap.transpose(2, 3))
            slopes = gap * (scaling / (4 * capture.fd_step))
        else:
            slopes = (plus - primal) / (2 * capture.fd_step)
    else:
        raise ValueError(f"ScoreCapture: unknown mode {capture.mode!r}; expected 'jvp', 'fd_plus' or 'fd_minus'")
    if slopes is not None:
        rows = rows.expand_as(slopes)
        per_row = spread(slopes.float(), rows, dim=-1)  # [batch, heads, queries]
        capture.spreads[layer] = per_row.amax(dim=(0, 2))
    compute = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax for half inputs, fp64 kept
    scores = scores.to(compute)
    if attention_mask is not None and attention_mask.dtype != torch.bool:  # additive (ALiBi): added as sdpa adds it
        scores = scores + attention_mask[..., : key.shape[2]].to(compute).masked_fill(~allowed, 0.0)
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(compute).min), dim=-1)
    # A query with no allowed key (left padding) outputs 0, as sdpa does, so the probe's logits at
    # such positions equal the training forward's (a label may still sit there).
    probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _layer_spread(per_batch: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` spreads (``-inf``: no row counted) -> ``[H]`` as the eager capture reports them: max over the
    batch, 0 where no row counted, NaN where a slope was NaN or inf (as :func:`~hf_ghosts.radii.spread`)."""
    per_head = per_batch.amax(0)
    per_head = torch.where(per_head == -math.inf, torch.zeros_like(per_head), per_head)
    return torch.where(torch.isfinite(per_head), per_head, math.nan)


def _jvp_capture(
    capture: ScoreCapture,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention on dual ``query``, ``key``, ``value``: output ``O + eps tO`` with the score-slope spread recorded.

    Masks as :func:`_allowed_keys`: ``None`` is causal for a causal module (windowed with ``sliding_window``); a mask
    the probe made as ``causal & padding`` (:func:`ghosts_mask`) runs as causal with key padding (the key ranges a
    block of queries cannot see are skipped; the Triton kernel applies); any other mask is taken as it is.
    """
    (q, tq), (k, tk), (v, tv) = (fwAD.unpack_dual(t) for t in (query, key, value))
    q_len = q.shape[2]
    padding = next((pad for mask, pad in capture.causal_masks if mask is attention_mask), None)
    if attention_mask is None:
        causal = _causal_call(module, q_len, sliding_window)
        window = sliding_window if causal else None
    else:
        causal, window = padding is not None, None
    mask = None if padding is not None else attention_mask
    query_mask = capture.query_mask
    if query_mask is not None and tuple(query_mask.shape) != (q.shape[0], q_len):
        query_mask = None
    options = dict(scaling=scaling, causal=causal, key_padding=padding, query_mask=query_mask, sliding_window=window)
    if triton_available(q, softcap=softcap, attention_mask=mask) and k.dtype == v.dtype == q.dtype:
        kernel, result = Kernel.TRITON, attention_jvp_triton(q, k, v, tq, tk, tv, **options)
    else:
        kernel, result = Kernel.BLOCKED, attention_jvp(q, k, v, tq, tk, tv, attention_mask=mask, softcap=softcap, **options)
    if kernel not in _LOGGED:
        _LOGGED.add(kernel)
        logger.info("hf_ghosts: the probe's attention JVP runs the %s path", kernel.value)
    capture.kernels.add(kernel)
    layer = capture.layer_key(module)
    if capture.record:
        capture.spreads[layer] = _layer_spread(result.spread)
    if tq is None and tk is None and tv is None:
        return result.out
    return fwAD.make_dual(result.out, result.tangent)


def ghosts_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for ``attn_implementation="ghosts"``: sdpa; inside a probe forward-mode (``Pass.JVP``) or eager
    attention with the capture."""
    capture = _active()
    if capture is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"ghosts attention: `{unsupported}` in {type(module).__name__} is not supported by the radius probe; "
                "measure radii=('output',) for this model"
            )
    path = _jvp_capture if capture.mode == Pass.JVP else _eager_capture
    output = path(
        capture, module, query, key, value, attention_mask, scaling, kwargs.get("softcap"), kwargs.get("sliding_window")
    )
    return output, None


def ghosts_mask(*args, **kwargs) -> torch.Tensor | None:
    """The ghosts attention's mask: sdpa's outside a probe; inside, made without a host sync
    (:func:`~hf_ghosts.compat.sdpa_mask_without_sync`), a ``causal & padding`` mask remembered as such."""
    capture = _active()
    if capture is None:
        return sdpa_mask(*args, **kwargs)
    mask, padding = sdpa_mask_without_sync(*args, **kwargs)
    if mask is not None and padding is not None:
        capture.causal_masks.append((mask, padding))
    return mask


def register() -> None:
    """Register ``"ghosts"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, ghosts_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ghosts_mask)


register()
