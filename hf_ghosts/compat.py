"""Workarounds for ``transformers``, ``torch`` and ``accelerate`` internals, all in one place.

Each one names the version it was written for and has a test in ``tests/test_compat.py`` that fails
with "upstream fixed ...: delete compat.<name>" (or "... moved: update compat.<name>") when the
installed ``transformers`` no longer needs it (or no longer has what it uses).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

# the sdpa pieces the "ghosts" attention delegates to (transformers 5.24): not exported by transformers itself
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

__all__ = ["checkpoint_keys_renamed", "checkpoint_to_model_keys", "is_bare_backbone"]


# ----------------------------------------------------------------------------- bare backbones (transformers 5.24)
def is_bare_backbone(model: torch.nn.Module) -> bool:
    """Whether ``model`` is the bare backbone of its ``model_type`` (what ``AutoModel`` loads: hidden states, no logits).

    Uses ``transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES`` (``model_type -> class name(s)``), which
    is not public API; a model without ``config.model_type`` is never a bare backbone.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return False
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    bare = MODEL_MAPPING_NAMES.get(model_type, ())
    return type(model).__name__ in ((bare,) if isinstance(bare, str) else bare)


# ----------------------------------------------------------------------------- renamed checkpoint keys (transformers 5.2x)
def checkpoint_to_model_keys(model: PreTrainedModel, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's key names back to the model's (GPT-NeoX saves ``lm_head.weight`` as ``embed_out.weight``).

    ``save_pretrained`` reverses the model's weight renamings; ``Trainer`` resumes with a bare
    ``model.load_state_dict(strict=False)``, which does not apply them again, so a renamed tensor
    would silently keep its initial value. Keys the model knows are kept as they are.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

    renamings = [
        transform
        for transform in get_model_conversion_mapping(model, add_legacy=False)
        if isinstance(transform, WeightRenaming) and not isinstance(transform, PrefixChange)
    ]
    if not renamings:
        return dict(state_dict)
    known = set(model.state_dict())
    renamed = {}
    for key, tensor in state_dict.items():
        if key not in known and (candidate := apply_renamings(key, renamings)) in known:
            key = candidate
        renamed[key] = tensor
    return renamed


@contextlib.contextmanager
def checkpoint_keys_renamed(model: torch.nn.Module) -> Iterator[None]:
    """While active, ``model.load_state_dict`` first maps checkpoint keys to the model's (all Trainer load paths use it)."""
    if not isinstance(model, PreTrainedModel):
        yield
        return
    load = model.load_state_dict
    shadowed = model.__dict__.get("load_state_dict")

    def load_state_dict(state_dict: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return load(checkpoint_to_model_keys(model, state_dict), *args, **kwargs)

    model.load_state_dict = load_state_dict
    try:
        yield
    finally:
        if shadowed is None:
            del model.load_state_dict
        else:
            model.load_state_dict = shadowed


# ----------------------------------------------------------------------------- switching attention (transformers 5.24)
__all__ += ["attention_implementation", "attention_implementation_of"]


def attention_implementation_of(model: torch.nn.Module) -> str | None:
    """The attention implementation ``model`` dispatches to (``config._attn_implementation``); ``None`` without."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """While active, ``model``'s attention layers dispatch to ``name``; the implementation found is restored on exit.

    Writes ``config._attn_implementation``, which every attention layer reads at each call (and which sets
    the sub-configs too), instead of the public ``model.set_attn_implementation(name)``: that one re-checks
    the implementation on every switch (for flash/kernel implementations it may re-resolve the name to a
    kernel fallback or import a hub kernel, so switching back is not a plain restore) and walks every
    module (~1 ms per switch on an 800-module model).
    """
    config = model.config
    found = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = found


# ----------------------------------------------------------------------------- sdpa for ghosts (transformers 5.24)
__all__ += ["repeat_kv", "sdpa_attention_forward", "sdpa_mask"]
# ``sdpa_attention_forward`` and ``sdpa_mask`` (imported above) are what transformers registers as "sdpa" with
# ``AttentionInterface`` and ``AttentionMaskInterface``: outside a probe the ghosts attention is exactly sdpa.
# ``repeat_kv`` (``[b, kv, t, d] -> [b, kv * groups, t, d]``) spreads grouped key/value heads over the query heads.

__all__ += ["sdpa_mask_without_sync"]
_SDPA_MASK_SIGNATURE = inspect.signature(sdpa_mask)


def sdpa_mask_without_sync(*args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """transformers' sdpa mask without reading the padding mask on the host, and the key padding it is made of.

    With a 2-D padding mask, ``sdpa_mask`` asks ``_ignore_causal_mask_sdpa`` whether it can return ``None``, which
    calls ``fast_all(padding_mask)``: a host sync. Here the mask is then always materialized (boolean
    ``[B, 1, Tq, Tk]``; the same keys allowed as ``None`` with ``is_causal``). Returns ``(mask, padding)``:
    ``padding`` is the ``[B, Tk]`` key padding when the mask is exactly ``causal & padding`` (the plain causal mask
    function, no offsets, no window, ``Tq == Tk``), else ``None``. Without a padding mask nothing is read: as sdpa.
    """
    bound = _SDPA_MASK_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if given["attention_mask"] is None:
        return sdpa_mask(*bound.args, **bound.kwargs), None
    given["allow_is_causal_skip"] = False
    mask = sdpa_mask(*bound.args, **bound.kwargs)
    plain = (
        given["mask_function"] is causal_mask_function and given["local_size"] is None and not given["use_vmap"]
        and isinstance(given["q_offset"], int) and isinstance(given["kv_offset"], int)
        and given["q_offset"] == 0 and given["kv_offset"] == 0 and given["q_length"] == given["kv_length"]
    )
    padding = prepare_padding_mask(given["attention_mask"], given["kv_length"], given["kv_offset"]) if plain else None
    return mask, None if padding is None else padding.to(torch.bool)


# ----------------------------------------------------------------------------- the eager, unwrapped forward
__all__ += ["without_autocast_wrapper", "without_compiled_call"]


@contextlib.contextmanager
def without_autocast_wrapper(model: torch.nn.Module) -> Iterator[None]:
    """While active, ``model.forward`` is the forward Accelerate wrapped in autocast (accelerate 1.15); restored.

    Under mixed precision ``Accelerator.prepare_model`` keeps the forward as ``model._original_forward`` and sets an
    instance ``forward`` that runs it under autocast and casts the outputs to fp32. A model without both is left alone.
    """
    wrapped_forward = model.__dict__.get("forward")
    original_forward = getattr(model, "_original_forward", None)
    if wrapped_forward is not None and original_forward is not None:
        model.forward = original_forward
    try:
        yield
    finally:
        if wrapped_forward is not None:
            model.forward = wrapped_forward


@contextlib.contextmanager
def without_compiled_call(model: torch.nn.Module) -> Iterator[None]:
    """While active, ``model(...)`` runs the eager module even after an in-place ``model.compile()`` (torch 2.13);
    restored on exit.

    ``nn.Module.compile()`` stores the compiled call as ``model._compiled_call_impl``, which ``__call__`` prefers;
    forward-mode AD fails inside inductor's ``out=`` kernels.
    """
    compiled_call = model.__dict__.get("_compiled_call_impl")
    if compiled_call is not None:
        model._compiled_call_impl = None
    try:
        yield
    finally:
        if compiled_call is not None:
            model._compiled_call_impl = compiled_call


# ----------------------------------------------------------------------------- DTensor shard offsets (torch private)
__all__ += ["dtensor_offset"]


def dtensor_offset(tensor: Any) -> tuple[int, ...]:
    """Where this rank's piece of the DTensor ``tensor`` starts in the full tensor, per dimension: torch's private
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` (torch 2.13), the rule ``to_local()``
    follows (FSDP2's ``Shard(0)`` chunks, uneven ones included)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return tuple(compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)[1])


# ----------------------------------------------------------------------------- FSDP2 all-gather dtype (torch 2.11-2.13)
__all__ += ["fsdp_full_precision", "fsdp_param_groups"]


def fsdp_param_groups(module: torch.nn.Module) -> list[Any]:
    """The ``FSDPParamGroup``s of one ``fully_shard``-ed module (``_fsdp_param_groups`` in torch 2.13, the single
    ``_fsdp_param_group`` before); empty for a module without parameters of its own."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = state._fsdp_param_group
        groups = [] if group is None else [group]
    return list(groups)


def _drop_unsharded(fsdp_param: Any) -> None:
    """Forget the all-gather buffers and the unsharded parameter, so the next all-gather allocates them anew in
    the then current ``param_dtype`` (FSDP2 allocates them once, at the first all-gather, and reuses them)."""
    fsdp_param.free_unsharded_param()
    fsdp_param.all_gather_outputs = []
    if hasattr(fsdp_param, "_unsharded_param"):
        del fsdp_param._unsharded_param


@contextlib.contextmanager
def fsdp_full_precision(modules: list[torch.nn.Module]) -> Iterator[None]:
    """While active, the ``fully_shard``-ed ``modules`` all-gather and compute in their parameters' own dtype
    (fp32 shards: fp32), whatever their ``MixedPrecisionPolicy`` says; on exit the policy is back.

    FSDP2 reads the cast from each ``FSDPParam.param_dtype`` (set from the policy by ``init_dtype_attrs`` at
    lazy init; ``None`` means no cast), and casts float forward inputs and outputs by the state's ``_mp_policy``
    (``param_dtype``, ``output_dtype``). This sets all of them to "no cast" and drops the buffers FSDP2 allocated for 16-bit all-gathers (and again on exit, so
    training all-gathers in 16 bits into fresh buffers). Call it with every module resharded (no unsharded
    parameter alive). Private torch internals: ``tests/test_compat.py`` fails if they change.
    """
    from dataclasses import replace

    switched: list[tuple[Any, torch.dtype]] = []
    policies: list[tuple[Any, str, Any]] = []
    for module in modules:
        state = module._get_fsdp_state()
        owners = [(state, "_mp_policy"), *((group, "mp_policy") for group in fsdp_param_groups(module))]
        for owner, name in owners:
            policy = getattr(owner, name)
            if policy.param_dtype is not None or policy.output_dtype is not None:
                policies.append((owner, name, policy))
        for group in fsdp_param_groups(module):
            switched += [(p, p.param_dtype) for p in group.fsdp_params if p.param_dtype is not None]
    for owner, name, policy in policies:
        setattr(owner, name, replace(policy, param_dtype=None, output_dtype=None))
    for fsdp_param, _ in switched:
        _drop_unsharded(fsdp_param)
        fsdp_param.param_dtype = None
    try:
        yield
    finally:
        for fsdp_param, dtype in switched:
            _drop_unsharded(fsdp_param)
            fsdp_param.param_dtype = dtype
        for owner, name, policy in policies:
            setattr(owner, name, policy)


# ----------------------------------------------------------------------------- switching MoE experts (transformers 5.24)
__all__ += ["experts_implementation", "experts_implementation_of"]


def experts_implementation_of(model: torch.nn.Module) -> str | None:
    """The MoE experts implementation ``model`` dispatches to (``config._experts_implementation``); ``None`` without
    (no ``@use_experts_implementation`` experts in its modeling file)."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if not (callable(can_set) and can_set()):
        return None
    return getattr(getattr(model, "config", None), "_experts_implementation", None)


@contextlib.contextmanager
def experts_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """While active, ``model``'s MoE experts dispatch to ``name`` (``"eager"``: forward-mode AD works; ``_grouped_mm``
    has none); the implementations found (``get_experts_implementation()``, sub-configs included) are restored."""
    found = model.get_experts_implementation()
    model.set_experts_implementation(name)
    try:
        yield
    finally:
        model.set_experts_implementation(found)


# ------------------------------------------------------------------------------------------ what a model wraps and routes
__all__ += [
    "ATTENTION_ROUTED_SINCE", "attention_routed_in_installed", "can_set_attention", "compiled_original",
    "dispatches_attention", "module_routes_attention",
]

# Families whose attention transformers routes through ``AttentionInterface`` only from a given release on (before it,
# their own attention code runs and the attention radius is refused). The family table of the README says so;
# tests/test_compat.py checks each entry against the installed transformers by running the model
# (:func:`dispatches_attention`), so a wrong version here fails at either end of the tested range.
ATTENTION_ROUTED_SINCE: dict[str, str] = {"falcon": "5.25.0"}


def attention_routed_in_installed(model_type: str) -> bool | None:
    """Whether the installed transformers routes ``model_type``'s attention, by :data:`ATTENTION_ROUTED_SINCE`;
    ``None`` for a family not listed there (routed in every supported release, or never)."""
    since = ATTENTION_ROUTED_SINCE.get(model_type)
    if since is None:
        return None
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(since)


def compiled_original(model: torch.nn.Module) -> torch.nn.Module | None:
    """The eager module ``torch.compile(model)`` wraps (``OptimizedModule._orig_mod``, torch 2.13), else ``None``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None


def can_set_attention(model: torch.nn.Module) -> bool:
    """Whether transformers says ``model`` can switch its attention implementation
    (``PreTrainedModel._can_set_attn_implementation``, private in transformers 5.24; it answers yes for Mamba too)."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return bool(callable(can_set) and can_set())


@functools.cache
def module_routes_attention(module_name: str) -> bool:
    """Whether the source of module ``module_name`` dispatches attention through ``ALL_ATTENTION_FUNCTIONS``
    (``ALL_ATTENTION_FUNCTIONS.get_interface(...)``, the modeling files' idiom in transformers 5.24)."""
    source = sys.modules.get(module_name)
    try:
        return source is not None and "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(source)
    except (OSError, TypeError):
        return False


def dispatches_attention(model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether ``model``'s forward on ``input_ids`` calls an implementation registered with ``AttentionInterface``:
    the library asked by running it, not by reading its source (the capability :func:`module_routes_attention`
    and :func:`can_set_attention` read). The model runs once with a recording implementation (sdpa inside) and is
    restored; a model that refuses to switch implementations (``_can_set_attn_implementation`` False) does not
    dispatch."""
    from transformers import AttentionInterface, AttentionMaskInterface

    if not can_set_attention(model):
        return False
    calls = []

    def recording(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    name = "hf_ghosts_dispatch_check"
    AttentionInterface.register(name, recording)
    AttentionMaskInterface.register(name, sdpa_mask)
    with attention_implementation(model, name), torch.no_grad():
        model(input_ids=input_ids)
    return bool(calls)
