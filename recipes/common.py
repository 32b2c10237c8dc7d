"""Code the recipes share: command-line options for model and data, loading, metrics, W&B, plots, tables.

The reusable, tested building blocks live in ``presets`` (model presets, the tokenizer, the LR spike) and, for
the corpus and the LM blocks that ``hf-ghosts diagnose`` measures on too, :mod:`hf_ghosts.cli.data`; this module is
the recipe glue around them. The recipes import it as ``common`` (``python recipes/<name>.py`` puts ``recipes/`` on
``sys.path``). The recipes need the ``recipes`` extra (``pip install -e ".[recipes]"``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from datasets import DatasetDict, load_dataset
from presets import MODEL_PRESETS, build_model, train_bpe_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging as hf_logging

from hf_ghosts.cli.data import lm_blocks, pydoc_splits
from hf_ghosts.plots import save_figure
from hf_ghosts.probe import output_positions
from hf_ghosts.radii import update_norm
from hf_ghosts.settings import RADII, RADIUS_FIELDS

RADIUS_NAMES = RADII  # one source of truth: hf_ghosts.settings
COLORS = {"output": "tab:blue", "attention": "tab:orange", "ffn": "tab:green", "ffn_activation": "tab:olive", "r": "black",
          "r_applied": "tab:red"}


# --------------------------------------------------------------------------------------------- options
@dataclass
class ModelArguments:
    """Which model to train: a preset built from its config (default, offline) or a checkpoint."""

    preset: str = field(
        default="pythia-tiny",
        metadata={"help": "Model built from a config when no --model_name_or_path is given.", "choices": list(MODEL_PRESETS)},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local directory (save_pretrained) or hub id of a causal LM to fine-tune; overrides --preset."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory or hub id. Default: the checkpoint's; with a preset, one trained locally."},
    )


@dataclass
class DataArguments:
    """Which text to train on: the pydoc corpus shipped with Python (default), a dataset or local files."""

    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name (hub or local script), e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. wikitext-2-raw-v1."})
    train_file: str | None = field(default=None, metadata={"help": "A local .txt, .json/.jsonl or .csv file of training text."})
    validation_file: str | None = field(default=None, metadata={"help": "A local file of evaluation text (same format)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training split held out when the data has no validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence (documents are joined, then cut)."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_blocks: int | None = field(default=64, metadata={"help": "Keep only this many evaluation blocks."})
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the locally trained BPE tokenizer."})


# --------------------------------------------------------------------------------------------- loading
def load_text_splits(data: DataArguments) -> DatasetDict:
    """``DatasetDict(train, validation)`` with ``data.text_column``: pydoc by default, else the named data."""
    if data.dataset_name is None and data.train_file is None:
        if data.text_column != "text":
            raise ValueError(f"--text_column {data.text_column!r}: the embedded pydoc corpus has only 'text'")
        return pydoc_splits()
    if data.dataset_name is not None:
        raw = load_dataset(data.dataset_name, data.dataset_config_name)
    else:
        files = {"train": data.train_file, **({"validation": data.validation_file} if data.validation_file else {})}
        extension = data.train_file.rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        if builder not in ("text", "json", "csv"):
            raise ValueError(f"--train_file {data.train_file!r}: expected a .txt, .json, .jsonl or .csv file")
        raw = load_dataset(builder, data_files=files)
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, seed=0, shuffle=True)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def load_tokenizer(model: ModelArguments | None, data: DataArguments, texts: Iterable[str]):
    """The checkpoint's tokenizer (``--tokenizer_name`` or the model's), else a BPE trained on ``texts``.

    Training is deterministic, so every process of a multi-process run trains the same one.
    """
    name = None if model is None else (model.tokenizer_name or model.model_name_or_path)
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return train_bpe_tokenizer(texts, vocab_size=data.tokenizer_vocab_size)


def load_blocks(data: DataArguments, tokenizer, splits: DatasetDict):
    """Train and evaluation sets of ``data.block_size``-token blocks (``labels = input_ids``)."""
    train = lm_blocks(splits["train"], tokenizer, data.block_size, data.text_column, data.max_train_blocks)
    evaluation = lm_blocks(splits["validation"], tokenizer, data.block_size, data.text_column, data.max_eval_blocks)
    return train, evaluation


def load_data(data: DataArguments, model: ModelArguments | None = None) -> tuple[Any, Any, Any]:
    """``(tokenizer, train, evaluation)``: the text (:func:`load_text_splits`), its tokenizer (:func:`load_tokenizer`) and
    the blocks (:func:`load_blocks`), with transformers' logging quieted."""
    hf_logging.set_verbosity_error()
    splits = load_text_splits(data)
    tokenizer = load_tokenizer(model, data, splits["train"][data.text_column])
    train, evaluation = load_blocks(data, tokenizer, splits)
    return tokenizer, train, evaluation


def load_model(model: ModelArguments, vocab_size: int, seed: int) -> PreTrainedModel:
    """``from_pretrained(--model_name_or_path)``, or the preset initialized from ``seed`` sized to the vocabulary."""
    if model.model_name_or_path is not None:
        loaded = AutoModelForCausalLM.from_pretrained(model.model_name_or_path)
        if loaded.get_input_embeddings().num_embeddings < vocab_size:
            loaded.resize_token_embeddings(vocab_size)
        return loaded
    return build_model(model.preset, vocab_size=vocab_size, seed=seed)


def parse_and_load(spec_class: type, argv: list[str] | None) -> tuple[Any, ModelArguments, Any, Any, Any]:
    """A recipe's start: parse ``(spec_class, ModelArguments, DataArguments)`` from ``argv``, make ``spec.output_dir``,
    quiet transformers, ``set_seed(spec.seed)``, then load the text, the tokenizer and the blocks.

    Returns ``(spec, model_args, tokenizer, train, evaluation)``.
    """
    parser = HfArgumentParser((spec_class, ModelArguments, DataArguments))
    spec, model_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    os.makedirs(spec.output_dir, exist_ok=True)
    set_seed(spec.seed)
    tokenizer, train, evaluation = load_data(data_args, model_args)
    return spec, model_args, tokenizer, train, evaluation


def probe_batch(evaluation: Any, blocks: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The first ``blocks`` evaluation blocks as one batch, and the mask of logits that predict a label
    (causal: position ``t`` predicts label ``t + 1``)."""
    batch = default_data_collator([evaluation[i] for i in range(min(blocks, len(evaluation)))])
    return batch, output_positions(batch, batch["labels"].shape, shift_labels=True)


def unit_directions(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], count: int, seed: int, *, descent: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """The batch loss's gradient ``g`` and ``count`` Gaussian directions (from ``seed`` only), each scaled to unit length
    ``|d| = sqrt(sum_i |d_i|^2)`` (:func:`~hf_ghosts.radii.update_norm`): ``{"grad": g / |g|, "random i": ...}``, or with ``descent``
    ``{"-grad": -g / |g|, ...}``. The gradient is taken under whatever hooks the caller has on (a temperature)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    if descent:
        found = {"-grad": {name: -p.grad.detach().clone() for name, p in trainable.items()}}
    else:
        found = {"grad": {name: p.grad.detach().clone() for name, p in trainable.items()}}
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        found[f"random {index}"] = {name: torch.randn(p.shape, generator=generator) for name, p in trainable.items()}
    for direction in found.values():
        norm = update_norm(list(direction.values())).float()
        for name in direction:
            direction[name] /= norm
    return found


# --------------------------------------------------------------------------------------------- metrics
def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep the predicted ids, not ``[batch, length, vocab]`` logits."""
    return logits.argmax(-1)


def token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Next-token accuracy: ``predictions[:, t] == labels[:, t + 1]`` over labels that are not -100.

    Computed here rather than with ``evaluate.load("accuracy")``: that call downloads the
    metric's script from the Hugging Face Hub, and the recipes run offline.
    """
    predicted = np.asarray(prediction.predictions)[:, :-1]
    labels = np.asarray(prediction.label_ids)[:, 1:]
    valid = labels != -100
    return {"accuracy": float((predicted == labels)[valid].mean()) if valid.any() else math.nan}


def eval_summary(metrics: Mapping[str, float]) -> dict[str, float]:
    """``loss``, ``perplexity = exp(loss)`` and ``accuracy`` from ``Trainer.evaluate()``'s metrics."""
    loss = float(metrics["eval_loss"])
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "accuracy": float(metrics.get("eval_accuracy", math.nan)),
    }


# --------------------------------------------------------------------------------------------- W&B
def wandb_offline_unless_logged_in(report_to: Sequence[str] | None, output_dir: str) -> None:
    """Without ``WANDB_API_KEY`` (and no ``WANDB_MODE`` chosen), log to W&B offline; keep runs in ``output_dir``."""
    if "wandb" not in (report_to or []):
        return
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_PROJECT", "hf_ghosts")
    os.environ.setdefault("WANDB_DIR", output_dir)
    os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)


def finish_wandb() -> str | None:
    """Close the active W&B run; print where it is and, offline, the ``wandb sync`` line. Returns its directory."""
    import wandb

    run = wandb.run
    if run is None:
        return None
    run_dir = os.path.dirname(run.dir)
    offline, url = run.offline, run.url
    wandb.finish()
    if offline:
        print(f"W&B: offline run saved in {run_dir}; to upload it: wandb sync {run_dir}")
    else:
        print(f"W&B: {url}")
    return run_dir


# --------------------------------------------------------------------------------------------- files
def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Strict JSON (NaN and inf become ``null``), indented."""
    with open(path, "w") as handle:
        json.dump(_jsonable(payload), handle, indent=2, allow_nan=False)
        handle.write("\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_table(rows: Sequence[Mapping[str, Any]], stem: str, columns: Sequence[str] | None = None) -> str:
    """Write ``rows`` to ``stem.csv`` (full precision) and ``stem.md`` (4 significant digits); return the markdown."""
    columns = list(columns or rows[0].keys())
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    with open(f"{stem}.md", "w") as handle:
        handle.write(markdown)
    return markdown


# --------------------------------------------------------------------------------------------- plots
def plot_training_radii(records: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str:
    """Two panels over optimizer steps: ``r`` (proposed and applied, r = 1 drawn) and the radii with ``|u|``.

    ``records`` are the controller's per-step records as dicts (``RhoController.last.scalars()``, plus ``step``).
    """
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    steps = np.array([rec["step"] for rec in records])
    for key, label in (("r", "r = |u| / rho (proposed)"), ("r_applied", "r applied")):
        values = np.array([rec.get(key, np.nan) for rec in records], dtype=float)
        top.plot(steps, np.where(values > 0, values, np.nan), color=COLORS[key], lw=1.2, label=label)
    top.axhline(1.0, color="gray", ls="--", lw=1, label="r = 1")
    top.set_yscale("log")
    top.set_ylabel("normalized step r")
    top.legend(loc="best", fontsize=8)
    top.set_title(title)
    for name in RADIUS_NAMES:
        key = RADIUS_FIELDS[name]
        probed = [rec for rec in records if key in rec]
        if probed:
            values = np.array([rec[key] for rec in probed], dtype=float)
            bottom.plot([rec["step"] for rec in probed], values, color=COLORS[name], lw=1.2, label=f"rho_{name}")
    norms = np.array([rec.get("update_norm", np.nan) for rec in records], dtype=float)
    bottom.plot(steps, np.where(norms > 0, norms, np.nan), color="black", lw=1, ls=":", label="|u| proposed")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("radius / step length")
    bottom.legend(loc="best", fontsize=8)
    for third in (1, 2):
        for axis in (top, bottom):
            axis.axvline(steps[0] + third * (steps[-1] - steps[0]) / 3, color="lightgray", lw=0.8)
    return save_figure(figure, path)

