"""Architecture knowledge as data: one table, :data:`ARCHITECTURES`, per ``model_type``.

Each entry says where the family keeps its FFN pre-activations (the module whose output feeds the
nonlinearity, the gate projection of gated MLPs, matched as a suffix of the module's qualified
name, and the config attribute naming the activation) and which causal-LM class returns its
linear head's output unchanged as the logits (what the probe's chunked head relies on).
:data:`FFN_PREACTIVATIONS` and :data:`LINEAR_HEAD_MODELS` are views of the table.

:data:`BLOCK_NAMES` says, per ``model_type``, which parameters form which block kind of a block-wise step
(:data:`BLOCK_KINDS`, ``granularity="blocks"``): :func:`parameter_block` places one parameter, splitting a fused
q/k/v projection into its q/k and v parts (:func:`fused_qkv_split`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from hf_ghosts import compat

try:  # torch >= 2.6
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "ARCHITECTURES",
    "BLOCK_KINDS",
    "BLOCK_NAMES",
    "DEFAULT_BLOCK_NAMES",
    "FFN_PREACTIVATIONS",
    "LINEAR_HEAD_MODELS",
    "LOGIT_RESCALING_ATTRS",
    "NORM_STYLES",
    "Architecture",
    "BlockNames",
    "FfnSpec",
    "attention_blocker",
    "base_model_of",
    "chunked_head_blocker",
    "find_ffn_modules",
    "fused_qkv_split",
    "norm_style",
    "original_module",
    "parameter_block",
    "resolve_ffn_activation",
    "resolve_ffn_spec",
]


@dataclass(frozen=True)
class FfnSpec:
    """Suffix of the FFN input projection's module name and the config field of its activation."""

    module_suffix: str
    activation_attr: str


@dataclass(frozen=True)
class Architecture:
    """What hf_ghosts knows of one ``model_type``.

    Attributes:
        ffn: where the FFN pre-activations live (``None``: unknown; pass ``ffn_spec`` to the probe).
        linear_head: the causal-LM class whose forward (transformers 5.23) returns ``logits = self.lm_head(x)``
            unchanged (``x`` the last hidden state, sliced by ``logits_to_keep``): no softcapping, scaling or
            bias after it. ``None``: not known to (gemma2/gemma3 softcap, cohere has ``logit_scale``, granite
            ``logits_scaling``).
    """

    ffn: FfnSpec | None = None
    linear_head: str | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "gemma": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "GemmaForCausalLM"),
    "gpt2": Architecture(FfnSpec("mlp.c_fc", "activation_function"), "GPT2LMHeadModel"),
    "gpt_neox": Architecture(FfnSpec("mlp.dense_h_to_4h", "hidden_act"), "GPTNeoXForCausalLM"),
    "gptj": Architecture(FfnSpec("mlp.fc_in", "activation_function"), "GPTJForCausalLM"),
    "llama": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "LlamaForCausalLM"),
    "mistral": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "MistralForCausalLM"),
    "olmo": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "OlmoForCausalLM"),
    "olmo2": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "Olmo2ForCausalLM"),
    "opt": Architecture(FfnSpec("fc1", "activation_function"), "OPTForCausalLM"),
    "phi": Architecture(FfnSpec("mlp.fc1", "hidden_act"), "PhiForCausalLM"),
    "qwen2": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "Qwen2ForCausalLM"),
    "qwen3": Architecture(FfnSpec("mlp.gate_proj", "hidden_act"), "Qwen3ForCausalLM"),
}
FFN_PREACTIVATIONS: dict[str, FfnSpec] = {name: a.ffn for name, a in ARCHITECTURES.items() if a.ffn is not None}
LINEAR_HEAD_MODELS: dict[str, str] = {
    name: a.linear_head for name, a in ARCHITECTURES.items() if a.linear_head is not None
}
# Normalization modules with a closed-form JVP (hf_ghosts.probe.norm_jvp), by class name: (style, epsilon attribute).
# "layer_norm": torch.nn.LayerNorm over the last dim; "llama": fp32 statistics, w * xhat.to(dtype); "gemma": fp32
# statistics, (xhat * (1 + w)).to(dtype). tests/test_norm_jvp.py checks each class's forward against its style.
NORM_STYLES: dict[str, tuple[str, str]] = {
    "LayerNorm": ("layer_norm", "eps"),
    **{name: ("llama", "variance_epsilon") for name in (
        "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Phi3RMSNorm", "Qwen2MoeRMSNorm", "Qwen2RMSNorm",
        "Qwen3RMSNorm",
    )},
    **{name: ("gemma", "eps") for name in ("Gemma2RMSNorm", "Gemma3RMSNorm", "GemmaRMSNorm")},
}
# Config attributes with which transformers models rescale or cap the logits after the head.
LOGIT_RESCALING_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "logits_soft_cap",
    "output_logit_soft_cap",
    "output_multiplier",
    "logits_mup_width_multiplier",
    "lm_head_multiplier",
)

# ------------------------------------------------------------------------------------------ parameter blocks
#: The block kinds of a block-wise step, in this order: the embeddings (token and position), the q/k projections and
#: q/k norms of all layers (they move the attention scores), the v/o projections of all layers, the MLPs (MoE routers
#: and experts included), the layers' norms, the final norm, the output head, and whatever the table does not place.
BLOCK_KINDS = ("embed", "qk", "vo", "mlp", "norm", "final_norm", "head", "other")
_LAYER = r"(^|\.)(layers|h|blocks)\.\d+\."  # a parameter inside a numbered layer


@dataclass(frozen=True)
class BlockNames:
    """Where one family keeps each block kind: a regular expression per kind, searched in a parameter's qualified name
    (so PEFT's ``q_proj.lora_A.default.weight`` lands where ``q_proj.weight`` does), tried in the order ``fused``,
    ``qk``, ``vo``, ``mlp``, ``norm``, ``embed``, ``final_norm``, ``head``; ``None``: the family has none. ``fused``: a
    q/k/v projection in one tensor, split by :func:`fused_qkv_split` per ``layout``."""

    qk: str | None
    vo: str | None
    mlp: str | None
    norm: str
    embed: str
    final_norm: str
    head: str = r"(^|\.)lm_head\."
    fused: str | None = None
    layout: str | None = None

    def kind_of(self, name: str) -> str:
        """The kind of parameter ``name`` (``"qkv"`` for the fused projection), ``"other"`` where nothing matches."""
        for kind in ("fused", "qk", "vo", "mlp", "norm", "embed", "final_norm", "head"):
            pattern = getattr(self, kind)
            if pattern is not None and re.search(pattern, name):
                return "qkv" if kind == "fused" else kind
        return "other"


_LLAMA = BlockNames(
    qk=r"\.(q_proj|k_proj|q_norm|k_norm)\.", vo=r"\.(v_proj|o_proj)\.", mlp=r"\.(mlp|block_sparse_moe)\.",
    norm=_LAYER + r"(.*\.)?\w*norm\w*\.", embed=r"(^|\.)embed_tokens\.", final_norm=r"(^|\.)norm\.",
)
_GPT2 = BlockNames(qk=None, vo=r"\.attn\.c_proj\.", mlp=r"\.mlp\.", norm=_LAYER + r"ln_[12]\.", embed=r"(^|\.)(wte|wpe)\.",
                   final_norm=r"(^|\.)ln_f\.", fused=r"\.attn\.c_attn\.", layout="concat")
#: The block names per ``model_type`` (:class:`BlockNames`); a family not here gets :data:`DEFAULT_BLOCK_NAMES`.
BLOCK_NAMES: dict[str, BlockNames] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "olmo", "olmo2", "granite", "cohere"), _LLAMA),
    "phi3": BlockNames(qk=None, vo=r"\.o_proj\.", mlp=r"\.mlp\.", norm=_LLAMA.norm, embed=_LLAMA.embed,
                       final_norm=_LLAMA.final_norm, fused=r"\.qkv_proj\.", layout="concat"),
    "phi": BlockNames(qk=r"\.(q_proj|k_proj|q_layernorm|k_layernorm)\.", vo=r"\.(v_proj|dense)\.", mlp=r"\.mlp\.", norm=_LAYER + r"input_layernorm\.",
                      embed=_LLAMA.embed, final_norm=r"(^|\.)final_layernorm\."),
    "gpt_neox": BlockNames(qk=None, vo=r"\.attention\.dense\.", mlp=r"\.mlp\.", norm=_LAYER + r"\w*layernorm\.",
                           embed=r"(^|\.)embed_in\.", final_norm=r"(^|\.)final_layer_norm\.", head=r"(^|\.)(lm_head|embed_out)\.",
                           fused=r"\.attention\.query_key_value\.", layout="heads"),
    "gpt2": _GPT2,
    "gpt_bigcode": replace(_GPT2, layout="bigcode"),
    "gptj": BlockNames(qk=_LLAMA.qk, vo=r"\.attn\.(v_proj|out_proj)\.", mlp=r"\.mlp\.", norm=_LAYER + r"ln_1\.",
                       embed=r"(^|\.)wte\.", final_norm=r"(^|\.)ln_f\."),
    "opt": BlockNames(qk=_LLAMA.qk, vo=r"\.(v_proj|out_proj)\.", mlp=r"\.(fc1|fc2)\.",
                      norm=_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.", embed=r"(^|\.)(embed_tokens|embed_positions)\.",
                      final_norm=r"decoder\.final_layer_norm\."),
    "falcon": BlockNames(qk=None, vo=r"\.self_attention\.dense\.", mlp=r"\.mlp\.", norm=_LAYER + r"(\w*layernorm|ln_\w+)\.",
                         embed=r"(^|\.)word_embeddings\.", final_norm=r"(^|\.)ln_f\.", fused=r"\.self_attention\.query_key_value\.",
                         layout="falcon"),
    "mamba": BlockNames(qk=None, vo=None, mlp=None, norm=_LAYER + r"norm\.", embed=r"(^|\.)embeddings\.",
                        final_norm=r"(^|\.)norm_f\."),
}
#: An unknown ``model_type``: the Llama names (most decoders use them); a parameter they do not place is ``"other"``.
DEFAULT_BLOCK_NAMES = _LLAMA


def norm_style(module: torch.nn.Module) -> tuple[str, float] | None:
    """``(style, eps)`` of a normalization module in :data:`NORM_STYLES` (``torch.nn.LayerNorm`` itself over one
    dim, or a ``transformers`` RMSNorm class named there), else ``None``."""
    cls = type(module)
    entry = NORM_STYLES.get(cls.__name__)
    if entry is None:
        return None
    style, eps_name = entry
    if style == "layer_norm":
        if cls is not torch.nn.LayerNorm or len(module.normalized_shape) != 1:
            return None
    elif not cls.__module__.startswith("transformers.") or not hasattr(module, "weight"):
        return None
    eps = getattr(module, eps_name, None)
    return None if eps is None else (style, float(eps))


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_ffn_spec(
    model: torch.nn.Module, override: FfnSpec | None = None, *, route: str = "`ffn_spec=...` to RadiusProbe",
    drop: str = "'ffn' from radii",
) -> FfnSpec:
    """The FFN spec for ``model``: ``override`` if given, else the table entry of its ``model_type``.

    ``route`` and ``drop`` say, in the caller's words, how to pass a spec (``rho_ffn_spec=...`` to the trainer) and
    which radii to drop from which setting (``'ffn' from rho_watch_radii``), for the error.
    """
    if override is not None:
        return override
    model_type = _model_type(base_model_of(model))
    if model_type not in FFN_PREACTIVATIONS:
        raise ValueError(
            f"The FFN radius does not know model_type {model_type!r} (known: {', '.join(sorted(FFN_PREACTIVATIONS))}). "
            f"Pass {route.replace('...', 'FfnSpec(module_suffix=..., activation_attr=...)', 1)} naming the module "
            f"whose output feeds the activation, or drop {drop}."
        )
    return FFN_PREACTIVATIONS[model_type]


def resolve_ffn_activation(model: torch.nn.Module, spec: FfnSpec) -> str:
    """The activation's name, ``config.<spec.activation_attr>``; an error if it is not a string."""
    model = base_model_of(model)
    activation = getattr(model.config, spec.activation_attr, None)
    if not isinstance(activation, str):
        model_type = _model_type(model) or type(model).__name__
        raise ValueError(
            f"RadiusProbe: config.{spec.activation_attr} of {model_type!r} is {activation!r}, not an activation "
            "name; use ffn_mode='kink'"
        )
    return activation


def find_ffn_modules(
    model: torch.nn.Module, spec: FfnSpec, route: str = "`ffn_spec=...` to RadiusProbe"
) -> dict[str, torch.nn.Module]:
    """Modules whose qualified name ends with ``spec.module_suffix``; an error if there are none (``route``: how the
    caller passes a spec, as for :func:`resolve_ffn_spec`)."""
    found = {name: module for name, module in model.named_modules() if name.endswith(spec.module_suffix)}
    if not found:
        raise ValueError(
            f"No module of {type(model).__name__} ends with {spec.module_suffix!r}; pass "
            f"{route.replace('...', 'FfnSpec(module_suffix=..., activation_attr=...)', 1)} whose module_suffix "
            "matches the FFN input projection"
        )
    return found


def original_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile(model)`` wraps (``_orig_mod``), else ``model``: forward AD does not pass through
    inductor's ``out=`` kernels, and the probe's functional forwards need the eager module."""
    while (inner := compat.compiled_original(model)) is not None:
        model = inner
    return model


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel``: ``get_base_model()`` and ``peft_config``)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside the wrappers the probe may be handed: ``torch.compile`` and PEFT."""
    model = original_module(model)
    return original_module(model.get_base_model()) if is_peft_model(model) else model


def attention_blocker(model: torch.nn.Module) -> str | None:
    """Why the attention of ``model`` cannot be measured (not routed through ``AttentionInterface``); ``None`` if it can.

    Routed means: transformers says it can switch the implementation (``_can_set_attn_implementation``) and some
    module's source dispatches through ``ALL_ATTENTION_FUNCTIONS`` (transformers answers yes for a model without
    any attention, such as Mamba or RWKV; this second check answers no).
    """
    base = base_model_of(model)
    model_type = _model_type(base) or type(base).__name__
    if not compat.can_set_attention(base):
        return f"model_type {model_type!r} ({type(base).__name__}) does not route its attention through AttentionInterface"
    if not any(compat.module_routes_attention(type(m).__module__) for m in base.modules()):
        return f"model_type {model_type!r} ({type(base).__name__}) has no attention layer routed through AttentionInterface"
    return None


def _peft_head_blocker(model: torch.nn.Module) -> str | None:
    """What a PEFT wrapper changes about the head: prompt learning, or a trained head (LoRA, ``modules_to_save``)."""
    configs = getattr(model, "peft_config", {}) or {}
    config = configs.get(getattr(model, "active_adapter", None)) if isinstance(configs, dict) else None
    if config is not None and getattr(config, "is_prompt_learning", False):
        return f"its PEFT adapter ({type(config).__name__}) prepends virtual tokens, which the logits include"
    head = model.get_base_model().get_output_embeddings()
    if head is not None and type(head).__module__.startswith("peft."):
        return (
            f"its output head is trained through PEFT ({type(head).__name__}: LoRA on the head or modules_to_save), "
            "not a plain torch.nn.Linear whose weight the chunked head can read; the full head runs instead"
        )
    return None


def chunked_head_blocker(model: torch.nn.Module) -> str | None:
    """Why the logits of ``model`` are not provably ``lm_head(x)`` of a plain linear head; ``None`` if they are.

    They are for exactly the :data:`LINEAR_HEAD_MODELS` class of the ``model_type`` (not a subclass), with
    none of :data:`LOGIT_RESCALING_ATTRS` set, an ``nn.Linear`` head without hooks, not sharded. A PEFT wrapper
    (LoRA and other non-prompt adapters) passes its base model's logits through unchanged: the base model is
    checked, and the head must not be trained through PEFT.
    """
    model = original_module(model)
    if is_peft_model(model):
        blocker = _peft_head_blocker(model)
        if blocker is not None:
            return blocker
        model = base_model_of(model)
    config = getattr(model, "config", None)
    model_type = _model_type(model)
    expected = LINEAR_HEAD_MODELS.get(model_type)
    cls = type(model)
    where = f"transformers.models.{model_type}.modeling_{model_type}"
    if expected is None or (cls.__module__, cls.__name__) != (where, expected):
        return (
            f"{cls.__name__} (model_type {model_type!r}) is not one of the causal LMs whose logits are known to be "
            f"their linear head's output unchanged ({', '.join(sorted(LINEAR_HEAD_MODELS.values()))})"
        )
    for attr in LOGIT_RESCALING_ATTRS:
        if getattr(config, attr, None) is not None:
            return f"config.{attr}={getattr(config, attr)!r} may rescale or cap the logits after the head"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output embedding is a {type(head).__name__}, not a plain torch.nn.Linear"
    if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
        return "its output head has forward hooks or a replaced forward, which may change the logits"
    if DTensor is not None and any(isinstance(p, DTensor) for p in head.parameters()):
        return "its output head is sharded (DTensor); the chunked head needs the full weight matrix"
    return None


def fused_qkv_split(shape: tuple[int, ...], layout: str, config: object) -> tuple[int, torch.Tensor] | None:
    """``(dim, is_qk)``: which slices along ``dim`` of a fused q/k/v tensor of ``shape`` are query or key (the rest:
    value), or ``None`` where no dim has a q/k/v width (a LoRA ``A`` matrix: its input side).

    The width is ``(H + 2 KV) d`` (``H`` query heads of ``d = head_dim`` or ``hidden_size / H``, ``KV`` key/value
    heads, ``1 <= KV <= H``), laid out as ``layout`` says (transformers 5.25's attention forwards): ``"heads"``
    ``[H, (q, k, v), d]`` (GPT-NeoX; Falcon and GPT-BigCode without multi-query), ``"concat"`` ``[q (H d), k (KV d),
    v (KV d)]`` (GPT-2, whose Conv1D keeps it in dim 1; Phi-3; multi-query Falcon and GPT-BigCode), ``"groups"``
    ``[KV, (H / KV queries, k, v), d]`` (Falcon's new decoder architecture); ``"falcon"`` and ``"bigcode"`` pick one
    from the config.
    """
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if layout == "falcon":
        layout = "groups" if config.new_decoder_architecture else "concat" if config.multi_query else "heads"
    elif layout == "bigcode":
        layout = "concat" if config.multi_query else "heads"
    widths = {(heads + 2 * kv) * head_dim: kv for kv in range(1, heads + 1)}
    dims = [dim for dim, size in enumerate(shape) if size in widths]
    if len(dims) != 1:
        return None
    width = shape[dims[0]]
    kv, slot = widths[width], torch.arange(width) // head_dim  # the head slot of each row
    if layout == "heads":
        is_qk = slot % 3 < 2
    elif layout == "concat":
        is_qk = slot < heads + kv
    elif layout == "groups":
        per_group = heads // kv + 2
        is_qk = slot % per_group < per_group - 1
    else:
        raise ValueError(f"fused_qkv_split: layout {layout!r}; expected 'heads', 'concat', 'groups', 'falcon' or 'bigcode'")
    return dims[0], is_qk


def parameter_block(name: str, shape: tuple[int, ...], model: torch.nn.Module) -> str | tuple[int, torch.Tensor]:
    """The block kind (:data:`BLOCK_KINDS`) of parameter ``name`` of ``model``, by :data:`BLOCK_NAMES` of its
    ``model_type`` (PEFT and ``torch.compile`` wrappers seen through); for a fused q/k/v projection ``(dim, is_qk)``
    of :func:`fused_qkv_split` (a piece of it that cannot be split, such as LoRA's ``A``: ``"qk"``)."""
    base = base_model_of(model)
    names = BLOCK_NAMES.get(_model_type(base), DEFAULT_BLOCK_NAMES)
    kind = names.kind_of(name)
    if kind != "qkv":
        return kind
    return fused_qkv_split(shape, names.layout, base.config) or "qk"
