"""The chunked output head: per-position spread of the logit slopes, built over vocabulary blocks.

For logits ``z = x W^T + b`` of a linear head (``x`` the head's input, ``W`` ``[classes, hidden]``)
moved along a unit direction ``v`` with slopes ``x'``, ``W'``, ``b'``, the product rule gives

    a = x' W^T + x W'^T + b'                                           (jvp)

and central differences at a step ``h`` along ``v``, with ``x+-`` the head's inputs at ``theta +- h v``,

    a = (z+ - z-) / 2h,   z+- = x+- (W +- h W')^T + (b +- h b').           (fd)

The output radius needs only each position's spread ``max_k a_k - min_k a_k`` (eq. 14), so ``a`` is
built ``chunk`` rows of ``W`` at a time and only every position's running max and min are kept:
the ``[batch, seq, classes]`` logits and slopes never exist. Tensors in, tensors out.

The glue to the probe: :class:`LinearHead` (the head ``W`` and ``b`` are read from), :func:`stopping_at` (the
forward stops at the head's input, :class:`HeadReached`), the rows of logits and slopes the top-k output radius
needs (:func:`full_rows`, :func:`jvp_head_rows`, :func:`fd_head_rows`, :func:`topk_output_radius`) and the
spread over the positions that count (:func:`output_spread`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_ghosts.architectures import base_model_of, chunked_head_blocker
from hf_ghosts.radii import TOPK_POOL, spread, topk_radius, widest_tokens
from hf_ghosts.settings import RhoSettings

__all__ = [
    "HeadReached",
    "LinearHead",
    "blockwise_spread",
    "fd_head_rows",
    "fd_slopes",
    "fd_spread",
    "full_rows",
    "jvp_head_rows",
    "jvp_slopes",
    "jvp_spread",
    "output_spread",
    "stopping_at",
    "topk_output_radius",
]


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

    Example:

    >>> blockwise_spread(3, lambda rows: torch.tensor([[1.0, 4.0, -2.0]])[:, rows], 2)
    tensor([6.])
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
    """Per position, the spread of :func:`jvp_slopes` (``a = x' W^T + x W'^T + b'``), ``chunk`` classes at a time.

    Where the head moves (``W'`` given), each block is one GEMM over the stacked inputs,
    ``a = [x', x] [W, W']^T + b'`` (one accumulation, fp32 inside a 16-bit GEMM, one rounding).
    """
    hidden_slope = torch.zeros_like(hidden) if hidden_slope is None else hidden_slope
    if weight_slope is None:
        def block(rows: slice) -> torch.Tensor:
            return F.linear(hidden_slope, weight[rows], _rows(bias_slope, rows))
    else:
        stacked_hidden = torch.cat((hidden_slope, hidden), dim=-1)  # [..., 2 hidden]
        stacked_weight = torch.cat((weight, weight_slope), dim=-1)  # [classes, 2 hidden]

        def block(rows: slice) -> torch.Tensor:
            return F.linear(stacked_hidden, stacked_weight[rows], _rows(bias_slope, rows))

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


class HeadReached(BaseException):  # a control-flow signal, not an error
    """Raised by the head's pre-hook: the forward stops where the full-vocabulary head would run.

    A ``BaseException``, so that no ``except Exception`` in model code swallows it.
    """


@dataclass(frozen=True)
class LinearHead:
    """The output head the chunked head reads ``W`` and ``b`` of, and their names in the weights and the direction."""

    module: torch.nn.Linear
    weight_name: str
    bias_name: str | None

    @classmethod
    def of(cls, model: torch.nn.Module, chunked_head: bool | None, settings: RhoSettings) -> LinearHead | None:
        """The head if the chunked head applies (``chunked_head`` not False; True: an error saying why it cannot,
        naming the keyword as ``settings``' caller passes it, :meth:`~hf_ghosts.settings.RhoSettings.probe_keyword`)."""
        blocker = None if chunked_head is False else chunked_head_blocker(model)
        if chunked_head is False or blocker is not None:
            if chunked_head:
                spelled, taker = settings.probe_keyword("chunked_head")
                raise ValueError(
                    f"{spelled}=True given to {taker}, but {blocker}. Pass {spelled}=None to fall back to the "
                    f"full logits automatically (or {spelled}=False)"
                )
            return None
        module = base_model_of(model).get_output_embeddings()
        # named_parameters() names a tied weight once: the name the direction and weights use
        names = {id(p): name for name, p in model.named_parameters()}
        return cls(module, names[id(module.weight)], names.get(id(module.bias)))

    def tensors(
        self, weights: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``W, W', b, b'``: weights as the forward sees them, ``W'``/``b'`` the direction's entries for them
        (the unit direction's for jvp, the raw one's for fd); ``None`` where it has none."""
        weight = weights.get(self.weight_name, self.module.weight.detach())  # absent: frozen, the module's own
        if self.bias_name is None:
            return weight, direction.get(self.weight_name), None, None
        bias = weights.get(self.bias_name, self.module.bias.detach())
        return weight, direction.get(self.weight_name), bias, direction.get(self.bias_name)


@contextlib.contextmanager
def stopping_at(module: torch.nn.Module, captured: list[torch.Tensor]) -> Iterator[None]:
    """A pre-hook on ``module`` (the head) for the block: append its input ``x`` to ``captured``, stop the forward."""

    def hook(module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise HeadReached

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def full_rows(slopes: torch.Tensor, *logits: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Rows of the full head's ``[..., classes]`` slopes and logits (the mean of ``logits``: ``z``, or fd's ``z+``
    and ``z-``, ``z(theta)`` to ``O(h^2)``), by flat position index; only the chosen rows are ever averaged."""
    classes = slopes.shape[-1]

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [part.reshape(-1, classes)[index] for part in logits]
        return sum(picked) / len(picked), slopes.reshape(-1, classes)[index]

    return rows


def jvp_head_rows(
    hidden: torch.Tensor, hidden_slope: torch.Tensor | None, weight: torch.Tensor, weight_slope: torch.Tensor | None,
    bias: torch.Tensor | None, bias_slope: torch.Tensor | None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Chunked head, jvp: ``z = x W^T + b`` and ``a = x' W^T + x W'^T + b'`` at the chosen positions only."""
    width = hidden.shape[-1]

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.reshape(-1, width)[index]
        x_slope = None if hidden_slope is None else hidden_slope.reshape(-1, width)[index]
        return torch.nn.functional.linear(x, weight, bias), jvp_slopes(x, x_slope, weight, weight_slope, bias_slope)

    return rows


def fd_head_rows(
    hidden_plus: torch.Tensor, hidden_minus: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    weight_step: torch.Tensor | None, bias_step: torch.Tensor | None, scale: float, fd_step: float,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Chunked head, fd: ``z = ((x+ + x-) / 2) W^T + b`` (``z(theta)`` to ``O(h^2)``) and :func:`fd_slopes`
    at the chosen positions only."""
    width = hidden_plus.shape[-1]

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plus, minus = hidden_plus.reshape(-1, width)[index], hidden_minus.reshape(-1, width)[index]
        slopes = fd_slopes(plus, minus, weight, bias, weight_step, bias_step, scale, fd_step)
        return torch.nn.functional.linear((plus + minus) / 2, weight, bias), slopes

    return rows


def topk_output_radius(
    per_position: torch.Tensor, positions: torch.Tensor, rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    topk: int,
) -> torch.Tensor:
    """:func:`~hf_ghosts.radii.topk_radius` over the ``topk`` distinct valid positions of largest spread (float32);
    ``rows`` gives the chosen positions' logits and slopes."""
    chosen, following = widest_tokens(per_position, positions, TOPK_POOL * topk)
    logits, slopes = rows(chosen)
    return topk_radius(logits, slopes, following, topk).to(per_position.device, torch.float32)


def output_spread(per_position: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_t spread_t`` over the ``positions`` that count (0 if none), and their number."""
    masked = torch.where(positions, per_position, torch.zeros_like(per_position))
    return (masked.amax() if per_position.numel() else per_position.new_zeros(())), positions.sum()
