"""A tiny causal LM whose attention is its own code, never routed through transformers' ``AttentionInterface``.

What the probe must refuse for the attention radius whatever the transformers release: real families move from
their own attention to the interface from one minor release to the next (Falcon in 5.25), this one never does.
Its module source has an ``*Attention(nn.Module)`` class and no interface dispatch, which is what transformers'
``_can_set_attn_implementation`` reads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class OwnAttentionConfig(PretrainedConfig):
    model_type = "own_attention"

    def __init__(self, vocab_size: int = 256, hidden_size: int = 32, num_attention_heads: int = 4, **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.num_attention_heads = vocab_size, hidden_size, num_attention_heads
        super().__init__(**kwargs)


class OwnAttention(nn.Module):
    """Causal multi-head attention written out: ``softmax(q k^T / sqrt(d) + causal) v``."""

    def __init__(self, config: OwnAttentionConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).flatten(-2))


class OwnAttentionForCausalLM(PreTrainedModel):
    config_class = OwnAttentionConfig

    def __init__(self, config: OwnAttentionConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attention = OwnAttention(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        hidden = self.embed(input_ids)
        logits = self.lm_head(hidden + self.attention(hidden))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def own_attention_lm(seed: int = 0) -> OwnAttentionForCausalLM:
    torch.manual_seed(seed)
    return OwnAttentionForCausalLM(OwnAttentionConfig())
