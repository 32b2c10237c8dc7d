"""Reading a Trainer checkpoint for ``hf-ghosts diagnose`` without running code from it.

Trainer writes ``training_args.bin`` as a pickle; a pickle may carry a payload (``__reduce__``) that runs when it
is unpickled. ``diagnose`` reads it with ``torch.load(weights_only=True)`` and an allow-list
(:data:`ARGUMENT_CLASSES`, :data:`ENUMS`) whose entries are stand-ins: a pickled arguments dataclass becomes a
:class:`FieldRecord` that only stores its fields, an enum becomes its value, so nothing of transformers or
accelerate is constructed either. Any other global in the file is refused; reading it then needs
``--trust_checkpoint`` (a plain ``torch.load``, as Trainer's own resume does). ``optimizer.pt`` and
``scheduler.pt`` hold tensors and numbers (``weights_only=True``); ``trainer_state.json`` is JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_ghosts.cli.errors import CliError

__all__ = [
    "ARGUMENT_CLASSES",
    "ARGUMENT_PATTERN",
    "ENUMS",
    "Checkpoint",
    "FieldRecord",
    "find_checkpoints",
    "has_model",
    "load_checkpoint",
    "read_training_args",
    "stand_in",
]

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Files of which a saved tokenizer has at least one (fast, slow BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# The dataclasses a training_args.bin of TrainingArguments holds, by pickled path; and, by pattern, the arguments
# classes of hf_ghosts (RhoTrainingArguments, rho_arguments(SFTConfig) -> hf_ghosts.trainer.RhoSFTConfig) and TRL.
ARGUMENT_CLASSES = (
    "transformers.training_args.TrainingArguments",
    "transformers.training_args_seq2seq.Seq2SeqTrainingArguments",
    "transformers.trainer_pt_utils.AcceleratorConfig",
    "accelerate.state.PartialState",
)
ARGUMENT_PATTERN = re.compile(r"^(hf_ghosts(\.\w+)+\.Rho\w+|trl(\.\w+)+\.\w+Config)$")
# The enums it holds; each is read as its value (a string).
ENUMS = (
    "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy",
    "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.SchedulerType",
    "transformers.trainer_utils.FSDPOption",
    "transformers.training_args.OptimizerNames",
    "transformers.debug_utils.DebugOption",
    "accelerate.utils.dataclasses.DistributedType",
)


class FieldRecord:
    """Stand-in for an allow-listed dataclass in a pickle: keeps the fields the pickle sets, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> FieldRecord:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"FieldRecord({sorted(vars(self))})"


def _enum_value(value: Any) -> Any:
    return value


def stand_in(path: str) -> Any:
    """What the global ``path`` is read as: :class:`FieldRecord`, an enum's value, or ``None`` (refused)."""
    if path in ARGUMENT_CLASSES or ARGUMENT_PATTERN.match(path):
        return FieldRecord
    return _enum_value if path in ENUMS else None


def read_training_args(path: str, trust: bool = False) -> Any:
    """``training_args.bin`` as a :class:`FieldRecord` of its fields (``trust``: the object itself, unpickled).

    Raises:
        pickle.UnpicklingError: the file names a global outside the allow-list (and ``trust`` is False); the
            message lists them. They are found by scanning the pickle's opcodes, which runs nothing.
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    stand_ins = {name: stand_in(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)}
    refused = sorted(name for name, reader in stand_ins.items() if reader is None)
    if refused:
        raise pickle.UnpicklingError(f"it names {', '.join(refused)}")
    with torch.serialization.safe_globals([(reader, name) for name, reader in stand_ins.items()]):
        return torch.load(path, map_location="cpu", weights_only=True)


def find_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``checkpoint-<step>`` folders in ``run_dir``, by step."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(run_dir, name))]
    return sorted(found)


def has_model(path: str) -> bool:
    """Whether ``path`` holds ``config.json`` and model weights."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in MODEL_WEIGHTS
    )


@dataclass
class Checkpoint:
    """What ``diagnose`` loaded: the model (float32), tokenizer, optimizer, scheduler and trainer state, arguments."""

    source: str
    model: Any
    tokenizer: Any
    step: int | None = None
    training_args: Any = None
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    trainer_state: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.source)) or self.source


def _check_directory(path: str) -> None:
    """Raise :class:`CliError` unless ``path`` holds a model (``config.json`` and weights)."""
    if has_model(path):
        return
    checkpoints = find_checkpoints(path)
    if checkpoints:
        names = ("..., " if len(checkpoints) > 3 else "") + ", ".join(os.path.basename(p) for _, p in checkpoints[-3:])
        raise CliError(
            f"{path} is a run directory, not a checkpoint (it holds {len(checkpoints)} checkpoint-* folders: {names}). "
            f"Pass one of them, e.g. {checkpoints[-1][1]}, or add --all to diagnose every one"
        )
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    raise CliError(
        f"{path} is not a Trainer checkpoint: it has no config.json with model weights ({', '.join(MODEL_WEIGHTS[::2])})"
        + (" (it holds a PEFT adapter, which diagnose does not load; merge it into the model first)" if adapter else "")
        + ". Pass a checkpoint-* folder written by Trainer (save_strategy), or a save_pretrained model directory"
    )


def _load_model_and_tokenizer(source: str, local: bool, tokenizer_name: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except Exception as error:
        where = "the checkpoint's model" if local else f"{source!r}: not a local directory, and the hub model"
        raise CliError(f"{where} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0]}). Pass a "
                       "checkpoint-* directory (offline) or a hub causal-LM name (with network)") from error
    if local and tokenizer_name is None and not any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer of the model's class here (it encodes every text to nothing)
        raise CliError(
            f"{source} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): Trainer saves it only when given "
            "processing_class=. Pass --tokenizer with the tokenizer the model was trained with"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or source)
    except Exception as error:
        raise CliError(
            f"no tokenizer could be loaded from {tokenizer_name or source} ({type(error).__name__}). Pass --tokenizer "
            "with the tokenizer the model was trained with (Trainer saves it only when given processing_class=)"
        ) from error
    if tokenizer.eos_token_id is None:
        raise CliError(f"the tokenizer of {tokenizer_name or source} has no EOS token to join documents with; pass "
                       "--tokenizer with one that has")
    return model, tokenizer


def _read_arguments(checkpoint: Checkpoint, path: str, trust: bool, required: bool) -> None:
    """Fill ``checkpoint.training_args`` from ``path`` (see :func:`read_training_args`)."""
    try:
        checkpoint.training_args = read_training_args(path, trust)
    except pickle.UnpicklingError as error:
        refused = str(error).split("\n")[0]
        if required:
            raise CliError(
                f"{path} holds objects outside diagnose's allow-list of TrainingArguments types ({refused}); it was "
                "not unpickled, since a pickle can run code. Pass --trust_checkpoint to unpickle it (only for a "
                "checkpoint you trust), or --max_grad_norm N to diagnose without it (Trainer's defaults for the rest)"
            ) from error
        checkpoint.notes.append(f"training_args.bin not unpickled ({refused}; --trust_checkpoint reads it): "
                                "Trainer's defaults assumed beside --max_grad_norm")
    except Exception as error:  # a truncated or foreign file: not available
        checkpoint.notes.append(f"training_args.bin could not be read ({type(error).__name__}: {error}); Trainer "
                                "defaults assumed")


def _load_tensors(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(source: str, tokenizer_name: str | None = None, ignore_optimizer: bool = False, *,
                    trust_checkpoint: bool = False, arguments_required: bool = True) -> Checkpoint:
    """Load a checkpoint directory (or, if no such directory exists, a hub model name) for ``diagnose``.

    Args:
        trust_checkpoint: unpickle ``training_args.bin`` whatever it holds (it may run code).
        arguments_required: a ``training_args.bin`` that cannot be read safely is an error (else a note).

    Raises:
        CliError: not a checkpoint, no tokenizer, a file that does not load, unsafe training arguments.
    """
    local = os.path.isdir(source)
    if local:
        _check_directory(source)
    elif os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(os.sep):
        raise CliError(f"{source}: no such checkpoint directory")
    model, tokenizer = _load_model_and_tokenizer(source, local, tokenizer_name)
    checkpoint = Checkpoint(source=source, model=model, tokenizer=tokenizer)
    if not local:
        checkpoint.notes.append(f"{source} loaded from the hub: no optimizer state, trainer state or training arguments")
        return checkpoint
    state_path = os.path.join(source, "trainer_state.json")
    if os.path.isfile(state_path):
        with open(state_path) as handle:
            checkpoint.trainer_state = json.load(handle)
        checkpoint.step = checkpoint.trainer_state.get("global_step")
    elif match := CHECKPOINT_DIR.match(checkpoint.name):
        checkpoint.step = int(match.group(1))
    args_path = os.path.join(source, "training_args.bin")
    if os.path.isfile(args_path):
        _read_arguments(checkpoint, args_path, trust_checkpoint, arguments_required)
    else:
        checkpoint.notes.append("no training_args.bin: Trainer's defaults assumed for the gradient (max_grad_norm 1.0)")
    optimizer_path = os.path.join(source, "optimizer.pt")
    if ignore_optimizer:
        checkpoint.notes.append("--ignore_optimizer: optimizer.pt not used")
    elif os.path.isfile(optimizer_path):
        try:
            checkpoint.optimizer_state = _load_tensors(optimizer_path)
        except Exception as error:
            raise CliError(f"{optimizer_path} could not be read ({type(error).__name__}: {str(error).splitlines()[0]}); "
                           "pass --ignore_optimizer --learning_rate LR to diagnose along the gradient") from error
        scheduler_path = os.path.join(source, "scheduler.pt")
        if os.path.isfile(scheduler_path):
            try:
                checkpoint.scheduler_state = _load_tensors(scheduler_path)
            except Exception as error:
                checkpoint.notes.append(f"scheduler.pt could not be read ({type(error).__name__}); the learning rate "
                                        "is the optimizer's")
    return checkpoint
