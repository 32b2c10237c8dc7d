"""The probe's inputs and masks: what the model's forward is given, what it returns, which positions count.

:func:`model_inputs` / :func:`forward_kwargs` keep a batch's model inputs only (no labels, no trainer flags);
:func:`output_positions` marks the positions whose logits are softmax samples (:func:`shifts_labels`: whether
logits at ``t`` predict ``labels[t + 1]``); :func:`logits_of` reads the logits off a forward's output.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence

import torch

from hf_ghosts.architectures import base_model_of

__all__ = [
    "IGNORE_INDEX",
    "KWARGS_MODEL_INPUTS",
    "NOT_MODEL_INPUTS",
    "forward_kwargs",
    "logits_of",
    "model_inputs",
    "output_positions",
    "query_positions",
    "shifts_labels",
]

IGNORE_INDEX = -100


def query_positions(inputs: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor | None:
    """How many query positions the attention radii are taken over: the ones of ``attention_mask``, else every
    position of ``input_ids`` / ``inputs_embeds``; ``None`` when the batch has neither (nothing to count by).

    Example (all zeros: 0, not measured):

    >>> query_positions({"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})
    tensor(5)
    >>> query_positions({"attention_mask": torch.zeros(2, 3, dtype=torch.long)})
    tensor(0)
    """
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.to(device).sum()
    for name, dims in (("input_ids", 2), ("inputs_embeds", 3)):
        if inputs.get(name) is not None and inputs[name].dim() == dims:
            return torch.tensor(inputs[name].shape[0] * inputs[name].shape[1], device=device)
    return None


def output_positions(
    inputs: Mapping[str, torch.Tensor],
    shape: Sequence[int],
    *,
    shift_labels: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask over ``shape`` (the logits' shape without the class dim) of the positions that are softmax samples.

    With ``labels`` of that shape and ``shift_labels=False``: ``labels != -100``. Causal
    (``shift_labels=True``), logits at ``t`` predict ``labels[t + 1]``: ``valid[:, t] = labels[:, t + 1] != -100``
    and the last position never counts; a ``shift_labels`` entry in ``inputs`` (already shifted) is
    used as it is. Without labels, ``t`` counts where the ``attention_mask`` is 1 at ``t`` and ``t + 1``.
    A 1-d ``shape`` (one output per sample) takes 1-d labels, else every sample.

    Example:

    >>> output_positions({"labels": torch.tensor([[5, -100, 7, 8]])}, (1, 4), shift_labels=True)
    tensor([[False,  True,  True, False]])
    """
    shape = torch.Size(shape)
    labels = inputs.get("labels")
    if labels is not None and labels.shape[: len(shape)] == shape and not shift_labels:
        return labels != IGNORE_INDEX
    if len(shape) == 1:
        if labels is not None and labels.dim() == 1:
            return labels != IGNORE_INDEX
        return torch.ones(shape, dtype=torch.bool, device=device)
    batch, length = shape[:2]
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"] != IGNORE_INDEX
    valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if labels is not None:
        valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    else:
        mask = inputs.get("attention_mask")
        real = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.bool()
        valid[:, :-1] = real[:, :-1] & real[:, 1:]
    return valid


def shifts_labels(model: torch.nn.Module, shift_labels: bool | None) -> bool:
    """``shift_labels``; ``None``: whether the model generates (causal: logits at ``t`` predict ``labels[t + 1]``)."""
    return _asks(base_model_of(model), "can_generate") if shift_labels is None else shift_labels


def _asks(model: torch.nn.Module, method: str) -> bool:
    """``model.<method>()`` as a bool (``can_generate``, ``_can_set_attn_implementation``); False without it."""
    answer = getattr(model, method, None)
    return bool(answer()) if callable(answer) else False


# Never passed to the probe's forward: loss targets, caches, output switches, a trainer's private flags.
NOT_MODEL_INPUTS = frozenset({
    "labels", "shift_labels", "num_items_in_batch", "use_cache", "past_key_values", "cache_position", "return_dict",
    "output_attentions", "output_hidden_states", "output_router_logits", "logits_to_keep", "return_loss",
})


# Model inputs that travel in ``**kwargs`` (TransformersKwargs): the packed sequences of padding-free batches.
KWARGS_MODEL_INPUTS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


@functools.cache
def _forward_inputs(forward: Callable) -> frozenset[str] | None:
    """The named inputs of a ``forward`` (``None``: it takes only ``**kwargs``, or has no readable signature)."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = frozenset(name for name, p in parameters.items() if p.kind in kinds and name != "self")
    return names or None


def model_inputs(model: torch.nn.Module, inputs: Mapping[str, object]) -> dict[str, object]:
    """The entries of ``inputs`` that are inputs of the model's forward (``input_ids``, ``attention_mask``,
    ``position_ids``, ``pixel_values``, ...), read from the signature of the base model's class ``forward``
    (inside ``torch.compile`` and PEFT wrappers; TRL's patched forward keeps that signature too), without
    :data:`NOT_MODEL_INPUTS`. A trainer's private flags (TRL's ``fused_lm_head``, ``return_token_accuracy``) go.
    """
    named = _forward_inputs(type(base_model_of(model)).forward)
    keep = None if named is None else named | KWARGS_MODEL_INPUTS
    return {key: value for key, value in inputs.items() if key not in NOT_MODEL_INPUTS and (keep is None or key in keep)}


def forward_kwargs(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The batch's model inputs (:func:`model_inputs`: no labels, no trainer flags), with ``use_cache=False``."""
    kwargs = model_inputs(model, inputs)
    config = getattr(base_model_of(model), "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def logits_of(output: object, model: torch.nn.Module) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} returned {type(output).__name__} without `logits`; the output radius needs a model "
            "with a head that produces logits (for example AutoModelForCausalLM, not AutoModel)"
        )
    return logits
