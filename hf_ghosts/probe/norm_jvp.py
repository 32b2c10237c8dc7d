"""LayerNorm and RMSNorm with their forward-mode derivative in closed form: pure (primal, tangent) functions.

Over the last dimension, with ``r = 1 / sqrt(var + eps)`` and ``xhat = (x - mean x) r``
(RMSNorm: no centring, ``var = mean x^2``), a tangent ``tx`` moves ``xhat`` by::

    t_xhat = r (tc - xhat * mean(xhat * tc)),    tc = tx - mean(tx)   (RMSNorm: tc = tx).

Statistics are in fp32 for half inputs (fp64 kept), as torch's layer_norm and transformers'
RMSNorms compute them. No dual tensors, no host syncs: ``torch.compile`` can fuse either function.
:func:`fused_norm_jvps` runs a model's norm modules (:data:`~hf_ghosts.architectures.NORM_STYLES`) through them
under forward-mode AD, instead of autograd's ~22 ops per norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from enum import StrEnum

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from hf_ghosts.architectures import norm_style

__all__ = ["RmsNormStyle", "fused_norm_jvps", "layer_norm_jvp", "rms_norm_jvp"]


class RmsNormStyle(StrEnum):
    """Where transformers' RMSNorm variants apply the weight and cast back to the input dtype."""

    LLAMA = "llama"  # w * xhat.to(dtype)   (Llama, Mistral, Qwen2/3, OLMo2, ...)
    GEMMA = "gemma"  # (xhat * (1 + w.float())).to(dtype)   (Gemma 1/2/3, zero-initialized weight)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check(name: str, x: torch.Tensor, tx: torch.Tensor, **params: torch.Tensor | None) -> None:
    if tx.shape != x.shape:
        raise ValueError(f"{name}: tx must have the shape of x {tuple(x.shape)}; got {tuple(tx.shape)}")
    for pname, param in params.items():
        if param is not None and tuple(param.shape) != (x.shape[-1],):
            raise ValueError(f"{name}: `{pname}` must have shape ({x.shape[-1]},) (the last dim of x); got {tuple(param.shape)}")


def _normalized_jvp(xc: torch.Tensor, tc: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``xhat = xc r`` and ``t_xhat = r (tc - xhat mean(xhat tc))`` with ``r = rsqrt(mean(xc^2) + eps)``."""
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    t_xhat = (tc - xhat * (xhat * tc).mean(-1, keepdim=True)) * rstd
    return xhat, t_xhat


def layer_norm_jvp(
    x: torch.Tensor,
    tx: torch.Tensor,
    weight: torch.Tensor | None = None,
    t_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    t_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = F.layer_norm(x, (D,), w, b, eps)`` and ``ty = t_xhat w + xhat tw + tb`` over the last dim ``D``.

    ``t_weight`` / ``t_bias`` None: the parameter does not move (or is absent). Outputs in ``x.dtype``.

    Example (scaling the input leaves the output unchanged: the tangent along ``x`` itself is 0, up to rounding):

    >>> x = torch.tensor([[1.0, 2.0, 4.0]])
    >>> y, ty = layer_norm_jvp(x, x, eps=0.0)
    >>> y
    tensor([[-1.0690, -0.2673,  1.3363]])
    >>> bool(ty.abs().max() < 1e-6)
    True
    """
    _check("layer_norm_jvp", x, tx, weight=weight, t_weight=t_weight, bias=bias, t_bias=t_bias)
    compute = _compute_dtype(x)
    xf, txf = x.to(compute), tx.to(compute)
    xhat, t_xhat = _normalized_jvp(xf - xf.mean(-1, keepdim=True), txf - txf.mean(-1, keepdim=True), eps)
    y, ty = xhat, t_xhat
    if weight is not None:
        w = weight.to(compute)
        y, ty = y * w, ty * w
        if t_weight is not None:
            ty = ty + xhat * t_weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
        if t_bias is not None:
            ty = ty + t_bias.to(compute)
    return y.to(x.dtype), ty.to(x.dtype)


def rms_norm_jvp(
    x: torch.Tensor,
    tx: torch.Tensor,
    weight: torch.Tensor | None = None,
    t_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    style: RmsNormStyle | str = RmsNormStyle.LLAMA,
    compute: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm ``xhat = x / sqrt(mean x^2 + eps)`` times the weight, and its tangent, as transformers computes it.

    ``style="llama"``: ``y = w * xhat.to(dtype)``, ``ty = w * t_xhat.to(dtype) + tw * xhat.to(dtype)``
    (the weight product in the parameters' dtype, as ``LlamaRMSNorm``). ``style="gemma"``:
    ``y = (xhat (1 + w)).to(dtype)``, ``ty = (t_xhat (1 + w) + xhat tw).to(dtype)`` in fp32 (``GemmaRMSNorm``).

    ``compute``: the statistics' dtype (default: fp32 for half inputs, the input's otherwise; transformers' RMSNorms
    use fp32 whatever the input).

    Example (the norm forgets the input's scale: the tangent along ``x`` is 0, up to ``eps`` and rounding):

    >>> x = torch.tensor([[1.0, 2.0, 2.0]])
    >>> y, ty = rms_norm_jvp(x, 2 * x, eps=0.0)
    >>> y
    tensor([[0.5774, 1.1547, 1.1547]])
    >>> bool(ty.abs().max() < 1e-6)
    True
    """
    if style not in tuple(RmsNormStyle):
        raise ValueError(f"rms_norm_jvp: style must be one of {[s.value for s in RmsNormStyle]}; got {style!r}")
    style = RmsNormStyle(style)
    _check("rms_norm_jvp", x, tx, weight=weight, t_weight=t_weight)
    compute = _compute_dtype(x) if compute is None else compute
    xhat, t_xhat = _normalized_jvp(x.to(compute), tx.to(compute), eps)
    if style is RmsNormStyle.GEMMA:
        if weight is not None:
            scale = 1.0 + weight.to(compute)
            y, ty = xhat * scale, t_xhat * scale
            if t_weight is not None:
                ty = ty + xhat * t_weight.to(compute)
        else:
            y, ty = xhat, t_xhat
        return y.to(x.dtype), ty.to(x.dtype)
    xhat, t_xhat = xhat.to(x.dtype), t_xhat.to(x.dtype)
    if weight is None:
        return xhat, t_xhat
    y, ty = weight * xhat, weight * t_xhat
    if t_weight is not None:
        ty = ty + t_weight * xhat
    return y, ty


def _fused_forward(module: torch.nn.Module, style: str, eps: float, original: Callable) -> Callable:
    """``module``'s forward with the closed-form tangent: dual in, dual out; the module's own forward otherwise.

    LayerNorm's output is ``F.layer_norm`` itself (as the module computes it); the RMSNorm styles compute the
    output with the same ops as transformers' forward.
    """

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x, tx = fwAD.unpack_dual(hidden_states)
        w, tw = fwAD.unpack_dual(module.weight) if module.weight is not None else (None, None)
        bias = getattr(module, "bias", None)
        b, tb = fwAD.unpack_dual(bias) if bias is not None else (None, None)
        if args or kwargs or (tx is None and tw is None and tb is None):
            return original(hidden_states, *args, **kwargs)
        tx = torch.zeros_like(x) if tx is None else tx
        if style == "layer_norm":
            y = F.layer_norm(x, module.normalized_shape, w, b, eps)
            ty = layer_norm_jvp(x, tx, w, tw, b, tb, eps)[1]
        else:
            y, ty = rms_norm_jvp(x, tx, w, tw, eps, style, compute=torch.float32)  # fp32, as transformers
        return fwAD.make_dual(y, ty)

    return forward


@contextlib.contextmanager
def fused_norm_jvps(model: torch.nn.Module) -> Iterator[int]:
    """For the block, every norm module of ``model`` with a known style (:func:`~hf_ghosts.architectures.norm_style`)
    computes its tangent in closed form under forward-mode AD; the forwards are restored after. Yields how many."""
    patched: list[tuple[torch.nn.Module, object]] = []
    try:
        for module in model.modules():
            found = norm_style(module)
            if found is None or "forward" in module.__dict__:  # an instance's own forward (a user's) is kept
                continue
            module.forward = _fused_forward(module, found[0], found[1], module.forward)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
