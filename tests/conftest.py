"""Shared fixtures: tiny models built from configs (no hub, no network) and token batches."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 256


def tiny_config(family: str, **overrides: object):
    """A 2-layer, 4-head, hidden-32 config of ``family`` ("gpt_neox", "llama", "qwen2", "gpt2")."""
    if family == "gpt_neox":
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64)
        return GPTNeoXConfig(**{**base, **overrides})
    if family == "llama":
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        return LlamaConfig(**{**base, **overrides})
    if family == "qwen2":
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        return Qwen2Config(**{**base, **overrides})
    if family == "gpt2":
        base = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        return GPT2Config(**{**base, **overrides})
    raise ValueError(f"tiny_config: unknown family {family!r}")


MODEL_CLASSES = {
    "gpt_neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
}
FAMILIES = tuple(MODEL_CLASSES)


def tiny_causal_lm(family: str = "gpt_neox", seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A tiny causal LM of ``family`` with deterministic weights."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[family](tiny_config(family, **overrides))


def token_batch(batch: int = 2, length: int = 12, seed: int = 1, pad_left: int = 0, pad_right: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens with labels = input_ids; the last row padded ``pad_left``/``pad_right`` positions (label -100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_left:
        attention_mask[-1, :pad_left] = 0
    if pad_right:
        attention_mask[-1, length - pad_right :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def random_direction(model: torch.nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    """A Gaussian direction over the model's trainable parameters."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param
