"""Pythia-style causal-LM training with every step kept inside the convergence radius (the README's quick start).

With no arguments it runs offline: a Pythia-shaped GPT-NeoX (``--preset``, default ``pythia-tiny``;
``pythia-14m`` ... ``pythia-12b`` have the real shapes), a byte-level BPE tokenizer trained on the
spot, and the English text that ships with Python (``pydoc_data.topics``), split by document into
train and validation. ``RhoTrainer`` limits the AdamW update on the output and attention radii,
clipping it to ``r = |u| / rho <= 2`` (the default ``rho_target``, in units of the bound ``pi / max Delta``,
which sits 2.4-3.5x below the true radius of the widest tokens), and WATCHES the FFN radius in both forms (``--rho_watch_radii ffn
ffn_activation``: the paper's kink proxy and Appendix B's activation radius, infinite for Pythia's exact
GELU): they are measured, logged and counted as "would bind", never applied. Default probing: central
differences in fp32 (``rho_estimator="auto"``; with ``--bf16`` on a GPU a bf16 JVP instead), at least every
16 steps, and afresh whenever a step's ``r`` estimated
with the last radius exceeds half the target or ``|u|`` doubled since the last probe.

    python recipes/pythia_finetune.py                                   # ~2 min on 2 idle CPU cores
    python recipes/pythia_finetune.py --preset pythia-14m --max_steps 600
    python recipes/pythia_finetune.py --model_name_or_path EleutherAI/pythia-160m \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --learning_rate 1e-5 --block_size 512
    accelerate launch --multi_gpu --num_processes 2 recipes/pythia_finetune.py --use_cpu   # 2 CPU processes, gloo
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 8 \\
        recipes/pythia_finetune.py --model_name_or_path EleutherAI/pythia-410m --bf16 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --block_size 1024 --per_device_train_batch_size 4

    python recipes/pythia_finetune.py --rho_mode monitor                # plain AdamW, measured (bit-identical)
    python recipes/pythia_finetune.py --rho_mode set                    # set mode, r*(t) follows the cosine
    python recipes/pythia_finetune.py --rho_mode set --lr_scheduler_type constant
    python recipes/pythia_finetune.py --rho_mode set --rho_radii output attention ffn   # the paper's Table 2

Batch arithmetic of the default: 8 sequences x 128 tokens = 1,024 tokens per step; 300 steps =
307k tokens, ~2.6 epochs of the 118k-token training split. Cost: a probed step also runs the
probe (two fp32 forwards with eager attention), about 1.8 plain steps on CPU (docs/cost.md,
"Overhead on CPU"). ``--rho_estimator jvp --rho_every 1`` measures every step exactly, as in the paper.
Every ``--<field>`` of ``TrainingArguments`` and ``RhoTrainingArguments`` works (``--rho_mode set``,
``--rho_radii output attention``, ``--rho_every 4``, ``--report_to none``, ...). A radius named in
``--rho_radii`` leaves the default watch list (so ``--rho_radii output attention ffn`` limits on the FFN
proxy and still watches ``ffn_activation``). Without ``WANDB_API_KEY`` W&B logs offline under the
output directory and prints how to upload the run (``wandb sync <dir>``).

The numbers and figures of these runs are in docs/results.md ("Main job").

Writes to ``--output_dir`` (default ``outputs/pythia_finetune``): the model and tokenizer
(``save_pretrained``), ``radii.png`` (r and the radii over training, log scale, r = 1 drawn),
``rho_attn_heads.png`` (per-head radii, minimum since the previous evaluation, at the last one),
``ghosts_steps.jsonl`` (the controller's record of every step), ``trainer_state.json`` (the log
history), ``bottleneck_by_thirds.md`` / ``.csv`` and ``summary.json`` (also printed: final eval
loss, perplexity and token accuracy, fraction of clipped steps, r, and which radius bound the
step in each third of the run, the paper's Table 2, with "would bind" columns for the watched radii).
W&B gets the ``train/ghosts/*`` scalars (watched radii and bottleneck counts included) and, at each
evaluation, ``eval/ghosts/rho_attn_heads`` (the heatmap), ``eval/ghosts/rho_attn_heads_table`` (a
``wandb.Table`` of per-head minima at every evaluation so far: heads over time),
``eval/ghosts/bottleneck/<radius>`` and ``eval/ghosts/would_bind/<radius>`` (since the previous evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from common import (
    RADIUS_FIELDS,
    RADIUS_NAMES,
    DataArguments,
    ModelArguments,
    argmax_logits,
    eval_summary,
    finish_wandb,
    load_blocks,
    load_model,
    load_text_splits,
    load_tokenizer,
    plot_training_radii,
    token_accuracy,
    wandb_offline_unless_logged_in,
    write_json,
    write_table,
)
from presets import count_parameters
from transformers import (
    HfArgumentParser,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_ghosts import RhoController, RhoTrainer, RhoTrainingArguments
from hf_ghosts.plots import head_radii_heatmap

_PARENT_FIELDS = {f.name: f for f in dataclasses.fields(RhoTrainingArguments)}


def _help(name: str) -> Any:
    """The metadata (help text, choices) of ``RhoTrainingArguments.<name>``, for a field given a new default."""
    return _PARENT_FIELDS[name].metadata


@dataclass
class FinetuneArguments(RhoTrainingArguments):
    """``RhoTrainingArguments`` with this recipe's defaults.

    Differing from ``TrainingArguments``: ``output_dir="outputs/pythia_finetune"``, ``max_steps=300``,
    ``learning_rate=1e-3``, ``warmup_steps=20``, ``lr_scheduler_type="cosine_with_min_lr"`` with
    ``lr_scheduler_kwargs={"min_lr_rate": 0.1}`` (Pythia's cosine decay to 10%), ``logging_steps=10``,
    ``eval_strategy="steps"``, ``eval_steps=100``, ``eval_on_start=True``, ``per_device_eval_batch_size=16``,
    ``save_strategy="no"`` (the final model is saved), ``report_to=["wandb"]``, ``seed=0``. Differing from
    ``RhoTrainingArguments``: ``rho_watch_radii=["ffn", "ffn_activation"]`` (the FFN kink proxy and Appendix B's
    activation radius, measured and reported, never limiting; ``rho_radii`` keeps ``["output", "attention"]``).
    """

    output_dir: str | None = field(default="outputs/pythia_finetune", metadata=_help("output_dir"))
    max_steps: int = field(default=300, metadata=_help("max_steps"))
    learning_rate: float = field(default=1e-3, metadata=_help("learning_rate"))
    warmup_steps: float = field(default=20, metadata=_help("warmup_steps"))
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata=_help("lr_scheduler_type"))
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1}, metadata=_help("lr_scheduler_kwargs"))
    logging_steps: float = field(default=10, metadata=_help("logging_steps"))
    eval_strategy: str = field(default="steps", metadata=_help("eval_strategy"))
    eval_steps: float | None = field(default=100, metadata=_help("eval_steps"))
    eval_on_start: bool = field(default=True, metadata=_help("eval_on_start"))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("per_device_eval_batch_size"))
    save_strategy: str = field(default="no", metadata=_help("save_strategy"))
    # The parent's annotation, in its order: HfArgumentParser reads `None | str | ...` as one string option.
    report_to: None | str | list[str] = field(default_factory=lambda: ["wandb"], metadata=_help("report_to"))  # noqa: RUF036
    seed: int = field(default=0, metadata=_help("seed"))
    rho_watch_radii: list[str] = field(default_factory=lambda: ["ffn", "ffn_activation"], metadata=_help("rho_watch_radii"))

    def __post_init__(self) -> None:
        # A radius moved into --rho_radii (e.g. the paper's FFN-limited set mode) leaves the default watch list.
        if self.rho_watch_radii == ["ffn", "ffn_activation"]:
            limiting = set(self.rho_radii if not isinstance(self.rho_radii, str) else self.rho_radii.split(","))
            self.rho_watch_radii = [name for name in self.rho_watch_radii if name not in limiting]
        super().__post_init__()


class GhostsDashboard(TrainerCallback):
    """Keeps the controller's record of every step; at each evaluation shows the radii (main process only).

    At ``on_evaluate`` it draws the per-head attention radii (minimum over the steps since the
    previous evaluation) as a ``layers x heads`` heatmap, saves it to ``rho_attn_heads.png`` and,
    when W&B is active, logs it as ``eval/ghosts/rho_attn_heads`` together with
    ``eval/ghosts/bottleneck/<radius>`` (probed steps each limiting radius bound since then),
    ``eval/ghosts/would_bind/<radius>`` (probed steps each watched radius was below the limiting ones) and
    ``eval/ghosts/rho_attn_heads_table``, a ``wandb.Table`` (``step, layer, head, rho_attn``) holding the
    per-head minima of every evaluation so far, for a heads-over-time panel.
    """

    def __init__(self, controller: RhoController, output_dir: str) -> None:
        self.controller = controller
        self.output_dir = output_dir
        self.records: list[dict[str, Any]] = []
        self._counts: Counter[str] = Counter()
        self._would: Counter[str] = Counter()
        self._heads: Any = None
        self.head_rows: list[list[float]] = []  # [step, layer, head, rho_attn] of every evaluation so far
        self._seen = 0
        self._first = 1

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        record = self.controller.last
        if record is None or record.step == self._seen:
            return
        self._seen = record.step
        heads = record.rho_attn_heads
        if heads is not None:
            heads = np.asarray(heads, dtype=float)
            self._heads = heads if self._heads is None else np.minimum(self._heads, heads)
        if record.bottleneck is not None:
            self._counts[record.bottleneck] += 1
        if record.would_bind is not None:
            self._would[record.would_bind] += 1
        self.records.append({**record.scalars(), "step": state.global_step})

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self._counts:  # nothing probed since the last evaluation
            return
        controller = self.controller
        logged: dict[str, Any] = {f"eval/ghosts/bottleneck/{name}": self._counts[name] for name in (*controller.radii, "none")}
        logged.update({f"eval/ghosts/would_bind/{name}": self._would[name] for name in controller.watch_radii})
        heatmap = None
        if self._heads is not None:
            heatmap = head_radii_heatmap(self._heads, os.path.join(self.output_dir, "rho_attn_heads.png"),
                                         f"rho_attn per head, min over steps {self._first}-{state.global_step}")
            self.head_rows += [[state.global_step, layer, head, float(value)]
                               for (layer, head), value in np.ndenumerate(self._heads)]
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                if heatmap is not None:
                    logged["eval/ghosts/rho_attn_heads"] = wandb.Image(heatmap)
                    logged["eval/ghosts/rho_attn_heads_table"] = wandb.Table(
                        columns=["step", "layer", "head", "rho_attn"], data=[list(row) for row in self.head_rows])
                wandb.log({**logged, "train/global_step": state.global_step})
        self._counts.clear()
        self._would.clear()
        self._heads = None
        self._first = state.global_step + 1


def bottleneck_by_thirds(
    records: list[dict[str, Any]], total_steps: int, watched: tuple[str, ...] | list[str] = ()
) -> list[dict[str, Any]]:
    """Counts of the binding radius over probed steps, in thirds of ``total_steps`` (the paper's Table 2).

    One column per radius (the limiting ones bind: ``bottleneck``), ``"would bind: <radius>"`` for each
    ``watched`` radius (probed steps on which it was below every limiting radius: it would have bound),
    ``probed``, ``binding`` (the limiting radius that bound most often) and ``would bind`` (the watched one
    that would have bound most often, ``-`` if none).
    """
    rows = []
    for third in range(3):
        first, last = third * total_steps // 3 + 1, (third + 1) * total_steps // 3
        window = [rec for rec in records if "bottleneck" in rec and first <= rec["step"] <= last]
        counts = Counter(rec["bottleneck"] for rec in window)
        would = Counter(rec["would_bind"] for rec in window if rec.get("would_bind"))
        row = {"third": f"steps {first}-{last}", **{name: counts.get(name, 0) for name in RADIUS_NAMES if name not in watched}}
        row.update({f"would bind: {name}": would.get(name, 0) for name in watched})
        row.update({"probed": len(window), "binding": max(counts, key=counts.get) if counts else "none"})
        if watched:
            row["would bind"] = max(would, key=would.get) if would else "-"
        rows.append(row)
    return rows


def _number(value: float) -> float | str:
    """``value``, or ``"inf"`` / ``"nan"`` spelled out (strict JSON would write ``null``)."""
    return value if math.isfinite(value) else str(value)


def summarize(
    trainer: RhoTrainer, records: list[dict[str, Any]], final: dict[str, float], seconds: float, block_size: int, name: str
) -> dict[str, Any]:
    """The run in numbers: evaluation before and after, clipping, r, bottlenecks (overall and by thirds)."""
    history = trainer.state.log_history
    start = next((h for h in history if "eval_loss" in h and h["step"] == 0), None)
    probed = [rec for rec in records if rec.get("probed")]
    proposed = np.array([rec["r"] for rec in records if "r" in rec], dtype=float)
    total = trainer.state.global_step
    return {
        "model": name,
        "parameters": count_parameters(trainer.model),
        "steps": total,
        "tokens_per_step": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size * block_size,
        "rho_mode": trainer.args.rho_mode,
        "rho_target": trainer.rho_controller.r_target,
        "rho_radii": list(trainer.args.rho_radii),
        "rho_watch_radii": list(trainer.args.rho_watch_radii),
        "lr_scheduler_type": str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type)),
        "eval_start": eval_summary(start) if start else None,
        "eval_final": final,
        "probed_steps": len(probed),
        "probed_fraction": len(probed) / total if total else math.nan,
        "clipped_fraction": float(np.mean([rec["clipped"] for rec in probed])) if probed else math.nan,
        "r_proposed": {"median": float(np.median(proposed)), "max": float(proposed.max())} if proposed.size else None,
        "r_applied_max": max((rec["r_applied"] for rec in records if "r_applied" in rec), default=math.nan),
        "bottleneck_counts": dict(Counter(rec["bottleneck"] for rec in probed if "bottleneck" in rec)),
        "would_bind_counts": dict(Counter(rec["would_bind"] for rec in probed if rec.get("would_bind"))),
        "would_clip_fraction": float(np.mean([rec.get("would_clip", False) for rec in probed])) if probed else math.nan,
        "watched_min": {name: _number(min((rec[RADIUS_FIELDS[name]] for rec in probed if RADIUS_FIELDS[name] in rec),
                                          default=math.nan)) for name in trainer.args.rho_watch_radii},
        "bottleneck_by_thirds": bottleneck_by_thirds(probed, total, trainer.args.rho_watch_radii),
        "train_seconds": seconds,
    }


def print_summary(summary: dict[str, Any], thirds_markdown: str) -> None:
    final, start = summary["eval_final"], summary["eval_start"]
    before = f" (step 0: loss {start['loss']:.3f}, accuracy {start['accuracy']:.3f})" if start else ""
    print(f"\n== {summary['model']} ({summary['parameters']} parameters), {summary['steps']} steps, "
          f"{summary['train_seconds']:.0f} s, rho_mode={summary['rho_mode']} limiting on {summary['rho_radii']}, "
          f"watching {summary['rho_watch_radii']}")
    print(f"final eval: loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
          f"token accuracy {final['accuracy']:.4f}{before}")
    if summary["r_proposed"]:
        print(f"clipped: {summary['clipped_fraction']:.1%} of {summary['probed_steps']} probed steps "
              f"({summary['probed_fraction']:.1%} of the steps; proposed r > rho_target on "
              f"{summary['would_clip_fraction']:.1%}); proposed r median "
              f"{summary['r_proposed']['median']:.3g}, max {summary['r_proposed']['max']:.3g}; applied r max "
              f"{summary['r_applied_max']:.3g}")
    print(f"bottleneck counts: {summary['bottleneck_counts']}; watched radii would have bound: "
          f"{summary['would_bind_counts']} (least values {summary['watched_min']}); by thirds of the run:\n{thirds_markdown}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe with command-line ``argv`` (default ``sys.argv[1:]``); return the summary (main process)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    wandb_offline_unless_logged_in(args.report_to, args.output_dir)
    set_seed(args.seed)

    splits = load_text_splits(data_args)
    tokenizer = load_tokenizer(model_args, data_args, splits["train"][data_args.text_column])
    with args.main_process_first(desc="tokenize and group"):
        train, evaluation = load_blocks(data_args, tokenizer, splits)
    model = load_model(model_args, len(tokenizer), args.seed)

    trainer = RhoTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
    )
    dashboard = GhostsDashboard(trainer.rho_controller, args.output_dir)
    trainer.add_callback(dashboard)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    seconds = time.perf_counter() - started
    done = [h for h in trainer.state.log_history if "eval_loss" in h and h["step"] == trainer.state.global_step]
    metrics = done[-1] if done else trainer.evaluate()
    trainer.save_model()

    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        summary = summarize(trainer, dashboard.records, eval_summary(metrics), seconds, data_args.block_size,
                            model_args.model_name_or_path or model_args.preset)
        summary["figures"] = {
            "radii": plot_training_radii(dashboard.records, os.path.join(args.output_dir, "radii.png"),
                                         f"{summary['model']}: rho_mode={args.rho_mode}, r* = {trainer.rho_controller.r_target:g}"),
            "rho_attn_heads": os.path.join(args.output_dir, "rho_attn_heads.png"),
        }
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))  # the full log history
        with open(os.path.join(args.output_dir, "ghosts_steps.jsonl"), "w") as handle:
            handle.writelines(json.dumps(rec) + "\n" for rec in dashboard.records)
        thirds = write_table(summary["bottleneck_by_thirds"], os.path.join(args.output_dir, "bottleneck_by_thirds"))
        summary["wandb_dir"] = finish_wandb() if "wandb" in (args.report_to or []) else None
        write_json(os.path.join(args.output_dir, "summary.json"), summary)
        print_summary(summary, thirds)
        print(f"wrote {args.output_dir}/: summary.json, radii.png, rho_attn_heads.png, bottleneck_by_thirds.md/.csv, "
              "ghosts_steps.jsonl, trainer_state.json, model and tokenizer")
    return summary


if __name__ == "__main__":
    main()
