"""Persistent flat buffers for the probe's 16-bit copies of the weights and of the direction.

A probe in another dtype than the parameters (a bf16 probe of fp32 weights) needs both cast on every measurement.
Tensor by tensor that is one allocation and one cast kernel per parameter; here it is one ``torch._foreach_copy_``
into a flat buffer allocated once and kept (its views, one per name, are what the forward reads).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["FlatBuffer"]


class FlatBuffer:
    """One flat ``dtype`` buffer with a view per name, refilled by one foreach copy (cast included).

    Reallocated only when the names, shapes or device change. What :meth:`fill` returns is overwritten by the
    next fill: a measurement's weights and direction live only while it runs.

    Example (a bf16 ``[2, 3]`` view of ones):

    >>> FlatBuffer(torch.bfloat16).fill({"w": torch.ones(2, 3)})["w"]
    tensor([[1., 1., 1.],
            [1., 1., 1.]], dtype=torch.bfloat16)
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._layout: tuple | None = None
        self._views: dict[str, torch.Tensor] = {}

    def fill(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: tensor.to(dtype)}`` as views of the buffer (one foreach copy); tensors on several devices (a
        model split over devices) are cast one by one instead."""
        if not tensors:
            return {}
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            return {name: t.detach().to(self.dtype) for name, t in tensors.items()}
        layout = (*((name, tuple(t.shape)) for name, t in tensors.items()), devices.pop())
        if layout != self._layout:
            flat = torch.empty(sum(t.numel() for t in tensors.values()), dtype=self.dtype, device=layout[-1])
            views, start = {}, 0
            for name, tensor in tensors.items():
                views[name] = flat[start : start + tensor.numel()].view(tensor.shape)
                start += tensor.numel()
            self._layout, self._views, self.flat = layout, views, flat
        torch._foreach_copy_(list(self._views.values()), [t.detach() for t in tensors.values()])
        return dict(self._views)

    def cast(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` detached, the floating ones in the buffer's dtype: as they are where they are in it (no copy),
        else cast into the buffer by one :meth:`fill` (a bf16 probe of fp32 weights)."""
        kept = {name: t.detach() for name, t in tensors.items()}
        return {**kept, **self.fill({n: t for n, t in kept.items() if t.is_floating_point() and t.dtype != self.dtype})}
