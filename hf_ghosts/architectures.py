"""Architecture knowledge as data: where each model family keeps its FFN pre-activations.

``FFN_PREACTIVATIONS[model_type]`` names the module whose output feeds the nonlinearity (the
gate projection of gated MLPs), matched as a suffix of the module's qualified name, and the
config attribute holding the activation's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FFN_PREACTIVATIONS", "FfnSpec", "find_ffn_modules", "resolve_ffn_spec"]


@dataclass(frozen=True)
class FfnSpec:
    """Suffix of the FFN input projection's module name and the config field of its activation."""

    module_suffix: str
    activation_attr: str


FFN_PREACTIVATIONS: dict[str, FfnSpec] = {
    "gpt_neox": FfnSpec("mlp.dense_h_to_4h", "hidden_act"),
    "llama": FfnSpec("mlp.gate_proj", "hidden_act"),
    "mistral": FfnSpec("mlp.gate_proj", "hidden_act"),
    "qwen2": FfnSpec("mlp.gate_proj", "hidden_act"),
    "qwen3": FfnSpec("mlp.gate_proj", "hidden_act"),
    "gemma": FfnSpec("mlp.gate_proj", "hidden_activation"),
    "olmo": FfnSpec("mlp.gate_proj", "hidden_act"),
    "olmo2": FfnSpec("mlp.gate_proj", "hidden_act"),
    "gpt2": FfnSpec("mlp.c_fc", "activation_function"),
    "gptj": FfnSpec("mlp.fc_in", "activation_function"),
    "opt": FfnSpec("fc1", "activation_function"),
    "phi": FfnSpec("mlp.fc1", "hidden_act"),
}


def resolve_ffn_spec(model: torch.nn.Module, override: FfnSpec | None = None) -> FfnSpec:
    """The FFN spec for ``model``: ``override`` if given, else the table entry of its ``model_type``."""
    if override is not None:
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FFN_PREACTIVATIONS:
        raise ValueError(
            f"The FFN radius does not know model_type {model_type!r} (known: {', '.join(sorted(FFN_PREACTIVATIONS))}). "
            "Pass `ffn_spec=FfnSpec(module_suffix=..., activation_attr=...)` to RadiusProbe naming the module whose "
            "output feeds the activation, or drop 'ffn' from the radii."
        )
    return FFN_PREACTIVATIONS[model_type]


def find_ffn_modules(model: torch.nn.Module, spec: FfnSpec) -> dict[str, torch.nn.Module]:
    """Modules whose qualified name ends with ``spec.module_suffix``; an error if there are none."""
    found = {name: module for name, module in model.named_modules() if name.endswith(spec.module_suffix)}
    if not found:
        raise ValueError(
            f"No module of {type(model).__name__} ends with {spec.module_suffix!r}; "
            "pass an `ffn_spec` whose module_suffix matches the FFN input projection"
        )
    return found
