"""The text ``hf-ghosts diagnose`` measures on: ``--train_file``, ``--dataset_name`` or the pydoc corpus, cut into
``--batches`` batches of ``--batch_size`` blocks of ``--block_size`` tokens as the recipes cut them
(:func:`hf_ghosts.presets.lm_blocks`: tokenize, join with EOS, cut; in order, no shuffle)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from hf_ghosts.cli.errors import CliError

__all__ = ["DEFAULT_BATCHES", "build_batches", "check_data_options"]

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
    from datasets import load_dataset

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
        from hf_ghosts.presets import pydoc_splits

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
    from hf_ghosts.presets import lm_blocks

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

