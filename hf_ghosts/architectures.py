"""Architecture knowledge as data: one table, :data:`ARCHITECTURES`, per ``model_type``.

Each entry says where the family keeps its FFN pre-activations (the module whose output feeds the
nonlinearity, the gate projection of gated MLPs, matched as a suffix of the module's qualified
name, and the config attribute naming the activation) and which causal-LM class returns its
linear head's output unchanged as the logits (what the probe's chunked head relies on).
:data:`FFN_PREACTIVATIONS` and :data:`LINEAR_HEAD_MODELS` are views of the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_ghosts import compat

try:  # torch >= 2.6
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "ARCHITECTURES",
    "FFN_PREACTIVATIONS",
    "LINEAR_HEAD_MODELS",
    "LOGIT_RESCALING_ATTRS",
    "NORM_STYLES",
    "Architecture",
    "FfnSpec",
    "attention_blocker",
    "base_model_of",
    "chunked_head_blocker",
    "find_ffn_modules",
    "norm_style",
    "original_module",
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
