"""The text ``hf-ghosts diagnose`` measures on: ``--train_file``, ``--dataset_name`` or the pydoc corpus, cut into
``--batches`` batches of ``--batch_size`` blocks of ``--block_size`` tokens as the recipes cut them
(:func:`lm_blocks`: tokenize, join with EOS, cut; in order, no shuffle). The pydoc corpus (:func:`pydoc_splits`) and
:func:`lm_blocks` are the recipes' too, so that ``diagnose`` measures on the text a recipe trained on, cut the same
way. ``datasets`` comes with the ``cli`` extra."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from hf_ghosts._optional import require
from hf_ghosts.cli.errors import CliError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_BATCHES", "build_batches", "check_data_options", "lm_blocks", "pydoc_corpus", "pydoc_splits"]

# Batches measured by default: r moves by orders of magnitude from batch to batch, and the verdict is the worst
# batch's. At the main job's size (pythia-tiny, 8 x 128 tokens, jvp) 32 batches take 15-25 s on 2 lightly loaded CPU
# cores (~8 s of imports and loading, ~0.33 s a batch; docs/diagnose.md).
DEFAULT_BATCHES = 32


def check_data_options(args: argparse.Namespace) -> str | None:
    """Fail early (before any model is loaded) on a missing, empty or unknown ``--train_file``; return its builder."""
    if args.train_file is not None and args.dataset_name is not None:
        raise CliError("pass either --train_file or --dataset_name, not both")
    if args.train_file is None:
        return None
    path = args.train_file
    if not os.path.isfile(path):
        raise CliError(f"--train_file {path}: no such file")
    if os.path.getsize(path) == 0:
        raise CliError(f"--train_file {path}: the file is empty; pass a file with text")
    extension = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    builder = {"txt": "text", "text": "text", "jsonl": "json", "json": "json", "csv": "csv"}.get(extension)
    if builder is None:
        raise CliError(f"--train_file {path}: expected a .txt, .json, .jsonl or .csv file")
    return builder


def _load_texts(args: argparse.Namespace):
    """The text dataset: ``--train_file``, ``--dataset_name`` or the pydoc corpus (the recipes' default)."""
    load_dataset = require("datasets", extra="cli").load_dataset
    builder = check_data_options(args)
    if args.train_file is not None:
        path = args.train_file
        try:
            texts = load_dataset(builder, data_files={"train": path}, split="train")
        except Exception as error:
            raise CliError(f"--train_file {path} could not be read as {builder} ({type(error).__name__}: {error})") from error
        described = path
    elif args.dataset_name is not None:
        try:
            texts = load_dataset(args.dataset_name, args.dataset_config, split=args.dataset_split)
        except Exception as error:
            raise CliError(f"--dataset_name {args.dataset_name} (config {args.dataset_config}, split "
                           f"{args.dataset_split}) could not be loaded ({type(error).__name__}: {error})") from error
        described = f"{args.dataset_name}" + (f"/{args.dataset_config}" if args.dataset_config else "") + f" [{args.dataset_split}]"
    else:
        if args.text_column != "text":
            raise CliError(f"--text_column {args.text_column}: the default pydoc corpus has only 'text'")
        texts, described = pydoc_splits()["train"], "pydoc corpus (train split, as the recipes use)"
    if args.text_column not in texts.column_names:
        raise CliError(f"--text_column {args.text_column}: the data has no such column; it has {texts.column_names}")
    if len(texts) == 0 or not any(str(text).strip() for text in texts[args.text_column][:1000]):
        raise CliError(f"the data ({described}) holds no text in column {args.text_column!r}")
    return texts, described


def build_batches(args: argparse.Namespace, tokenizer: Any, block_size: int, batch_size: int) -> tuple[list[dict], str, list[str]]:
    """``--batches`` batches of ``batch_size`` blocks of ``block_size`` tokens, in order (no shuffle).

    Returns:
        ``(batches, description of the data, notes)``; batches hold ``input_ids``, ``attention_mask``, ``labels``.
    """
    texts, described = _load_texts(args)
    wanted = args.batches * batch_size
    try:
        blocks = lm_blocks(texts, tokenizer, block_size, args.text_column, max_blocks=wanted)
    except ValueError as error:
        raise CliError(f"{described}: {error}; pass a smaller --block_size or more text") from error
    notes = []
    if len(blocks) < batch_size:
        raise CliError(f"{described} yields {len(blocks)} blocks of {block_size} tokens, fewer than one batch of "
                       f"{batch_size}; pass a smaller --batch_size or --block_size, or more text")
    count = len(blocks) // batch_size
    if count < args.batches:
        notes.append(f"the data yields {len(blocks)} blocks of {block_size} tokens: {count} batches of {batch_size} "
                     f"measured instead of {args.batches}")
    blocks.set_format("torch")
    batches = [{key: blocks[i * batch_size : (i + 1) * batch_size][key] for key in ("input_ids", "attention_mask", "labels")}
               for i in range(count)]
    return batches, described, notes


# --------------------------------------------------------------------------------------------- the pydoc corpus
def pydoc_corpus() -> list[str]:
    """The documents of ``pydoc_data.topics.topics`` (79 topics, ~465k characters), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def pydoc_splits(eval_every: int = 8) -> DatasetDict:
    """The pydoc corpus as ``DatasetDict(train, validation)`` with a ``text`` column.

    Whole documents go to one side (no text shared across the split): every ``eval_every``-th
    topic, in name order, is held out for validation.
    """
    if eval_every < 2:
        raise ValueError(f"pydoc_splits: eval_every must be >= 2; got {eval_every}")
    documents = pydoc_corpus()
    held_out = [doc for i, doc in enumerate(documents) if i % eval_every == eval_every - 1]
    kept = [doc for i, doc in enumerate(documents) if i % eval_every != eval_every - 1]
    datasets = require("datasets", extra="cli")
    return datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": kept}),
                                validation=datasets.Dataset.from_dict({"text": held_out}))


def lm_blocks(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    max_blocks: int | None = None,
) -> Dataset:
    """Tokenize ``dataset[text_column]``, join documents with EOS, and cut into blocks of ``block_size``.

    Returns a dataset of ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (= ``input_ids``;
    causal LMs shift internally). The tail shorter than a block is dropped. ``max_blocks`` keeps
    the first blocks only.
    """
    if text_column not in dataset.column_names:
        raise ValueError(f"lm_blocks: no column {text_column!r} in the dataset; it has {dataset.column_names}")
    if block_size < 2:
        raise ValueError(f"lm_blocks: block_size must be >= 2; got {block_size}")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*row, eos] for row in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = [token for row in batch["input_ids"] for token in row]
        usable = (len(joined) // block_size) * block_size
        blocks = [joined[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [list(b) for b in blocks]}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    # One group over everything: the default batch of 1,000 rows would drop a tail per batch.
    blocks = tokens.map(group, batched=True, batch_size=max(1, len(tokens)), desc=f"blocks of {block_size}")
    if len(blocks) == 0:
        raise ValueError(f"lm_blocks: the texts hold fewer than block_size={block_size} tokens")
    if max_blocks is not None:
        blocks = blocks.select(range(min(max_blocks, len(blocks))))
    return blocks
