"""Offline building blocks of the recipes and benchmarks: Pythia-shaped models, a local BPE tokenizer, the LR spike.

Recipe code, not the library's (the package ships none of it): ``python recipes/<name>.py`` imports it as
``presets``, the benchmarks put ``recipes/`` on ``sys.path`` for it. Nothing here touches the network.
``MODEL_PRESETS`` holds GPT-NeoX configs with the shapes of EleutherAI's Pythia suite (hidden size, layers, heads,
FFN width, rotary fraction, parallel residual), plus tiny CPU presets and a tiny Llama for a second architecture
family. The vocabulary is left to the tokenizer: :func:`build_model` sizes the embeddings to it.
:func:`train_bpe_tokenizer` trains a byte-level BPE tokenizer (``tokenizers``, the ``recipes`` extra) in well under
a second on the pydoc corpus, the English prose and code that ships with Python (``pydoc_data.topics``; the corpus
and the cutting of text into causal-LM blocks, :func:`~hf_ghosts.cli.data.pydoc_splits` and
:func:`~hf_ghosts.cli.data.lm_blocks`, live in the package: ``hf-ghosts diagnose`` measures on them).
:func:`spike_multiplier`, :func:`spike_schedule`, :func:`spiked` (a Trainer class whose schedule is spiked, replaced
or multiplied) and :func:`spike_loop` are the learning-rate spike of the paper's Table 1, shared by
``recipes/spike_test.py``, ``recipes/lr_free.py``, ``benchmarks/accuracy.py`` and the tests.

Example::

    from presets import build_model, train_bpe_tokenizer
    from hf_ghosts.cli.data import lm_blocks, pydoc_splits

    splits = pydoc_splits()                       # DatasetDict(train=..., validation=...)
    tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=2048)
    model = build_model("pythia-14m", vocab_size=len(tokenizer))
    train = lm_blocks(splits["train"], tokenizer, block_size=128)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import cache, partial
from typing import Any

import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_ghosts._optional import require
from hf_ghosts.cli.data import pydoc_corpus

__all__ = [
    "EOS_TOKEN",
    "MODEL_PRESETS",
    "SPIKE_HOW",
    "SpikedSchedule",
    "build_model",
    "count_parameters",
    "preset_config",
    "pydoc_text",
    "spike_loop",
    "spike_multiplier",
    "spike_schedule",
    "spiked",
    "train_bpe_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"  # Pythia's (GPT-NeoX-20B tokenizer's) BOS = EOS token

# Shared by every Pythia model (EleutherAI/pythia-* config.json): partial rotary embeddings on
# 25% of each head, parallel attention + MLP residual, exact GELU, untied input/output embeddings,
# <|endoftext|> (id 0) as BOS and EOS.
_PYTHIA = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    use_parallel_residual=True,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    vocab_size=50304,
    bos_token_id=0,
    eos_token_id=0,
)


def _pythia(hidden: int, layers: int, heads: int) -> tuple[str, dict[str, Any]]:
    return "gpt_neox", {
        **_PYTHIA,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
    }


def _llama(hidden: int, layers: int, heads: int, positions: int) -> tuple[str, dict[str, Any]]:
    """A Llama (RMSNorm, SwiGLU of width ~8/3 hidden rounded up to a multiple of 4, two key-value heads, untied)."""
    return "llama", {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2,
        "intermediate_size": -(-8 * hidden // 12) * 4, "max_position_embeddings": positions, "hidden_act": "silu",
        "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 0, "eos_token_id": 0,
    }


#: ``name -> (model_type, config kwargs)``. The ``pythia-*`` entries have the real Pythia shapes
#: (the vocabulary is replaced by the tokenizer's in :func:`build_model`); ``pythia-tiny`` is the
#: same architecture small enough to train for hundreds of steps on two CPU cores in a minute;
#: ``llama-tiny`` is a Llama (RMSNorm, SwiGLU, grouped-query attention) of the same size, ``llama-14m`` one with
#: ``pythia-14m``'s hidden size, layers and heads (the second family at the larger size of ``recipes/lr_free.py``);
#: ``qwen3-tiny`` a third family (the qk-norm Llama) at ``llama-tiny``'s shape.
MODEL_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-31m": _pythia(256, 6, 8),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32),
    "pythia-12b": _pythia(5120, 36, 40),
    "pythia-tiny": ("gpt_neox", {**_PYTHIA, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 256, "max_position_embeddings": 512}),
    "llama-tiny": _llama(64, 2, 4, 512),
    "llama-14m": _llama(128, 6, 4, 2048),
    # a third family: Qwen3 (Llama plus per-head RMSNorm on q and k) at llama-tiny's shape
    "qwen3-tiny": ("qwen3", {**_llama(64, 2, 4, 512)[1], "head_dim": 16}),
}

_CONFIGS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def preset_config(name: str, vocab_size: int | None = None, **overrides: Any) -> PretrainedConfig:
    """The config of preset ``name`` with ``vocab_size`` (if given) and any other field overridden."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"preset_config: unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    model_type, kwargs = MODEL_PRESETS[name]
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return _CONFIGS[model_type][0](**{**kwargs, **overrides})


def build_model(name: str, vocab_size: int | None = None, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A freshly initialized causal LM of preset ``name`` (weights drawn from ``torch.manual_seed(seed)``)."""
    config = preset_config(name, vocab_size, **overrides)
    torch.manual_seed(seed)
    return _CONFIGS[config.model_type][1](config)


def pydoc_text(separator: str = "\n\n") -> str:
    """The pydoc corpus (:func:`~hf_ghosts.cli.data.pydoc_corpus`) as one string, documents joined by ``separator``
    (byte-level data for tests and benchmarks)."""
    return separator.join(pydoc_corpus())


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Pythia style) trained on ``texts``, wrapped for ``transformers``.

    ``<|endoftext|>`` is the BOS, EOS and padding token (id 0), as in Pythia. Training is
    deterministic for the same texts; on the pydoc corpus it takes ~0.2 s.
    """
    bpe_class = require("tokenizers", extra="recipes").ByteLevelBPETokenizer
    if vocab_size < 257:
        raise ValueError(f"train_bpe_tokenizer: vocab_size must exceed the 256 byte symbols; got {vocab_size}")
    bpe = bpe_class()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, unk_token=None)


def count_parameters(model: torch.nn.Module) -> str:
    """``"1.73M"``: the number of parameters, for logs."""
    total = sum(p.numel() for p in model.parameters())
    exponent = min(3, int(math.log10(max(total, 1)) // 3))
    return f"{total / 10 ** (3 * exponent):.2f}{['', 'k', 'M', 'B'][exponent]}"


# --------------------------------------------------------------------------------------------- learning-rate spike
SPIKE_HOW = ("replace", "multiply")  # what a spike does to a schedule: see :func:`spike_schedule`


def spike_multiplier(step: int, start: int, factor: float, stop: int | None = None) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): ``factor`` on ``[start, stop)``, else 1.

    ``stop=None`` holds the spike to the end. Example: ``spike_multiplier(5, start=4, factor=1000.0)`` is ``1000.0``.
    """
    return factor if _in_spike(step, start, stop) else 1.0


def _in_spike(step: int, start: int, stop: int | None) -> bool:
    return start <= step and (stop is None or step < stop)


def _spiked_lambda(base: Callable[[int], float], start: int, factor: float, stop: int | None) -> Callable[[int], float]:
    return lambda k: base(k) * spike_multiplier(k, start, factor, stop)


def spike_schedule(
    optimizer: torch.optim.Optimizer,
    start: int,
    factor: float,
    stop: int | None = None,
    *,
    onto: torch.optim.lr_scheduler.LambdaLR | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A learning-rate spike: optimizer step ``k`` (0-based) runs at ``lr * base(k) * spike_multiplier(k)``.

    ``onto=None`` ("replace"): a new ``LambdaLR`` with ``base = 1``, a constant rate spiked. ``onto`` a ``LambdaLR``
    ("multiply"; all of Trainer's schedules are): its own ``lr_lambdas`` become ``base``, in place, and it is
    returned; the rate of step 0 is already set, so the spike should start at ``start >= 1``.
    For a ``Trainer``: ``optimizers=(optimizer, spike_schedule(optimizer, start, factor))``, or :func:`spiked`.
    """
    if onto is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(spike_multiplier, start=start, factor=factor, stop=stop))
    if not isinstance(onto, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"spike_schedule: onto must be a LambdaLR (its lambdas are multiplied); got {type(onto).__name__}")
    onto.lr_lambdas = [_spiked_lambda(base, start, factor, stop) for base in onto.lr_lambdas]
    return onto


class SpikedSchedule:
    """Trainer mixin: a learning-rate spike of ``spike_factor`` on optimizer steps ``[spike_start, spike_stop)``.

    ``spike_how="replace"``: the rate is ``learning_rate * spike_multiplier(k)`` (the arguments' schedule is not used);
    ``"multiply"``: the arguments' own schedule (warm-up, cosine, ...) times ``spike_multiplier(k)``. A scheduler
    passed in ``optimizers=`` is kept as it is. Build the class with :func:`spiked`.
    """

    def __init__(self, *args: Any, spike_start: int, spike_factor: float, spike_how: str, spike_stop: int | None = None,
                 **kwargs: Any) -> None:
        if spike_how not in SPIKE_HOW:
            raise ValueError(f"{type(self).__name__}: spike_how must be one of {SPIKE_HOW}; got {spike_how!r}")
        self.spike_start, self.spike_factor, self.spike_how, self.spike_stop = spike_start, spike_factor, spike_how, spike_stop
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is not None:  # given, or built already
            return self.lr_scheduler
        spike = dict(start=self.spike_start, factor=self.spike_factor, stop=self.spike_stop)
        if self.spike_how == "replace":
            self.lr_scheduler = spike_schedule(optimizer or self.optimizer, **spike)
        else:
            self.lr_scheduler = spike_schedule(optimizer or self.optimizer, **spike,
                                               onto=super().create_scheduler(num_training_steps, optimizer))
        return self.lr_scheduler


@cache
def spiked(trainer_cls: type) -> type:
    """``trainer_cls`` (``Trainer``, ``RhoTrainer``, ...) with :class:`SpikedSchedule`: ``Spiked<Name>``, whose
    constructor also takes ``spike_start``, ``spike_factor``, ``spike_how`` and ``spike_stop``.

    Example: ``spiked(Trainer)(model=model, args=args, spike_start=30, spike_factor=1000.0, spike_how="replace")``.
    """
    return type(f"Spiked{trainer_cls.__name__}", (SpikedSchedule, trainer_cls), {"__module__": __name__})


def spike_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    start: int,
    factor: float,
    stop: int | None = None,
    step: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    max_grad_norm: float | None = None,
) -> list[dict[str, Any]]:
    """A plain PyTorch training loop with a learning-rate spike, one optimizer step per batch.

    Step ``k`` runs at the optimizer's initial rates times :func:`spike_multiplier` ``(k, start, factor, stop)``
    (:func:`spike_schedule`, stepped after each batch): ``model.train()``, forward, backward, gradient-norm clipping
    to ``max_grad_norm`` (if given), then ``step(batch)`` (e.g. ``RhoController.step``, which calls
    ``optimizer.step()`` itself) or plain ``optimizer.step()``, and ``optimizer.zero_grad(set_to_none=True)``.

    Returns:
        Per step ``{"step": k, "loss": loss before the step, "spike": bool, "record": step(batch)'s return value}``.
    """
    schedule = spike_schedule(optimizer, start, factor, stop)
    rows = []
    for index, batch in enumerate(batches):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        row: dict[str, Any] = {"step": index, "loss": loss.item(), "spike": _in_spike(index, start, stop)}
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if step is None:
            optimizer.step()
            row["record"] = None
        else:
            row["record"] = step(batch)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        rows.append(row)
    return rows
