"""Test inputs built in-process, no hub and no network: tiny causal LMs from configs, token batches and datasets,
``RhoTrainingArguments`` for a fast CPU run, a plain-loop classifier, a word-level tokenizer, and the recipes'
small-data options.

Imported as ``from tests.helpers import ...``: the repository root is on ``sys.path`` through pytest's
``pythonpath`` setting (pyproject.toml), and through ``PYTHONPATH`` in the tests' subprocesses.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
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
    TrainerCallback,
)

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


def randn64(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded float64 Gaussian samples times ``scale``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- Trainer helpers
# Shared by the RhoTrainer / RhoCallback / W&B tests.


def token_dataset(rows: int = 16, length: int = 12, seed: int = 3, **batch_kwargs: int):
    """``token_batch`` rows as a ``datasets.Dataset`` (input_ids, attention_mask, labels) for a Trainer."""
    from datasets import Dataset

    batch = token_batch(batch=rows, length=length, seed=seed, **batch_kwargs)
    return Dataset.from_dict({key: value.tolist() for key, value in batch.items()})


def rho_args(tmp_path, **overrides: object):
    """``RhoTrainingArguments`` for a fast CPU run: no reporting, saving or progress bar; batch 4, fixed seed; clip at
    ``r* = 1`` (the paper's target, which these tiny runs exceed: the library's default is ``DEFAULT_TARGETS``)."""
    from hf_ghosts import RhoTrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, rho_target=1.0)
    return RhoTrainingArguments(**{**base, **overrides})


class StepRecorder(TrainerCallback):
    """Copies a controller's per-step record (``controller.last``) after every optimizer step.

    ``controller_of`` is called at each step (a ``RhoCallback`` creates its controller only at train begin).
    """

    def __init__(self, controller_of) -> None:
        self.controller_of = controller_of
        self.records: list[dict] = []

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.records.append(self.controller_of().last)


# ----------------------------------------------------------------------------- a plain-loop classifier
# (test_controller, test_controller_watch: RhoController on a non-transformers nn.Module)
FEATURES, CLASSES = 8, 5


class Classifier(nn.Module):
    """Two-layer tanh MLP returning logits ``[batch, classes]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier()


def batch_of(step: int, rows: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(rows, FEATURES, generator=generator)
    return {"x": x, "labels": torch.randint(0, CLASSES, (rows,), generator=generator)}


def backward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x=batch["x"]), batch["labels"]).backward()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def flat_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


# ----------------------------------------------------------------------------- TRL helpers
def tiny_tokenizer():
    """A word-level tokenizer over ``w0 .. w253`` plus ``<pad>`` and ``<eos>`` (``VOCAB`` ids; no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def text_dataset(rows: int = 8, words: int = 10, seed: int = 5):
    """``{"text": "w17 w3 ..."}`` rows for ``tiny_tokenizer`` (a ``datasets.Dataset``)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (rows, words), generator=generator)
    return Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row.tolist()) for row in ids]})


# ------------------------------------------------------------------------------------------ recipes
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small data for every run: 48 training blocks of 128 tokens, 8 evaluation blocks, a 512-token vocabulary.
SMALL_DATA = ["--max_train_blocks", "48", "--max_eval_blocks", "8", "--tokenizer_vocab_size", "512"]


def recipe(name: str) -> ModuleType:
    """Import ``recipes/<name>.py`` the way ``python recipes/<name>.py`` sees its siblings: ``recipes/`` is on
    ``sys.path`` through pytest's ``pythonpath`` setting. Imported when a test runs, not when it is collected."""
    return importlib.import_module(name)


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, (path, len(data))

