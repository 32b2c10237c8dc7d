"""Shared fixtures: tiny models built from configs (no hub, no network) and token batches."""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import math
import os
import struct
import sys
import types
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from transformers import (
    AttentionInterface,
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
from transformers.masking_utils import AttentionMaskInterface, eager_mask

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 256


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the ``gpu``-marked tests on a machine without CUDA: they cannot run there."""
    if torch.cuda.is_available():
        return
    kept = [item for item in items if item.get_closest_marker("gpu") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu") is not None])
        items[:] = kept


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


# ----------------------------------------------------------------------------- probe references
# Independent of hf_ghosts.probe: weights moved in place, central differences in float64, the
# pre-softmax scores recorded by an attention function of our own, masks rebuilt from the batch.

RECORDING_ATTENTION = "hf_ghosts_test_recording"


def unit_direction(direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``direction / |direction|`` in float64 (the norm over all tensors together)."""
    norm = torch.sqrt(sum(d.double().pow(2).sum() for d in direction.values()))
    return {name: d.double() / norm for name, d in direction.items()}


@contextlib.contextmanager
def moved(model: torch.nn.Module, direction: Mapping[str, torch.Tensor], step: float) -> Iterator[None]:
    """The model's weights at ``theta + step * v / |v|`` (in place); restored bit for bit on exit."""
    unit = unit_direction(direction)
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in unit}
    try:
        with torch.no_grad():
            for name, d in unit.items():
                params[name].add_((step * d).to(params[name].dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def central_difference(
    model: torch.nn.Module,
    direction: Mapping[str, torch.Tensor],
    measure: Callable[[], list[torch.Tensor]],
    step: float = 1e-4,
) -> list[torch.Tensor]:
    """``(m(theta + h v) - m(theta - h v)) / 2h`` for each tensor ``measure()`` returns."""
    with moved(model, direction, step):
        plus = measure()
    with moved(model, direction, -step):
        minus = measure()
    return [(p - m) / (2 * step) for p, m in zip(plus, minus, strict=True)]


def _rms_norm_float64(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


# ----------------------------------------------------------------------------- softmax sums in numpy
# Independent of hf_ghosts.radii: F(t) = sum_k softmax(z)_k e^{a_k t} and its zeros, for radius references.


def softmax_weights(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def exp_sum(logits: np.ndarray, slopes: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``F(t) = sum_k w_k e^{a_k t}``, ``F'(t)`` and ``sum_k |w_k e^{a_k t}|`` at complex points ``t`` (numpy)."""
    terms = softmax_weights(logits)[:, None] * np.exp(slopes[:, None] * np.asarray(t, dtype=complex).reshape(1, -1))
    return terms.sum(0), (slopes[:, None] * terms).sum(0), np.abs(terms).sum(0)


def turns(logits: np.ndarray, slopes: np.ndarray, radius: float, points: int) -> float:
    """Winding number of ``F`` around ``|t| = radius``: the number of zeros inside (argument principle)."""
    values, _, _ = exp_sum(logits, slopes, radius * np.exp(2j * np.pi * np.arange(points) / points))
    return float(np.angle(np.roll(values, -1) / values).sum() / (2 * np.pi))


def polynomial_radius(logits: np.ndarray, powers: np.ndarray) -> float:
    """Exact radius for integer slopes: with ``x = e^t``, ``F`` is a polynomial; its roots give every zero.

    A root ``x`` gives ``t = log|x| + i (arg x + 2 pi n)``; the nearest is ``n = 0`` (``arg`` in ``(-pi, pi]``).
    """
    degree = int(powers.max())
    coefficients = np.zeros(degree + 1)
    np.add.at(coefficients, degree - powers, softmax_weights(logits))
    return min(abs(complex(math.log(abs(x)), np.angle(x))) for x in np.roots(coefficients))


def randn64(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded float64 Gaussian samples times ``scale``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy in eval mode, for tight comparisons (probe and reference both run on it).

    Llama-style RMSNorm upcasts to float32 inside ``forward`` whatever the weights' dtype; here it
    computes in float64 so that central differences at a small step are not drowned in fp32 rounding.
    """
    model = copy.deepcopy(model).double().eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    return model


def forward_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` (labels dropped, no cache, no grad)."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        output = model(**kwargs, use_cache=False) if hasattr(model, "config") else model(**kwargs)
    return output if torch.is_tensor(output) else output.logits


def reference_logit_slopes(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], step: float = 1e-4
) -> torch.Tensor:
    """Directional derivatives of the logits along ``direction / |direction|`` by central differences."""
    (slopes,) = central_difference(model, direction, lambda: [forward_logits(model, batch).double()], step)
    return slopes


def reference_output_spreads(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], step: float = 1e-4
) -> torch.Tensor:
    """Per position (or sample), max - min over classes of the logit slopes (central differences, float64)."""
    slopes = reference_logit_slopes(model, batch, direction, step)
    return slopes.amax(-1) - slopes.amin(-1)


def causal_output_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, length]`` positions whose logits predict a label: position p predicts ``labels[p + 1]``."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    return valid


def hide_widest_label(spreads: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` with the label that the widest-spread counted position predicts set to -100, and the positions
    that still count; asserts that they are all narrower, so that a test can tell whether it was left out."""
    valid = causal_output_positions(labels)
    row, position = divmod(int(spreads.masked_fill(~valid, -1).argmax()), spreads.shape[1])
    hidden = labels.clone()
    hidden[row, position + 1] = -100
    others = causal_output_positions(hidden)
    assert spreads[others].max() < spreads[row, position]  # the test can tell the difference
    return hidden, others


def _recording_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Plain eager attention that appends ``(layer, pre-softmax scores)`` to ``_RECORDED``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scaling
    _RECORDED.append((int(module.layer_idx), scores.detach().clone()))
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


_RECORDED: list[tuple[int, torch.Tensor]] = []
AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
AttentionMaskInterface.register(RECORDING_ATTENTION, eager_mask)


def recorded_scores(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the ``[batch, heads, queries, keys]`` pre-softmax scores of one forward (no mask applied)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = RECORDING_ATTENTION
    _RECORDED.clear()
    try:
        forward_logits(model, batch)
    finally:
        model.config._attn_implementation = previous
    layers = dict(_RECORDED)
    _RECORDED.clear()
    return [layers[index] for index in sorted(layers)]


def allowed_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, queries, keys]``: key ``k <= q``, both real tokens (causal AND padding, built by hand)."""
    real = attention_mask.bool()
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal[None] & real[:, None, :] & real[:, :, None]


def reference_attention_spreads(
    model: PreTrainedModel, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], step: float = 1e-4
) -> torch.Tensor:
    """``[layers, heads]``: max over (batch, real query) of max - min over allowed keys of the score slopes."""
    slopes = central_difference(model, direction, lambda: recorded_scores(model, batch), step)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch["input_ids"].shape, dtype=torch.long)
    allowed = allowed_keys(mask)[:, None]  # [batch, 1, q, k]
    result = []
    for layer in slopes:
        high = layer.masked_fill(~allowed, -math.inf).amax(-1)
        low = layer.masked_fill(~allowed, math.inf).amin(-1)
        row_spread = torch.where(allowed.any(-1), high - low, torch.zeros_like(high))  # [batch, heads, q]
        result.append(row_spread.amax(dim=(0, 2)))
    return torch.stack(result)


def module_outputs(model: torch.nn.Module, suffix: str, run: Callable[[], object]) -> list[torch.Tensor]:
    """Outputs of every module whose name ends with ``suffix`` during ``run()``, in module order."""
    found = [(name, module) for name, module in model.named_modules() if name.endswith(suffix)]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out.detach().clone()))
        for name, module in found
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[name] for name, _ in found]


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread (restored afterwards).

    Tiny models gain nothing from a second thread, and on a busy 2-core machine a spinning second
    thread made these CPU training steps up to 10x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class AdamWReplay:
    """A plain ``torch.optim.AdamW`` on copies of ``model``'s parameters, with ``optimizer``'s groups and options.

    :meth:`propose`, called with the model at its old weights and gradients, copies them and the groups'
    current learning rates, steps, and returns ``u`` (name -> tensor): the update AdamW proposes. Called once
    per real step, its moments follow the real optimizer's (``optimizer`` may be Accelerate's wrapper).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.real = getattr(optimizer, "optimizer", optimizer)
        names = {p: name for name, p in model.named_parameters()}
        self.copies = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
        groups = [
            {**{key: value for key, value in group.items() if key != "params"}, "params": [self.copies[names[p]] for p in group["params"]]}
            for group in self.real.param_groups
        ]
        self.reference = torch.optim.AdamW(groups)

    def propose(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self.copies[name].copy_(p)
                self.copies[name].grad = None if p.grad is None else p.grad.clone()
            for mine, theirs in zip(self.reference.param_groups, self.real.param_groups, strict=True):
                mine["lr"] = theirs["lr"]
        old = {name: c.detach().clone() for name, c in self.copies.items()}
        self.reference.step()
        return {name: self.copies[name].detach() - old[name] for name in old}


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


def reference_rho(model: nn.Module, at: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """``pi / max_i (max_k a_ik - min_k a_ik)`` with ``a = J v``, ``v = direction / |direction|`` (eq. 11, 14), float64."""
    model64 = copy.deepcopy(model).double()
    norm = flat_norm(direction)
    primal = {name: t.double() for name, t in at.items()}
    tangent = {name: t.double() / norm for name, t in direction.items()}
    _, slopes = jvp(lambda params: functional_call(model64, params, (x.double(),)), (primal,), (tangent,))
    return math.pi / float((slopes.amax(-1) - slopes.amin(-1)).amax())


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


@pytest.fixture
def linear_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Calls of ``nn.Linear.forward`` per module, counted by a class-level patch (no hook on any module)."""
    calls: collections.Counter = collections.Counter()
    forward = torch.nn.Linear.forward

    def counting(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
        calls[self] += 1
        return forward(self, input)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    return calls


# ----------------------------------------------------------------------------- benchmarks and W&B
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_module() -> Callable[[str], types.ModuleType]:
    """``benchmark_module("overhead")`` imports ``benchmarks/overhead.py`` as ``python benchmarks/overhead.py`` sees
    its siblings (``benchmarks/`` on ``sys.path``). Not ``benchmark``: pytest-benchmark owns that fixture name."""

    def load(name: str) -> types.ModuleType:
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        return importlib.import_module(name)

    return load


@pytest.fixture
def read_wandb_records() -> Callable[[Path], list]:
    """``read_wandb_records(path)``: every ``wandb_internal_pb2.Record`` of a ``.wandb`` transaction log, checksums
    verified. wandb 0.31 ships no Python reader for that file: a LevelDB-style log of 32 KiB blocks, each record
    behind a 7-byte header (crc32 uint32, length uint16, type uint8: full, first, middle, last). wandb is
    imported here, not when conftest is (``benchmarks/gpu_check.sh`` checks that nothing imports it)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32 * 1024, 7
    full, first, middle, last = 1, 2, 3, 4

    def read(path: Path) -> list:
        raw = path.read_bytes()
        ident, magic, version = struct.unpack("<4sHB", raw[:header])
        assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
        records, pending, position = [], b"", header
        while position + header <= len(raw):
            if block - position % block < header:  # block trailer: zero padding
                position += block - position % block
                continue
            checksum, length, kind = struct.unpack("<IHB", raw[position : position + header])
            data = raw[position + header : position + header + length]
            position += header + length
            if kind == 0 and length == 0:
                continue
            assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == checksum, "corrupt record"
            assert kind in (full, first, middle, last), kind
            pending = data if kind in (full, first) else pending + data
            if kind in (full, last):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
        return records

    return read


# ------------------------------------------------------------------------------------------ recipes
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small data for every run: 48 training blocks of 128 tokens, 8 evaluation blocks, a 512-token vocabulary.
SMALL_DATA = ["--max_train_blocks", "48", "--max_eval_blocks", "8", "--tokenizer_vocab_size", "512"]



def recipe(name: str) -> ModuleType:
    """Import ``recipes/<name>.py`` the way ``python recipes/<name>.py`` sees its siblings."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    return importlib.import_module(name)


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, (path, len(data))


# ------------------------------------------------------------------------------------------ attention JVP references
def reference_allowed(batch, heads, q_len, k_len, *, causal=True, window=None, key_padding=None, query_rows=None):
    """``[B, H, Tq, Tk]`` bool, from the definition: query i sits at i + Tk - Tq."""
    allowed = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        pos = i + k_len - q_len
        for j in range(k_len):
            if causal and (j > pos or (window is not None and j <= pos - window)):
                allowed[:, :, i, j] = False
    if key_padding is not None:
        allowed &= key_padding[:, None, None, :]
    return allowed


def attention_reference(q, k, v, tq, tk, tv, allowed, *, scaling, softcap=None, query_mask=None, bias=None):
    """float64 eager attention (repeat_interleave for GQA) and torch.func.jvp; spread [B, H, Tq] (-inf: empty).
    ``bias``: added to the scores after the cap (an additive mask's values, e.g. ALiBi), as sdpa adds it."""
    q, k, v, tq, tk, tv = (t.double() for t in (q, k, v, tq, tk, tv))
    groups = q.shape[1] // k.shape[1]

    def forward(q, k, v):
        kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = q @ kr.transpose(-1, -2) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        biased = scores if bias is None else scores + bias.double()
        weights = torch.softmax(biased.masked_fill(~allowed, -math.inf), dim=-1)
        weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros_like(weights))
        return (weights @ vr).transpose(1, 2), scores

    (out, _), (tangent, slopes) = torch.func.jvp(forward, (q, k, v), (tq, tk, tv))
    high = slopes.masked_fill(~allowed, -math.inf).amax(-1)
    low = slopes.masked_fill(~allowed, math.inf).amin(-1)
    rows = torch.where(allowed.any(-1), high - low, -math.inf)
    if query_mask is not None:
        rows = rows.masked_fill(~query_mask[:, None, :], -math.inf)
    return out, tangent, rows


def attention_inputs(batch=2, heads=4, kv_heads=4, q_len=9, k_len=None, dim=8, dtype=torch.float64, seed=0):
    """q, k, v and their tangents (GQA when ``kv_heads < heads``; v one wider than q and k), float64 draws in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    k_len = q_len if k_len is None else k_len
    shapes = [(batch, heads, q_len, dim), (batch, kv_heads, k_len, dim), (batch, kv_heads, k_len, dim + 2)]
    primals = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    tangents = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    # [B, H, T, D] as transformers hands it over: a transposed view of [B, T, H, D]
    primals[0] = primals[0].transpose(1, 2).contiguous().transpose(1, 2)
    return [t.to(dtype) for t in primals + tangents]
