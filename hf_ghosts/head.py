"""The chunked output head: per-position spread of the logit slopes, built over vocabulary blocks.

For logits ``z = x W^T + b`` of a linear head (``x`` the head's input, ``W`` ``[classes, hidden]``)
moved along a unit direction ``v`` with slopes ``x'``, ``W'``, ``b'``, the product rule gives

    a = x' W^T + x W'^T + b'                                           (jvp)

and central differences at a step ``h`` along ``v``, with ``x+-`` the head's inputs at ``theta +- h v``,

    a = (z+ - z-) / 2h,   z+- = x+- (W +- h W')^T + (b +- h b').           (fd)

The output radius needs only each position's spread ``max_k a_k - min_k a_k`` (eq. 14), so ``a`` is
built ``chunk`` rows of ``W`` at a time and only every position's running max and min are kept:
the ``[batch, seq, classes]`` logits and slopes never exist. Tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_ghosts.radii import spread

__all__ = ["blockwise_spread", "fd_slopes", "fd_spread", "jvp_slopes", "jvp_spread"]


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def blockwise_spread(classes: int, block: Callable[[slice], torch.Tensor], chunk: int) -> torch.Tensor:
    """``max_k a_k - min_k a_k`` over the last dim, ``a[..., rows] = block(rows)`` built ``chunk`` classes at a time.

    Args:
        classes: size of the class dimension (vocabulary entries, rows of ``W``).
        block: ``rows -> a[..., rows]``, a slice of at most ``chunk`` classes.
        chunk: classes per block (``>= 1``).

    Returns:
        ``a``'s spread per position, float32 (NaN where ``a`` holds NaN or inf, as :func:`~hf_ghosts.radii.spread`).

    Example: ``blockwise_spread(3, lambda rows: torch.tensor([[1.0, 4.0, -2.0]])[:, rows], 2)`` is ``tensor([6.])``.
    """
    high = low = None
    for start in range(0, classes, chunk):
        block_low, block_high = torch.aminmax(block(slice(start, start + chunk)), dim=-1)
        high = block_high if high is None else torch.maximum(high, block_high)
        low = block_low if low is None else torch.minimum(low, block_low)
    # the spread of the two extremes is high - low, NaN where a NaN or inf was among them (aminmax keeps NaN)
    return spread(torch.stack((high.float(), low.float()), dim=-1), dim=-1)


def jvp_slopes(
    hidden: torch.Tensor,
    hidden_slope: torch.Tensor | None,
    weight: torch.Tensor,
    weight_slope: torch.Tensor | None = None,
    bias_slope: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a = x' W^T + x W'^T + b'``, ``[..., classes]``; a ``None`` slope is zero.

    Args:
        hidden: ``x``, ``[..., hidden]``; hidden_slope: ``x'`` (``None``: nothing before the head moves).
        weight: ``W``, ``[classes, hidden]``; weight_slope: ``W'``; bias_slope: ``b'``, ``[classes]``.
    """
    hidden_slope = torch.zeros_like(hidden) if hidden_slope is None else hidden_slope
    slopes = F.linear(hidden_slope, weight, bias_slope)
    return slopes if weight_slope is None else slopes + F.linear(hidden, weight_slope)


def fd_slopes(
    hidden_plus: torch.Tensor,
    hidden_minus: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_step: torch.Tensor | None,
    bias_step: torch.Tensor | None,
    scale: float,
    fd_step: float,
) -> torch.Tensor:
    """``a = (z+ - z-) / 2h``, ``z+- = x+- (W +- s D_W)^T + b +- s D_b``, ``s D = h W'``; ``[..., classes]``.

    The difference is taken in the inputs' dtype (rounding the logits to fp32 first would cost ``eps / h``).

    Args:
        hidden_plus, hidden_minus: ``x+-``, the head's inputs at ``theta +- h v``.
        weight, bias: ``W`` and ``b`` (``None``: no bias).
        weight_step, bias_step: ``D_W``, ``D_b``, the direction's entries for them (``None``: zero).
        scale: ``s``, the multiple of ``D`` that is one step ``h`` along ``v`` (``h / |D|`` for ``v = D / |D|``).
        fd_step: ``h``.
    """

    def moved(value: torch.Tensor | None, step: torch.Tensor | None, sign: float) -> torch.Tensor | None:
        return value if value is None or step is None else torch.add(value, step, alpha=sign * scale)

    plus = F.linear(hidden_plus, moved(weight, weight_step, 1.0), moved(bias, bias_step, 1.0))
    minus = F.linear(hidden_minus, moved(weight, weight_step, -1.0), moved(bias, bias_step, -1.0))
    return (plus - minus) / (2 * fd_step)


def jvp_spread(
    hidden: torch.Tensor,
    hidden_slope: torch.Tensor | None,
    weight: torch.Tensor,
    weight_slope: torch.Tensor | None = None,
    bias_slope: torch.Tensor | None = None,
    *,
    chunk: int,
) -> torch.Tensor:
    """Per position, the spread of :func:`jvp_slopes` (``a = x' W^T + x W'^T + b'``), ``chunk`` classes at a time."""
    hidden_slope = torch.zeros_like(hidden) if hidden_slope is None else hidden_slope

    def block(rows: slice) -> torch.Tensor:
        return jvp_slopes(hidden, hidden_slope, weight[rows], _rows(weight_slope, rows), _rows(bias_slope, rows))

    return blockwise_spread(weight.shape[0], block, chunk)


def fd_spread(
    hidden_plus: torch.Tensor,
    hidden_minus: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_step: torch.Tensor | None,
    bias_step: torch.Tensor | None,
    *,
    scale: float,
    fd_step: float,
    chunk: int,
) -> torch.Tensor:
    """Per position, the spread of :func:`fd_slopes` (``a = (z+ - z-) / 2h``), ``chunk`` classes at a time."""

    def block(rows: slice) -> torch.Tensor:
        head_rows = weight[rows], _rows(bias, rows), _rows(weight_step, rows), _rows(bias_step, rows)
        return fd_slopes(hidden_plus, hidden_minus, *head_rows, scale, fd_step)

    return blockwise_spread(weight.shape[0], block, chunk)
