"""Closed-form LayerNorm / RMSNorm JVPs against torch.func.jvp of torch's layer_norm and transformers' RMSNorms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_ghosts.probe.norm_jvp import layer_norm_jvp, rms_norm_jvp

D = 12


def draws(dtype=torch.float64, seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, 5, D, generator=gen, dtype=torch.float64) + 1.5  # an offset: centring matters
    rest = [torch.randn(*((2, 5, D) if i == 0 else (D,)), generator=gen, dtype=torch.float64) for i in range(n - 1)]
    return [t.to(dtype) for t in (x, *rest)]


def module_jvp(module: torch.nn.Module, x, tx, tw):
    """torch.func.jvp of a transformers module with respect to (input, weight)."""
    weight = module.weight.detach()

    def forward(x, w):
        return torch.func.functional_call(module, {"weight": w}, (x,))

    return torch.func.jvp(forward, (x, weight), (tx, tw))


def test_layer_norm_float64_against_torch_func_jvp() -> None:
    x, tx, w, tw, b, tb = draws()
    expected = torch.func.jvp(lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5), (x, w, b), (tx, tw, tb))
    got = layer_norm_jvp(x, tx, w, tw, b, tb, eps=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    # frozen parameters, and no affine parameters at all
    frozen = torch.func.jvp(lambda x: F.layer_norm(x, (D,), w, b, 1e-5), (x,), (tx,))
    torch.testing.assert_close(layer_norm_jvp(x, tx, w, None, b, None, eps=1e-5), frozen, atol=1e-12, rtol=1e-12)
    plain = torch.func.jvp(lambda x: F.layer_norm(x, (D,), eps=1e-5), (x,), (tx,))
    torch.testing.assert_close(layer_norm_jvp(x, tx, eps=1e-5), plain, atol=1e-12, rtol=1e-12)


def test_layer_norm_bfloat16_close_to_torch() -> None:
    x, tx, w, tw, b, tb = draws(torch.bfloat16)
    y, ty = layer_norm_jvp(x, tx, w, tw, b, tb, eps=1e-5)
    assert y.dtype == ty.dtype == torch.bfloat16
    primals, tangents = (tuple(t.double() for t in group) for group in ((x, w, b), (tx, tw, tb)))
    ref = torch.func.jvp(lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5), primals, tangents)
    for got, want in zip((y, ty), ref, strict=True):
        assert (got.double() - want).abs().max() / want.abs().max() < 1e-2


def rms_reference(x, w, eps, offset):
    """float64 RMSNorm by its formula: x / sqrt(mean x^2 + eps) * (offset + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


@pytest.mark.parametrize(("style", "offset"), [("llama", 0.0), ("gemma", 1.0)])
def test_rms_norm_float64_against_formula(style: str, offset: float) -> None:
    x, tx, w, tw = draws(n=4)
    expected = torch.func.jvp(lambda x, w: rms_reference(x, w, 1e-6, offset), (x, w), (tx, tw))
    got = rms_norm_jvp(x, tx, w, tw, eps=1e-6, style=style)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    frozen = torch.func.jvp(lambda x: rms_reference(x, w, 1e-6, offset), (x,), (tx,))
    torch.testing.assert_close(rms_norm_jvp(x, tx, w, None, eps=1e-6, style=style), frozen, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("cls", "style"), [(LlamaRMSNorm, "llama"), (GemmaRMSNorm, "gemma")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_modules(cls, style: str, dtype: torch.dtype) -> None:
    x, tx, w, tw = draws(dtype, n=4)
    module = cls(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    expected = module_jvp(module, x, tx, tw)
    got = rms_norm_jvp(x, tx, module.weight.detach(), tw, eps=1e-6, style=style)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        else:  # the same casts in the same places: at most one bf16 rounding step apart
            torch.testing.assert_close(g, e, atol=0.0, rtol=2**-7)


def test_scale_invariance_and_bad_arguments() -> None:
    x, tx, w, *_ = draws(n=4)
    torch.testing.assert_close(layer_norm_jvp(x, 3 * x - 2.0, eps=0.0)[1], torch.zeros_like(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(rms_norm_jvp(x, 2 * x, w, eps=0.0)[1], torch.zeros_like(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="rms_norm_jvp: style must be one of"):
        rms_norm_jvp(x, tx, w, style="t5")
    with pytest.raises(ValueError, match="layer_norm_jvp: `weight` must have shape"):
        layer_norm_jvp(x, tx, w[:3])


# ----------------------------------------------------------------------------- fused_norm_jvps: the modules patched
def norm_modules() -> list[tuple[str, torch.nn.Module]]:
    """One module of each class in NORM_STYLES that transformers still has (a class that moved fails here)."""
    import importlib

    from hf_ghosts.architectures import NORM_STYLES

    built = [("LayerNorm", torch.nn.LayerNorm(D))]
    for name in sorted(set(NORM_STYLES) - {"LayerNorm"}):
        model_type = {"Qwen2MoeRMSNorm": "qwen2_moe"}.get(name, name.removesuffix("RMSNorm").lower())
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        built.append((name, getattr(module, name)(D)))
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_jvps_match_autograd_through_every_listed_class(dtype) -> None:
    """Every class of NORM_STYLES: under forward AD the patched forward gives the module's own output bit for bit
    and autograd's tangent to rounding; the model's forwards come back after."""
    import torch.autograd.forward_ad as fwAD

    from hf_ghosts.probe.norm_jvp import fused_norm_jvps

    x, tx, w, tw, b, tb = draws(dtype)
    for name, module in norm_modules():
        module = module.to(dtype)
        with torch.no_grad():
            module.weight.copy_(w)
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(b)
        tangents = {"weight": tw, **({"bias": tb} if getattr(module, "bias", None) is not None else {})}

        def run(module=module, tangents=tangents):
            with fwAD.dual_level():
                params = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in module.named_parameters()}
                out = torch.func.functional_call(module, params, (fwAD.make_dual(x, tx),))
                return fwAD.unpack_dual(out)

        expected = run()
        with fused_norm_jvps(module) as patched:
            assert patched == 1, name
            got = run()
        assert "forward" not in module.__dict__, name
        assert torch.equal(got.primal, expected.primal), name
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.tangent, expected.tangent, **tol, msg=name)


def test_fused_norm_jvps_leave_an_instance_forward_and_unknown_norms_alone() -> None:
    from hf_ghosts.probe.norm_jvp import fused_norm_jvps

    own = LlamaRMSNorm(D)
    mine = own.forward
    own.forward = mine  # an instance-level forward, as a user or a test may set
    model = torch.nn.Sequential(own, torch.nn.LayerNorm((3, D)), torch.nn.GroupNorm(1, D), LlamaRMSNorm(D))
    with fused_norm_jvps(model) as patched:
        assert patched == 1  # only the last: the instance forward, a 2-D LayerNorm and GroupNorm are not touched
        assert model[0].forward is mine
    assert model[0].forward is mine and "forward" not in model[3].__dict__
