"""``hf-ghosts diagnose``: the convergence radius of the step a checkpoint's optimizer would take next.

For each of ``--batches`` batches (built as the recipes build them: tokenize, join with EOS, cut into
``--block_size`` blocks with :func:`hf_ghosts.presets.lm_blocks`), the update ``u`` is the one the saved
optimizer proposes next: the gradient as ``Trainer`` computes it (``compute_loss``, tokens counted by
``get_batch_samples``, clipped to ``max_grad_norm``), one ``optimizer.step()`` of an optimizer built by a
throwaway ``Trainer.create_optimizer`` (so its weight-decay parameter groups are ``Trainer``'s own) and loaded
from ``optimizer.pt``; the weights are then put back and ``u`` is never applied. Every radius is measured
along ``u`` at the checkpoint's weights with :class:`~hf_ghosts.RadiusProbe`, and ``r = |u| / rho``.

The learning rate of the next step is the one the saved scheduler set after the last step (``_last_lr``
in ``scheduler.pt``, equal to ``lr`` in the optimizer's parameter groups), unless ``--learning_rate`` is
given. AdamW's update ``u = -lr (m_hat / (sqrt(v_hat) + eps) + wd theta)`` is exactly linear in ``lr`` at
fixed moments (the decoupled weight decay too, and gradient clipping acts on the gradient before it), so
``rho`` does not depend on ``lr`` and ``r`` is proportional to it: ``safe_learning_rate = lr r_target / r``
is the largest learning rate whose next step stays inside the radius on every batch measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, jvp

from hf_ghosts import RadiusProbe, radii
from hf_ghosts.cli.errors import CliError
from hf_ghosts.cli.report import RADIUS_KEYS, number, summary, write_json, write_report
from hf_ghosts.plots import checkpoints_figure

__all__ = [
    "Checkpoint",
    "StepProposer",
    "build_batches",
    "check_data_options",
    "diagnose",
    "find_checkpoints",
    "load_checkpoint",
    "run_diagnose",
    "token_spreads",
]

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# The TrainingArguments fields that shape the optimizer step; everything else (devices, logging, FSDP, ...) is left
# at its default in the throwaway Trainer.
STEP_FIELDS = ("optim", "optim_args", "optim_target_modules", "weight_decay", "adam_beta1", "adam_beta2",
               "adam_epsilon", "learning_rate", "max_grad_norm", "label_smoothing_factor", "seed")
CONTEXT_TOKENS = 12  # tokens of context shown before a fragile position


# --------------------------------------------------------------------------------------------- loading
def find_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``checkpoint-<step>`` folders in ``run_dir``, by step."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(run_dir, name))]
    return sorted(found)


def _has_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in MODEL_WEIGHTS
    )


@dataclass
class Checkpoint:
    """What ``diagnose`` loaded: the model (float32), tokenizer, optimizer and scheduler state, training arguments."""

    source: str
    model: Any
    tokenizer: Any
    step: int | None = None
    training_args: Any = None
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.source)) or self.source


def _check_directory(path: str) -> None:
    """Raise :class:`CliError` unless ``path`` holds a model (``config.json`` and weights)."""
    if _has_model(path):
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


def _load_pickled(path: str, what: str, notes: list[str]) -> Any:
    try:
        # training_args.bin is a pickle, as Trainer writes it: like Trainer itself, read only checkpoints you trust
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # any unpickling failure means: not available
        notes.append(f"{what} could not be read ({type(error).__name__}: {error}); Trainer defaults assumed")
        return None


# Files of which a saved tokenizer has at least one (fast, slow BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_checkpoint(source: str, tokenizer_name: str | None = None, ignore_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint directory (or, if no such directory exists, a hub model name) for :func:`diagnose`.

    Raises:
        CliError: not a checkpoint, no tokenizer, a file that does not load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(source)
    if local:
        _check_directory(source)
    elif os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(os.sep):
        raise CliError(f"{source}: no such checkpoint directory")
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
    checkpoint = Checkpoint(source=source, model=model, tokenizer=tokenizer)
    if not local:
        checkpoint.notes.append(f"{source} loaded from the hub: no optimizer state, trainer state or training arguments")
        return checkpoint
    state_path = os.path.join(source, "trainer_state.json")
    if os.path.isfile(state_path):
        with open(state_path) as handle:
            checkpoint.step = json.load(handle).get("global_step")
    elif match := CHECKPOINT_DIR.match(checkpoint.name):
        checkpoint.step = int(match.group(1))
    args_path = os.path.join(source, "training_args.bin")
    if os.path.isfile(args_path):
        checkpoint.training_args = _load_pickled(args_path, "training_args.bin", checkpoint.notes)
    else:
        checkpoint.notes.append("no training_args.bin: Trainer's defaults assumed for the gradient (max_grad_norm 1.0)")
    optimizer_path = os.path.join(source, "optimizer.pt")
    if ignore_optimizer:
        checkpoint.notes.append("--ignore_optimizer: optimizer.pt not used")
    elif os.path.isfile(optimizer_path):
        try:
            checkpoint.optimizer_state = torch.load(optimizer_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CliError(f"{optimizer_path} could not be read ({type(error).__name__}: {str(error).splitlines()[0]}); "
                           "pass --ignore_optimizer --learning_rate LR to diagnose along the gradient") from error
        scheduler_path = os.path.join(source, "scheduler.pt")
        if os.path.isfile(scheduler_path):
            try:
                checkpoint.scheduler_state = torch.load(scheduler_path, map_location="cpu", weights_only=True)
            except Exception as error:
                checkpoint.notes.append(f"scheduler.pt could not be read ({type(error).__name__}); the learning rate "
                                        "is the optimizer's")
    return checkpoint


# --------------------------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------------------------- the step
@dataclass
class Proposal:
    """One proposed update ``u`` (never applied) and what produced it."""

    update: dict[str, torch.Tensor]
    norm: float
    grad_norm: float
    loss: float


class StepProposer:
    """The update the checkpoint's optimizer would take next on a batch, computed as ``Trainer`` would, not applied.

    A throwaway ``Trainer`` (the checkpoint's optimizer settings, no reporting) builds the optimizer with
    ``create_optimizer``, so its parameter groups (weight decay / no decay, ``get_decay_parameter_names``) are
    the ones ``optimizer.pt`` was saved from. Without optimizer state it is SGD at ``learning_rate``.
    """

    def __init__(self, checkpoint: Checkpoint, learning_rate: float | None, max_grad_norm: float | None,
                 device: str, seed: int) -> None:
        from transformers import Trainer, TrainingArguments

        saved = checkpoint.training_args
        fields = {name: getattr(saved, name) for name in STEP_FIELDS if saved is not None and hasattr(saved, name)}
        if max_grad_norm is not None:
            fields["max_grad_norm"] = max_grad_norm
        self._scratch = tempfile.TemporaryDirectory(prefix="hf_ghosts_diagnose_")
        try:
            args = TrainingArguments(output_dir=self._scratch.name, report_to=[], use_cpu=device == "cpu",
                                     disable_tqdm=True, save_strategy="no", **fields)
        except Exception as error:
            raise CliError(f"the checkpoint's training arguments do not rebuild ({type(error).__name__}: {error}); "
                           "pass --ignore_optimizer --learning_rate LR to diagnose along the gradient") from error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = Trainer(model=checkpoint.model, args=args)
        self.model = self.trainer.model
        self.device = args.device
        self.seed = seed
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        self.names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for name, p in self.model.named_parameters() if p.requires_grad]
        self.saved_state = checkpoint.optimizer_state
        self.notes: list[str] = []
        if self.saved_state is not None:
            self.optimizer = self.trainer.create_optimizer()
            self.direction = "adamw" if isinstance(self.optimizer, torch.optim.AdamW) else type(self.optimizer).__name__.lower()
            self._load_state()  # fails here, not on the first batch, if the groups do not match
            scheduled = (checkpoint.scheduler_state or {}).get("_last_lr")
            if learning_rate is not None:
                self.learning_rates, source = [learning_rate] * len(self.optimizer.param_groups), "--learning_rate"
            elif scheduled is not None and len(scheduled) == len(self.optimizer.param_groups):
                self.learning_rates, source = [float(lr) for lr in scheduled], "scheduler.pt"
            else:
                self.learning_rates = [float(group["lr"]) for group in self.optimizer.param_groups]
                source = "optimizer.pt"
        else:
            if learning_rate is None:
                raise CliError(
                    f"{checkpoint.source} has no optimizer state (optimizer.pt) to propose the next step: pass "
                    "--learning_rate LR to diagnose along the gradient with SGD at that rate"
                )
            self.optimizer = torch.optim.SGD(self.params, lr=learning_rate)
            self.direction, self.learning_rates, source = "sgd", [learning_rate], "--learning_rate"
        self.learning_rate_source = source
        if self.direction not in ("adamw", "sgd"):
            self.notes.append(f"the saved optimizer is {type(self.optimizer).__name__}: safe_learning_rate assumes "
                              "its update is linear in the learning rate")

    @property
    def learning_rate(self) -> float:
        """The step's learning rate (the largest, if the parameter groups differ)."""
        return max(self.learning_rates)

    def _load_state(self) -> None:
        try:
            self.optimizer.load_state_dict(copy.deepcopy(self.saved_state))  # the step writes into the moments
        except (ValueError, KeyError) as error:
            raise CliError(
                f"optimizer.pt does not match the parameter groups Trainer.create_optimizer builds for this model "
                f"({error}); it was written by another optimizer setup. Pass --ignore_optimizer --learning_rate LR to "
                "diagnose along the gradient instead"
            ) from error

    def close(self) -> None:
        self._scratch.cleanup()

    def propose(self, batch: Mapping[str, torch.Tensor]) -> Proposal:
        """The update ``u = theta_next - theta`` of one ``Trainer`` step on ``batch``; the weights are put back."""
        model, optimizer = self.model, self.optimizer
        if self.saved_state is not None:
            self._load_state()
        for group, lr in zip(optimizer.param_groups, self.learning_rates, strict=True):
            group["lr"] = lr
        inputs = {key: value.to(self.device) for key, value in batch.items()}
        _, num_items = self.trainer.get_batch_samples(iter([inputs]), 1, self.device)
        old = [p.detach().clone() for p in self.params]
        training = model.training
        model.zero_grad(set_to_none=True)
        model.train()  # as Trainer computes the gradient (dropout, if the config has any)
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed)  # the same dropout masks for every batch and run; the caller's RNG untouched
                loss = self.trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
            loss.backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            else:
                grad_norm = radii.update_norm(grads)
            try:
                optimizer.step()
            except RuntimeError as error:
                raise CliError(f"the saved optimizer state does not fit this model's parameters ({error}); pass "
                               "--ignore_optimizer --learning_rate LR to diagnose along the gradient") from error
            with torch.no_grad():
                update = {name: p.detach() - o for name, p, o in zip(self.names, self.params, old, strict=True)}
                for p, o in zip(self.params, old, strict=True):
                    p.copy_(o)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(training)
        norm = float(radii.update_norm(list(update.values())))
        return Proposal(update=update, norm=norm, grad_norm=float(grad_norm), loss=float(loss.detach()))


# --------------------------------------------------------------------------------------------- per-token spreads
def token_spreads(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Per position: the spread ``max_k a_k - min_k a_k`` of the logit slopes ``a = J v`` along ``v = d / |d|``, the
    margin (top-1 minus top-2 logit) and the predicted token; one forward-mode JVP per sequence, eager attention,
    eval mode, float32 (the model is left as found). The maximum over labelled positions is the probe's
    ``out_spread``.

    Returns:
        ``{"spread", "margin", "predicted"}``, each ``[batch, length]``, and ``"valid"``: the positions whose
        logits predict a label (``labels[:, t + 1] != -100``).
    """
    params = dict(model.named_parameters())
    norm = float(radii.update_norm(list(direction.values())))
    primals = {name: params[name].detach().float() for name in direction}
    tangents = {name: (d.detach().float() / norm) for name, d in direction.items()}
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch.get("attention_mask")
    previous = getattr(model.config, "_attn_implementation", None)
    training = model.training
    spreads, margins, predicted = [], [], []
    model.eval()
    model.set_attn_implementation("eager")  # forward-mode AD has no sdpa / flash rule
    try:
        for row in range(input_ids.shape[0]):
            kwargs = {"input_ids": input_ids[row : row + 1], "use_cache": False}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[row : row + 1].to(device)

            def logits_of(weights: dict[str, torch.Tensor], kwargs: dict = kwargs) -> torch.Tensor:
                return functional_call(model, weights, args=(), kwargs=kwargs, strict=False).logits.float()

            with torch.no_grad():
                logits, slopes = jvp(logits_of, (primals,), (tangents,))
            spreads.append((slopes.amax(-1) - slopes.amin(-1))[0])
            top = logits[0].topk(2, dim=-1)
            margins.append(top.values[:, 0] - top.values[:, 1])
            predicted.append(top.indices[:, 0])
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)
        model.train(training)
    labels = batch["labels"].to(device)
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    return {"spread": torch.stack(spreads), "margin": torch.stack(margins), "predicted": torch.stack(predicted),
            "valid": valid}


# --------------------------------------------------------------------------------------------- diagnose
def _probe(model: torch.nn.Module, wanted: Sequence[str], estimator: str) -> RadiusProbe:
    """The probe, or a :class:`CliError` that names the radius the model cannot give in ``--radii`` spelling."""
    try:
        return RadiusProbe(model, tuple(wanted), estimator)
    except ValueError as error:
        failing, usable = [], []
        for name in wanted:
            try:
                RadiusProbe(model, (name,), estimator)
                usable.append(name)
            except ValueError as reason:
                failing.append((name, reason))
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        name, reason = failing[0] if failing else ("/".join(wanted), error)
        fix = f"Pass --radii {','.join(usable)}" if usable else "hf_ghosts cannot measure this model"
        reason = str(reason).split(" Pass radii=")[0].rstrip(". ")
        raise CliError(f"--radii {','.join(wanted)}: cannot measure the {name} radius of {model_type} "
                       f"({type(model).__name__}): {reason}. {fix}") from error


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _context(tokenizer: Any, ids: torch.Tensor, position: int) -> str:
    start = max(0, position + 1 - CONTEXT_TOKENS)
    return ("…" if start > 0 else "") + tokenizer.decode(ids[start : position + 1].tolist())


def diagnose(checkpoint: Checkpoint, batches: Sequence[Mapping[str, torch.Tensor]], *, radii_names: Sequence[str],
             estimator: str = "jvp", r_target: float = 1.0, learning_rate: float | None = None,
             max_grad_norm: float | None = None, top_tokens: int = 10, device: str = "cpu", seed: int = 0) -> dict:
    """Measure ``r`` of the next step on each batch; return the diagnosis as a JSON-ready dict (see the README)."""
    proposer = StepProposer(checkpoint, learning_rate, max_grad_norm, device, seed)
    try:
        model = proposer.model
        probe = _probe(model, radii_names, estimator)
        per_batch, candidates, heads = [], [], []
        for index, batch in enumerate(batches):
            proposal = proposer.propose(batch)
            entry: dict[str, Any] = {"batch": index, "loss": _finite(proposal.loss), "grad_norm": _finite(proposal.grad_norm),
                                     "update_norm": _finite(proposal.norm)}
            if not math.isfinite(proposal.norm) or proposal.norm == 0:
                entry.update(r=None, rho=None, finite=False)
                per_batch.append(entry)
                heads.append(None)
                continue
            try:
                report = probe.measure({k: v.to(proposer.device) for k, v in batch.items()}, proposal.update)
                rho = radii.check_radius(float(report.rho), "RadiusProbe.measure")  # NaN: NaN or inf in the slopes
            except ValueError as error:
                if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    raise CliError(f"the probe failed on batch {index}: {error}") from error
                entry.update(r=None, rho=None, finite=False)  # NaN/inf weights: the run had already diverged
                per_batch.append(entry)
                heads.append(None)
                continue
            r = float(radii.normalized_step(proposal.norm, rho))
            entry.update(
                r=_finite(r), rho=_finite(rho), bottleneck=report.bottleneck, finite=math.isfinite(r),
                radii={name: _finite(value) for name, value in report.radii().items()},
                out_spread=None if report.out_spread is None else _finite(report.out_spread),
                output_tokens=None if report.output_tokens is None else int(report.output_tokens),
            )
            head_radii = None if report.attn_spread is None else report.rho_attn.float().cpu()
            heads.append(head_radii)
            if head_radii is not None:
                flat = int(head_radii.argmin())
                entry["attention_head"] = list(divmod(flat, head_radii.shape[1]))
            per_batch.append(entry)
            tokens = token_spreads(model, batch, proposal.update)
            entry["max_token_spread"] = _finite(tokens["spread"][tokens["valid"]].max()) if tokens["valid"].any() else None
            # this batch's top_tokens positions by spread (the overall top ones are among them)
            masked = torch.where(tokens["valid"], tokens["spread"], torch.full_like(tokens["spread"], -math.inf))
            top = masked.flatten().topk(min(top_tokens, int(tokens["valid"].sum())))
            length = masked.shape[1]
            for spread, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                row, position = divmod(flat, length)
                candidates.append((spread, index, row, position, float(tokens["margin"][row, position]),
                                   int(tokens["predicted"][row, position]), batch["input_ids"]))
    finally:
        proposer.close()
    measured = [e for e in per_batch if e.get("finite")]
    worst = max(measured, key=lambda e: e["r"] if e["r"] is not None else math.inf) if measured else None
    lr = proposer.learning_rate
    r = None if worst is None else worst["r"]
    candidates.sort(key=lambda c: -c[0])
    fragile = []
    for spread, index, row, position, margin, predicted, ids in candidates[:top_tokens]:
        tokenizer = checkpoint.tokenizer
        fragile.append({
            "batch": index, "row": row, "position": position, "spread": spread,
            "radius": math.pi / spread if spread > 0 else None, "margin": margin,
            "token": tokenizer.decode([int(ids[row, position])]),
            "next_token": tokenizer.decode([int(ids[row, position + 1])]),
            "predicted": tokenizer.decode([predicted]),
            "context": _context(tokenizer, ids[row], position),
        })
    notes = list(checkpoint.notes) + proposer.notes
    if worst is None:
        notes.append("the proposed update is non-finite or zero on every batch: nothing to measure (a diverged run "
                     "has NaN weights or moments; a zero learning rate proposes no step)")
    block_size = int(batches[0]["input_ids"].shape[1])
    return {
        "checkpoint": checkpoint.source,
        "step": checkpoint.step,
        "model_type": getattr(model.config, "model_type", None),
        "direction": proposer.direction,
        "learning_rate": lr,
        "learning_rate_source": proposer.learning_rate_source,
        "max_grad_norm": proposer.max_grad_norm,
        "estimator": estimator,
        "radii_measured": list(radii_names),
        "r_target": r_target,
        "batches": len(batches),
        "batch_size": int(batches[0]["input_ids"].shape[0]),
        "block_size": block_size,
        "r": r,
        "inside": None if r is None else r < 1.0,
        "rho": None if worst is None else worst["rho"],
        "update_norm": None if worst is None else worst["update_norm"],
        **{RADIUS_KEYS[name]: None if worst is None else worst["radii"].get(name) for name in radii_names},
        "bottleneck": None if worst is None else worst["bottleneck"],
        "worst_batch": None if worst is None else worst["batch"],
        "safe_learning_rate": None if not r else lr * r_target / r,
        "safe_lr_factor": None if not r else r_target / r,
        "per_batch": per_batch,
        "rho_attn_heads": None if worst is None or heads[worst["batch"]] is None else
        [[_finite(v) for v in row] for row in heads[worst["batch"]].tolist()],
        "fragile_tokens": fragile,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------- the command
def _defaults(args: argparse.Namespace, checkpoint: Checkpoint) -> tuple[int, int]:
    """``(block_size, batch_size)`` from the options, else the checkpoint's training arguments and config."""
    saved = checkpoint.training_args
    batch_size = args.batch_size
    if batch_size is None:
        per_device = getattr(saved, "per_device_train_batch_size", None)
        batch_size = per_device * getattr(saved, "gradient_accumulation_steps", 1) if per_device else 8
    limit = getattr(checkpoint.model.config, "max_position_embeddings", None)
    block_size = args.block_size or (min(128, limit) if limit else 128)
    if limit and block_size > limit:
        raise CliError(f"--block_size {block_size} exceeds the model's max_position_embeddings {limit}")
    return block_size, batch_size


def _device(requested: str | None) -> str:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device here; pass --device cpu")
    return device


def _diagnose_one(args: argparse.Namespace, source: str, data: tuple | None = None) -> tuple[dict, tuple]:
    """Diagnose ``source``; ``data`` is ``(batches, description, notes)`` from :func:`build_batches` (built if ``None``)."""
    checkpoint = load_checkpoint(source, args.tokenizer, args.ignore_optimizer)
    if data is None:
        block_size, batch_size = _defaults(args, checkpoint)
        data = build_batches(args, checkpoint.tokenizer, block_size, batch_size)
    batches, described, data_notes = data
    checkpoint.notes.extend(data_notes)
    result = diagnose(checkpoint, batches, radii_names=args.radii, estimator=args.estimator, r_target=args.r_target,
                      learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm, top_tokens=args.top_tokens,
                      device=_device(args.device), seed=args.seed)
    result["data"] = described
    return result, data


def run_diagnose(args: argparse.Namespace) -> None:
    """``hf-ghosts diagnose``: one checkpoint, or with ``--all`` every checkpoint of a run."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        _device(args.device)
        check_data_options(args)
        if args.all:
            _run_all(args)
            return
        output_dir = args.output_dir or (os.path.join(args.checkpoint, "ghosts_diagnosis") if os.path.isdir(args.checkpoint)
                                         else "ghosts_diagnosis")
        result, *_ = _diagnose_one(args, args.checkpoint)
        written = write_report(result, output_dir)
        print(summary(result))
        print(f"  wrote {', '.join(written)}")
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def _run_all(args: argparse.Namespace) -> None:
    """``--all``: the same batches through every ``checkpoint-*`` of the run; a table and a figure of r and the safe LR."""
    run_dir = args.checkpoint
    if not os.path.isdir(run_dir):
        raise CliError(f"--all expects a run directory; {run_dir} is not a directory")
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        hint = " (it is a checkpoint itself: drop --all)" if _has_model(run_dir) else ""
        raise CliError(f"--all: {run_dir} holds no checkpoint-* folders{hint}. Pass the Trainer's output_dir")
    output_dir = args.output_dir or os.path.join(run_dir, "ghosts_diagnosis")
    rows, data = [], None
    for step, path in checkpoints:
        result, data = _diagnose_one(args, path, data)  # the same batches for every checkpoint
        write_report(result, os.path.join(output_dir, os.path.basename(path)))
        rows.append({"checkpoint": os.path.basename(path), "step": result["step"] if result["step"] is not None else step,
                     **{key: result[key] for key in ("r", "rho", "bottleneck", "update_norm", "learning_rate",
                                                     "safe_learning_rate", "direction")}})
        print(f"{os.path.basename(path):>20}: r = {number(rows[-1]['r'])}, rho = {number(rows[-1]['rho'])} "
              f"({rows[-1]['bottleneck']}), lr {rows[-1]['learning_rate']:.3g}, safe lr {number(rows[-1]['safe_learning_rate'])}")
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "diagnosis_all.json"), {"run_dir": run_dir, "data": data[1],
                                                                "r_target": args.r_target, "checkpoints": rows})
    lines = [f"# hf-ghosts diagnosis of every checkpoint in {run_dir}", "",
             "| checkpoint | step | r | rho | bottleneck | learning rate | safe learning rate |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['checkpoint']} | {row['step']} | {number(row['r'])} | {number(row['rho'])} | {row['bottleneck']} | "
              f"{row['learning_rate']:.4g} | {number(row['safe_learning_rate'])} |" for row in rows]
    lines += ["", "![r and the safe learning rate over the checkpoints](diagnosis_all.png)", ""]
    with open(os.path.join(output_dir, "diagnosis_all.md"), "w") as handle:
        handle.write("\n".join(lines))
    checkpoints_figure(rows, os.path.join(output_dir, "diagnosis_all.png"), f"{run_dir}: the next step of each checkpoint")
    print(f"wrote {output_dir}/: diagnosis_all.json, diagnosis_all.md, diagnosis_all.png and one folder per checkpoint")
