"""Which keys a query may attend to: the one rule the probe's three attention paths share.

Query ``i`` of ``Tq`` sits at position ``q = i + Tk - Tq`` (the last query at the last key). Causally it sees the keys
at positions ``k <= q``; with a sliding window of ``w`` keys only the last ``w`` of them, ``k > q - w``; key padding
takes the padded keys away; under GQA every query head of a group sees what its key head's keys allow (the rule has
no head in it). :func:`causal_keys` is the rule on positions, written so that Triton compiles it as it is: the kernel
of :mod:`~hf_ghosts.probe._attention_triton_kernel` applies ``triton.jit(causal_keys)``. :func:`allowed_keys` is the
boolean mask of a block of queries over a range of keys, for the eager capture (:mod:`~hf_ghosts.probe.attention`)
and the query-blocked JVP (:mod:`~hf_ghosts.probe.attention_jvp`).
"""

from __future__ import annotations

import torch

__all__ = ["allowed_keys", "causal_keys"]


def causal_keys(allowed, q_pos, k_pos, window, has_window):  # no annotations: Triton compiles it too
    """``allowed`` and the causal rule: the query at position ``q_pos`` sees the keys at ``k_pos <= q_pos``, and with a
    sliding window (``has_window``) only those at ``k_pos > q_pos - window``. Broadcasting operands (``q_pos`` as a
    column, ``k_pos`` as a row), torch's or, inside a kernel, Triton's; ``allowed`` may be ``True``.

    Example (query 3, a window of 2: keys 2 and 3):

    >>> causal_keys(True, torch.tensor([[3]]), torch.arange(5)[None], 2, True)
    tensor([[False, False,  True,  True, False]])
    """
    allowed = allowed & (k_pos <= q_pos)
    if has_window:
        allowed = allowed & (k_pos > q_pos - window)
    return allowed


def allowed_keys(
    rows: tuple[int, int], keys: tuple[int, int], offset: int, *, causal: bool, sliding_window: int | None = None,
    key_padding: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean ``[B|1, 1, r1 - r0, hi - lo]`` mask (True = attend) of the queries ``rows = (r0, r1)`` over the keys
    ``keys = (lo, hi)``, query ``i`` at position ``i + offset`` (``offset = Tk - Tq``): :func:`causal_keys` where
    ``causal`` (windowed with ``sliding_window``), and the ``[B, Tk]`` ``key_padding`` (True = a real key).
    ``None``: every key (not causal, no padding).

    Example (the lower triangle of a 3 x 3 matrix):

    >>> allowed_keys((0, 3), (0, 3), 0, causal=True)[0, 0]
    tensor([[ True, False, False],
            [ True,  True, False],
            [ True,  True,  True]])
    """
    (r0, r1), (lo, hi) = rows, keys
    allowed = None
    if causal:
        q_pos = torch.arange(r0 + offset, r1 + offset, device=device)[:, None]
        k_pos = torch.arange(lo, hi, device=device)[None, :]
        window = None if sliding_window is None else int(sliding_window)
        allowed = causal_keys(True, q_pos, k_pos, window, window is not None)[None, None]
    if key_padding is not None:
        pad = key_padding[:, None, None, lo:hi].to(torch.bool)
        allowed = pad if allowed is None else allowed & pad
    return allowed
