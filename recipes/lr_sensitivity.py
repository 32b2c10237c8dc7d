"""Does RhoTrainer make a bad learning rate safe? Learning-rate sensitivity and the two small-scale instabilities.

Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities"
(arXiv 2309.14322), summarize a method by its learning-rate sensitivity over a sweep ``LR`` spanning
orders of magnitude (their Section 3.1)::

    sensitivity = mean_{lr in LR} min(loss(lr), loss_0)  -  min_{lr in LR} loss(lr)

with ``loss_0`` the loss at initialization (a diverged run counts as ``loss_0``), and show two
instabilities of small transformers at high learning rates: attention logit growth (mitigated by
qk-layernorm) and output logit divergence (mitigated by a z-loss of 1e-4). Both are softmax radii in
this project's terms (the attention radius and the output radius). Every method below trains the
same data, in the same order, from the same initial weights (one per seed), on the main job's
schedule (``recipes/pythia_finetune.py``: 8 x 128 tokens per step, 20 warm-up steps, cosine to 10%),
with no gradient-norm clipping unless the method says so (the main job itself keeps Trainer's
``max_grad_norm=1``, so its AdamW is this recipe's ``adamw+clip``):

=================  ===============================================================================================
method             what differs
=================  ===============================================================================================
``adamw``          plain AdamW (``max_grad_norm=0``)
``adamw+clip``     AdamW with ``max_grad_norm`` (``--max_grad_norm``, default 1)
``adamw+zloss``    AdamW, loss + ``--z_loss`` (1e-4) x mean over predicted tokens of ``logsumexp(z)^2``
``qk-norm``        AdamW on Qwen3 at the Llama preset's shape: Llama plus per-head RMSNorm on q and k, the
                   shared weights bit-identical at initialization (Llama presets only)
``qk-norm+zloss``  both of Wortsman's mitigations (Llama presets only; not in the default list)
``rho``            ``RhoTrainer`` at its defaults (clip, r* = 2, output and attention radii) but
                   ``rho_granularity="global"``: one scale for the whole update (the default before issue 30)
``rho+zloss``      ``rho``, plus the z-loss
``rho+qk-norm``    ``rho`` on the qk-norm model (Llama presets only; not in the default list)
``rho-blocks``     ``RhoTrainer`` at its defaults, ``rho_granularity="blocks"``: a clipped step is taken block by
                   block (issue 30; not in the default list)
``rho-blocks+qk-norm``  ``rho-blocks`` on the qk-norm model (Llama presets only; not in the default list)
``rho-best``       ``RhoTrainer`` (global clip) with ``--best_rho_target``, ``--best_rho_radius``, ``--best_rho_radii``,
                   ``--best_rho_every``; the defaults (r* = 1, bound, output and attention, every 16) won a
                   search on llama-tiny, seed 0, against r* = 0.5 and 4, ``topk_exact``, attention alone
                   and output alone (docs/results.md, "Learning-rate sensitivity")
``zclip``          AdamW + ZClip at its defaults (PyPI ``zclip``), at ``on_pre_optimizer_step`` (not in the default list)
``skip-step``      OLMo-core's ``SkipStepAdamW`` (PyPI ``ai2-olmo-core``) at its skip defaults (window 128, 6 sigma)
                   and AdamW's rate, betas, epsilon and weight decay, fed the step's loss and gradient norm (not in
                   the default list)
=================  ===============================================================================================

``zclip`` and ``skip-step`` are the peers users reach for instead (``recipes/peers.py``: the wiring, one definition
for this recipe and the spike test). They need the ``[peers]`` extra, ``pip install -e ".[peers]"``; asking for them
without it is an ImportError with that line, at argument parsing. Their run files record the package's version and
defaults; ``clipped_fraction`` is the fraction of steps ZClip clipped, ``skipped_steps`` the steps skip-step skipped.

Recorded per run: the final eval loss (and the initial one, ``loss_0``), ``diverged`` (final loss not
finite or above ``loss_0``), the largest training loss, the max attention logit (max over layers,
heads, queries and allowed keys of ``|q k^T| / sqrt(d)`` before the softmax) and the max output logit
(``max |z|`` over predicting positions), both over training: measured every ``--logit_every`` steps
(and at steps 0 and the last) on the first ``--logit_blocks`` evaluation blocks with an eager attention
that records the scores; for ``RhoTrainer`` the fractions of steps probed and of probed steps clipped and
the binding radius (the one that bound most often), from the logged ``ghosts/*`` keys.

    python recipes/lr_sensitivity.py                          # the full grid: 4 presets, 7 methods, 6 rates (hours)
    python recipes/lr_sensitivity.py --presets pythia-tiny llama-tiny                 # 234 runs
    python recipes/lr_sensitivity.py --presets pythia-14m llama-14m --seeds 0         # 78 runs
    python recipes/lr_sensitivity.py --presets llama-tiny --methods rho-best --best_rho_target 1 \\
        --best_rho_radius topk_exact --output_dir outputs/lr_sensitivity_best         # try a RhoTrainer setting
    python recipes/lr_sensitivity.py --methods adamw rho qk-norm+zloss rho+qk-norm --presets llama-tiny
    python recipes/lr_sensitivity.py --methods adamw zclip skip-step  # the peers (pip install -e ".[peers]")
    python recipes/lr_sensitivity.py --replot                 # tables and figures again from the run files

Measured wall time (``train_seconds``, one thread each, two to three runs at a time on this 2-core machine), mean
over the rates 1e-3 ... 3e-1: pythia-tiny AdamW 15 s, RhoTrainer 24 s, block-wise 34 s; llama-tiny 13, 21 and 40 s;
pythia-14m 55, 83 and 143 s; llama-14m 52, 80 and 164 s (plus ~2-5 s of evaluation and the logit samples). The 280
runs of docs/results.md (4 presets, 4 rates, 8 methods, 3 seeds on the tiny presets and 2 at 14m) took 3.75 h of
training on one thread each, ~2.1 h of wall time two at a time.
Presets can run as parallel processes into one ``--output_dir`` (one run file each); then ``--replot``
with every preset rebuilds the joint tables.

Defaults per preset: ``*-tiny`` sweeps 1e-3 ... 3e-1 over seeds 0, 1, 2; the others 3e-4 ... 1e-1, seed 0
(``--learning_rates`` and ``--seeds`` override both). The sweep is resumable: each run is written to
``<output_dir>/runs/<preset>/<method>/lr<lr>-seed<seed>.json`` as soon as it finishes and is read back,
not rerun, next time (with the same settings; other settings raise an error: use another ``--output_dir``).
Writes ``lr_sensitivity_runs.csv`` / ``.md`` (one row per run), ``lr_sensitivity_table.csv`` / ``.md``
(per preset and method: sensitivity mean ± std over seeds (ddof=1), best loss, ratios to AdamW, diverged
runs, max logits, clipping), ``lr_sensitivity_losses.md`` (final loss, method x learning rate),
``lr_sensitivity.png`` (final loss against the learning rate per preset, the paper's Figure 1),
``lr_sensitivity_logits.png`` (max attention and output logit against the learning rate) and
``summary.json``. W&B stays off unless ``--report_to wandb`` (offline without ``WANDB_API_KEY``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from common import (
    DataArguments,
    finish_wandb,
    load_data,
    probe_batch,
    wandb_offline_unless_logged_in,
    write_json,
)
from lr_sensitivity_report import ghosts_summary, lr_sensitivity, report  # noqa: F401  (lr_sensitivity: tests, studies)
from peers import METHODS as PEER_METHODS
from peers import peer_summary, require, wire
from peers import settings as peer_settings
from presets import MODEL_PRESETS, build_model, preset_config
from pythia_finetune import FinetuneArguments
from transformers import (
    AttentionInterface,
    HfArgumentParser,
    PreTrainedModel,
    PrinterCallback,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_ghosts import RhoTrainer
from hf_ghosts.compat import attention_implementation
from hf_ghosts.probe import output_positions
from hf_ghosts.settings import DEFAULT_BLOCK_REFRESH, DEFAULT_EVERY, RADII, RADIUS_KINDS


@dataclass(frozen=True)
class Method:
    """One method of the sweep: the trainer (``rho``: None for AdamW, ``"global"``, ``"best"`` or ``"blocks"``), z-loss,
    qk-norm architecture, gradient-norm clipping, a peer (``recipes/peers.py``: ``"zclip"`` or ``"skip-step"``)."""

    description: str
    rho: str | None = None
    z_loss: bool = False
    qk_norm: bool = False
    clip: bool = False
    peer: str | None = None


METHODS: dict[str, Method] = {
    "adamw": Method("AdamW"),
    "adamw+clip": Method("AdamW + max_grad_norm", clip=True),
    "adamw+zloss": Method("AdamW + z-loss", z_loss=True),
    "qk-norm": Method("AdamW, qk-norm (Qwen3)", qk_norm=True),
    "qk-norm+zloss": Method("AdamW, qk-norm + z-loss", z_loss=True, qk_norm=True),
    "rho": Method("RhoTrainer, global clip", rho="global"),
    "rho+zloss": Method("RhoTrainer, global clip + z-loss", rho="global", z_loss=True),
    "rho+qk-norm": Method("RhoTrainer, global clip, qk-norm", rho="global", qk_norm=True),
    "rho-best": Method("RhoTrainer (best setting, global clip)", rho="best"),
    "rho-blocks": Method("RhoTrainer, block-wise clip (the default)", rho="blocks"),
    "rho-blocks+qk-norm": Method("RhoTrainer, block-wise clip, qk-norm", rho="blocks", qk_norm=True),
    **{name: Method(description, peer=name) for name, description in PEER_METHODS.items()},  # zclip, skip-step
}
DEFAULT_METHODS = ["adamw", "adamw+clip", "adamw+zloss", "qk-norm", "rho", "rho+zloss", "rho-best"]
TINY_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
LARGER_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


@dataclass
class SensitivityArguments:
    """The sweep: presets, methods, learning rates, seeds, steps, the measurements, and the best RhoTrainer setting."""

    output_dir: str = field(default="outputs/lr_sensitivity", metadata={"help": "Where the run files, tables and figures go."})
    presets: list[str] = field(
        default_factory=lambda: ["pythia-tiny", "llama-tiny", "pythia-14m", "llama-14m"],
        metadata={"help": "Model presets (family and size).", "choices": list(MODEL_PRESETS)},
    )
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               metadata={"help": "Methods (qk-norm ones run on Llama presets only).", "choices": list(METHODS)})
    learning_rates: list[float] = field(
        default_factory=list, metadata={"help": f"Peak learning rates (default: {TINY_LRS} on *-tiny, {LARGER_LRS} else)."}
    )
    seeds: list[int] = field(default_factory=list, metadata={"help": "Seeds of weights and data order (default: 0 1 2 on "
                                                                      "*-tiny, 0 else)."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps per run."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step (of --block_size tokens)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm bound of 'adamw+clip'."})
    z_loss: float = field(default=1e-4, metadata={"help": "Weight of the z-loss of the '+zloss' methods."})
    logit_every: int = field(default=10, metadata={"help": "Measure the max attention and output logits every k steps."})
    logit_blocks: int = field(default=4, metadata={"help": "Evaluation blocks the logits are measured on."})
    best_rho_target: float | None = field(default=1.0, metadata={"help": "'rho-best': rho_target (None: clip's default)."})
    best_rho_radius: str = field(default="bound", metadata={"help": "'rho-best': rho_radius.", "choices": list(RADIUS_KINDS)})
    best_rho_radii: list[str] = field(default_factory=lambda: ["output", "attention"],
                                      metadata={"help": "'rho-best': rho_radii (the limiting radii).", "choices": list(RADII)})
    best_rho_every: int = field(default=DEFAULT_EVERY, metadata={"help": "'rho-best': rho_every."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trainer's report_to (default: none)."})
    replot: bool = field(default=False, metadata={"help": "No training: tables and figures from the run files found."})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.logit_every < 1 or self.logit_blocks < 1 or self.batch_size < 1:
            raise ValueError("--max_steps, --logit_every, --logit_blocks and --batch_size must be >= 1; got "
                             f"{self.max_steps}, {self.logit_every}, {self.logit_blocks}, {self.batch_size}")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in self.learning_rates):
            raise ValueError(f"--learning_rates must be finite numbers > 0; got {self.learning_rates}")
        if not self.replot:
            require(self.methods)  # the peers' packages, now rather than mid-sweep

    def learning_rates_of(self, preset: str) -> list[float]:
        return list(self.learning_rates) or (TINY_LRS if preset.endswith("-tiny") else LARGER_LRS)

    def seeds_of(self, preset: str) -> list[int]:
        return list(self.seeds) or ([0, 1, 2] if preset.endswith("-tiny") else [0])


def applies(preset: str, method: str) -> bool:
    """qk-norm methods need a Llama preset (Qwen3 is Llama plus qk-norm); every other method runs everywhere."""
    return not METHODS[method].qk_norm or MODEL_PRESETS[preset][0] == "llama"


def grid(spec: SensitivityArguments) -> Iterator[tuple[str, str, float, int]]:
    """Every ``(preset, method, learning rate, seed)``: by preset, seed, rate, then method (a partial sweep compares)."""
    for preset in spec.presets:
        for seed in spec.seeds_of(preset):
            for lr in spec.learning_rates_of(preset):
                for method in spec.methods:
                    if applies(preset, method):
                        yield preset, method, lr, seed


# --------------------------------------------------------------------------------------------- the measures
def z_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """``sum_t logsumexp(z_t)^2 / N`` over the positions ``t`` that predict a label (``labels[t + 1] != -100``).

    ``N``: ``num_items`` (the Trainer's count of predicted labels, so that gradient accumulation weighs it as the
    cross-entropy) or, without it, the number of those positions (the mean). The z-loss of PaLM and Wortsman et al.
    """
    mask = output_positions({"labels": labels}, logits.shape[:2], shift_labels=True, device=logits.device)
    lse = torch.logsumexp(logits[mask].float(), dim=-1)
    count = mask.sum() if num_items is None else num_items
    return lse.pow(2).sum() / count


class ZLoss:
    """A trainer mixin: the training loss plus ``z_loss_weight * z_loss`` (evaluation keeps the plain loss)."""

    def __init__(self, *args: Any, z_loss_weight: float = 0.0, **kwargs: Any) -> None:
        self.z_loss_weight = z_loss_weight
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.z_loss_weight and model.training:
            loss = loss + self.z_loss_weight * z_loss(outputs.logits, inputs["labels"], num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class SweepTrainer(ZLoss, Trainer):
    pass


class SweepRhoTrainer(ZLoss, RhoTrainer):
    pass


LOGIT_ATTENTION = "lr_sensitivity_logits"
_ATTENTION_MAXIMA: list[torch.Tensor] = []


def _logit_recording_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager attention (``eager_mask``'s additive mask) that appends ``max |q k^T| * scaling`` over allowed keys."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    allowed = torch.ones_like(scores, dtype=torch.bool) if attention_mask is None else attention_mask[..., : key.shape[2]] == 0
    _ATTENTION_MAXIMA.append(scores.abs().masked_fill(~allowed, 0.0).amax())
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(LOGIT_ATTENTION, _logit_recording_attention)
AttentionMaskInterface.register(LOGIT_ATTENTION, eager_mask)


@torch.no_grad()
def max_logits(model: PreTrainedModel, batch: Mapping[str, torch.Tensor], predicting: torch.Tensor) -> tuple[float, float]:
    """``(max attention logit, max |output logit|)`` of one eval-mode forward of ``batch`` (Wortsman et al.'s two
    instabilities): attention over layers, heads, queries and allowed keys; output over the ``predicting`` positions.
    The model is left in the mode it was found in."""
    device = next(model.parameters()).device
    inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask") if key in batch}
    was_training = model.training
    model.eval()
    _ATTENTION_MAXIMA.clear()
    try:
        with attention_implementation(model, LOGIT_ATTENTION):
            logits = model(**inputs).logits
        attention = float(torch.stack(_ATTENTION_MAXIMA).max()) if _ATTENTION_MAXIMA else math.nan
    finally:
        _ATTENTION_MAXIMA.clear()
        model.train(was_training)
    return attention, float(logits[predicting.to(device)].abs().max())


class LogitSampler(TrainerCallback):
    """Records :func:`max_logits` of a fixed batch at step 0, every ``every`` steps and at the last step (no state
    changes: a no-grad forward, the training mode restored)."""

    def __init__(self, batch: Mapping[str, torch.Tensor], predicting: torch.Tensor, every: int) -> None:
        self.batch, self.predicting, self.every = batch, predicting, every
        self.samples: list[tuple[int, float, float]] = []  # (step, max attention logit, max output logit)

    def _sample(self, model: PreTrainedModel, step: int) -> None:
        self.samples.append((step, *max_logits(model, self.batch, self.predicting)))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._sample(kwargs["model"], state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._sample(kwargs["model"], state.global_step)


# --------------------------------------------------------------------------------------------- one run
def qk_norm_model(preset: str, vocab_size: int, seed: int) -> PreTrainedModel:
    """Qwen3 at Llama preset ``preset``'s shape, rotary and norm settings: Llama plus per-head RMSNorm on q and k.

    Built from ``torch.manual_seed(seed)`` like :func:`~hf_ghosts.presets.build_model`: the weights it shares with
    the Llama are identical, the q/k norms start at one.
    """
    llama = preset_config(preset, vocab_size)
    if llama.model_type != "llama":
        raise ValueError(f"qk_norm_model: the qk-norm model is the Llama's twin; preset {preset!r} is a {llama.model_type}")
    config = Qwen3Config(**{**MODEL_PRESETS[preset][1], "vocab_size": vocab_size, "head_dim": llama.head_dim,
                            "rope_parameters": llama.rope_parameters, "rms_norm_eps": llama.rms_norm_eps,
                            "attention_bias": llama.attention_bias})
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def run_settings(spec: SensitivityArguments, data_args: DataArguments, method: str) -> dict[str, Any]:
    """What a run file must match to be reused: the training settings and the method's own."""
    settings = {"max_steps": spec.max_steps, "batch_size": spec.batch_size, "logit_every": spec.logit_every,
                "logit_blocks": spec.logit_blocks, "block_size": data_args.block_size,
                "max_train_blocks": data_args.max_train_blocks, "max_eval_blocks": data_args.max_eval_blocks,
                "tokenizer_vocab_size": data_args.tokenizer_vocab_size, "dataset_name": data_args.dataset_name,
                "train_file": data_args.train_file}
    chosen = METHODS[method]
    if chosen.clip:
        settings["max_grad_norm"] = spec.max_grad_norm
    if chosen.z_loss:
        settings["z_loss"] = spec.z_loss
    if chosen.rho == "best":
        settings.update(rho_target=spec.best_rho_target, rho_radius=spec.best_rho_radius, rho_radii=list(spec.best_rho_radii),
                        rho_every=spec.best_rho_every)
    if chosen.rho == "blocks":
        settings.update(rho_granularity="blocks", rho_block_refresh=DEFAULT_BLOCK_REFRESH)
    if chosen.peer:
        settings.update(peer_settings(method))
    return settings


def training_arguments(spec: SensitivityArguments, method: str, lr: float, seed: int, output_dir: str) -> FinetuneArguments:
    """The main job's arguments (schedule, evaluation) at ``lr`` and ``seed``; the method's clipping and ``rho_*``."""
    chosen = METHODS[method]
    rho: dict[str, Any] = {"rho_watch_radii": []}  # watching only logs: no cost spent on it here
    if chosen.rho == "best":
        rho.update(rho_target=spec.best_rho_target, rho_radius=spec.best_rho_radius, rho_radii=list(spec.best_rho_radii),
                   rho_every=spec.best_rho_every)
    if chosen.rho is not None:  # every method names its granularity: a run file means one step rule whatever the default
        rho.update(rho_granularity="blocks" if chosen.rho == "blocks" else "global")
    return FinetuneArguments(
        output_dir=output_dir, max_steps=spec.max_steps, learning_rate=lr, per_device_train_batch_size=spec.batch_size,
        max_grad_norm=spec.max_grad_norm if chosen.clip else 0.0, logging_steps=1, logging_nan_inf_filter=False,
        dataloader_pin_memory=False,
        report_to=spec.report_to, disable_tqdm=True, seed=seed, data_seed=seed, run_name=f"{method} lr={lr:g} seed {seed}",
        **rho,
    )


def train_run(spec: SensitivityArguments, preset: str, method: str, lr: float, seed: int, data: dict[str, Any],
              scratch: str) -> dict[str, Any]:
    """Train one run from the seed's initial weights; return its record (losses, logits, clipping, curves)."""
    chosen = METHODS[method]
    model = (qk_norm_model if chosen.qk_norm else build_model)(preset, data["vocab"], seed)
    args = training_arguments(spec, method, lr, seed, os.path.join(scratch, f"{preset}-{method}-{lr:g}-{seed}"))
    trainer_cls, callbacks = wire(method, SweepRhoTrainer if chosen.rho else SweepTrainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
                          data_collator=default_data_collator, z_loss_weight=spec.z_loss if chosen.z_loss else 0.0,
                          callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    sampler = LogitSampler(*data["logit_batch"], spec.logit_every)
    trainer.add_callback(sampler)
    started = time.perf_counter()
    trainer.train()
    history = trainer.state.log_history
    curve = [(h["step"], float(h["eval_loss"])) for h in history if "eval_loss" in h]
    if curve[-1][0] != trainer.state.global_step:
        curve.append((trainer.state.global_step, float(trainer.evaluate()["eval_loss"])))
    seconds = time.perf_counter() - started
    if "wandb" in spec.report_to:
        finish_wandb()
    eval_seconds = sum(h["eval_runtime"] for h in trainer.state.log_history if "eval_runtime" in h)
    initial, final = curve[0][1], curve[-1][1]
    train_losses = [float(h["loss"]) for h in history if "loss" in h]
    return {
        "preset": preset, "method": method, "learning_rate": lr, "seed": seed,
        "initial_eval_loss": initial, "final_eval_loss": final,
        "diverged": not math.isfinite(final) or final > initial,
        "max_train_loss": max(train_losses, key=lambda x: x if math.isfinite(x) else math.inf, default=math.nan),
        "max_attention_logit": max(s[1] for s in sampler.samples), "max_output_logit": max(s[2] for s in sampler.samples),
        **ghosts_summary(history), **peer_summary(trainer),
        "train_seconds": round(seconds - eval_seconds, 2), "eval_seconds": round(eval_seconds, 2),
        "eval_curve": curve, "logit_samples": sampler.samples, "train_losses": train_losses,
    }


def run_path(spec: SensitivityArguments, preset: str, method: str, lr: float, seed: int) -> str:
    return os.path.join(spec.output_dir, "runs", preset, method, f"lr{lr:g}-seed{seed}.json")


def read_run(path: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A run file; with ``settings``, an error unless it was made with them (JSON ``null`` back to NaN)."""
    with open(path) as handle:
        stored = json.load(handle)
    if settings is not None and stored["settings"] != json.loads(json.dumps(dict(settings))):
        differ = sorted(k for k in {*stored["settings"], *settings} if stored["settings"].get(k) != settings.get(k))
        raise ValueError(f"{path} was made with other settings ({', '.join(differ)}); rerun with another --output_dir")
    row = stored["run"]
    for key, value in row.items():
        if value is None:
            row[key] = math.nan
    return row


def train_all(spec: SensitivityArguments, data_args: DataArguments) -> None:
    """Train every run of the grid that has no run file yet; write each file as soon as its run ends."""
    todo = [(p, m, lr, s) for p, m, lr, s in grid(spec) if not os.path.exists(run_path(spec, p, m, lr, s))]
    for preset, method, lr, seed in grid(spec):
        if (preset, method, lr, seed) not in todo:
            read_run(run_path(spec, preset, method, lr, seed), run_settings(spec, data_args, method))
    print(f"{len(todo)} run(s) to train, {sum(1 for _ in grid(spec)) - len(todo)} found in {spec.output_dir}/runs", flush=True)
    if not todo:
        return
    wandb_offline_unless_logged_in(spec.report_to, spec.output_dir)
    tokenizer, train, evaluation = load_data(data_args)
    # 8 sequences x 128 tokens = 1,024 tokens per optimizer step by default
    data = {"train": train, "eval": evaluation, "vocab": len(tokenizer), "logit_batch": probe_batch(evaluation, spec.logit_blocks)}
    with tempfile.TemporaryDirectory() as scratch:
        for preset, method, lr, seed in todo:
            row = train_run(spec, preset, method, lr, seed, data, scratch)
            path = run_path(spec, preset, method, lr, seed)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json(path, {"settings": run_settings(spec, data_args, method), "run": row})
            clipped = f", clipped {row['clipped_fraction']:.0%}" if math.isfinite(row["clipped_fraction"]) else ""
            print(f"{preset:>12} {method:>13} lr {lr:<7g} seed {seed}: eval loss {row['initial_eval_loss']:.3f} -> "
                  f"{row['final_eval_loss']:.4f}{'  DIVERGED' if row['diverged'] else ''}, max logits attention "
                  f"{row['max_attention_logit']:.3g} output {row['max_output_logit']:.3g}{clipped} "
                  f"({row['train_seconds']:.1f} s train, {row['eval_seconds']:.1f} s eval)", flush=True)


def read_runs(spec: SensitivityArguments) -> list[dict[str, Any]]:
    """The run files of the grid that exist, in grid order."""
    paths = [run_path(spec, *key) for key in grid(spec)]
    return [read_run(path) for path in paths if os.path.exists(path)]



def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the runs of the grid not yet on disk (unless ``--replot``); write the tables and figures from the run files."""
    spec, data_args = HfArgumentParser((SensitivityArguments, DataArguments)).parse_args_into_dataclasses(args=argv)
    os.makedirs(spec.output_dir, exist_ok=True)
    if not spec.replot:
        train_all(spec, data_args)
    return report(read_runs(spec), spec, sum(1 for _ in grid(spec)))


if __name__ == "__main__":
    main()
