"""The ``hf-ghosts`` command (also ``python -m hf_ghosts``): diagnose a checkpoint, plot a run.

    hf-ghosts diagnose outputs/run/checkpoint-300                 # the next AdamW step: r, radii, safe LR, fragile tokens
    hf-ghosts diagnose outputs/run/checkpoint-300 --train_file data.txt --batches 4 --radii output,attention,ffn
    hf-ghosts diagnose outputs/run --all                          # r and the safe LR over every checkpoint-*
    hf-ghosts plot outputs/run                                    # ghosts.png from trainer_state.json

Bad input (not a checkpoint, no data, a radius the model cannot give, ...) exits with status 2 and a
message that names the problem and the fix; so does a missing ``cli`` extra (matplotlib, datasets).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hf_ghosts._optional import MissingExtraError
from hf_ghosts.cli.data import DEFAULT_BATCHES
from hf_ghosts.cli.errors import CliError
from hf_ghosts.settings import ESTIMATORS, SETTINGS, RhoSettings

__all__ = ["CliError", "build_parser", "main"]


def _radii(value: str) -> tuple[str, ...]:
    """``--radii output,attention`` -> ``("output", "attention")``, checked as ``RadiusProbe`` checks ``radii``."""
    try:
        names = RhoSettings.of("hf-ghosts diagnose", radii=value).radii
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected {SETTINGS['radii'].allowed}, comma-separated (e.g. output,attention)"
        ) from None
    return names


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``, or an error naming the bound."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r}: expected an integer >= {minimum}")
        return number

    return parse


_positive_int = _integer_at_least(1)
_count = _integer_at_least(0)


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a finite number > 0")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-ghosts`` argument parser (subcommands ``diagnose`` and ``plot``)."""
    parser = argparse.ArgumentParser(
        prog="hf-ghosts",
        description="Ghosts of Softmax diagnostics: the convergence radius of a checkpoint's next step, and a run's r.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{diagnose,plot}")

    diagnose = commands.add_parser(
        "diagnose",
        help="measure r = |u| / rho of the update the saved optimizer would take next (nothing is applied)",
        description="Load a Trainer checkpoint (model, tokenizer, optimizer.pt, scheduler.pt, trainer_state.json), "
        "compute the update the saved AdamW would propose next on N batches without applying it, and measure every "
        "radius along it. Writes diagnosis.json, diagnosis.md and rho_attn_heads.png.",
    )
    diagnose.add_argument("checkpoint", metavar="CHECKPOINT",
                          help="a checkpoint-* directory (or, with --all, the run directory; or a hub model name)")
    data = diagnose.add_argument_group("data (default: the pydoc corpus shipped with Python, as the recipes use)")
    data.add_argument("--train_file", help="a local .txt, .json, .jsonl or .csv file of text")
    data.add_argument("--dataset_name", help="a `datasets` name (hub or local script), e.g. wikitext")
    data.add_argument("--dataset_config", help="its configuration, e.g. wikitext-2-raw-v1")
    data.add_argument("--dataset_split", default="train", help="its split (default: train)")
    data.add_argument("--text_column", default="text", help="the column holding the text (default: text)")
    data.add_argument("--block_size", type=_positive_int, default=None,
                      help="tokens per sequence (default: 128, or the model's maximum if smaller)")
    data.add_argument("--batch_size", type=_positive_int, default=None,
                      help="sequences per batch (default: the checkpoint's per_device_train_batch_size x "
                      "gradient_accumulation_steps, else 8)")
    data.add_argument("--batches", type=_positive_int, default=DEFAULT_BATCHES,
                      help="batches to measure, each one candidate next step; the verdict and the safe learning rate "
                      f"come from the worst (default: {DEFAULT_BATCHES})")
    step = diagnose.add_argument_group("the step")
    step.add_argument("--learning_rate", type=_positive_float, default=None,
                      help="learning rate of the step (default: the one the saved scheduler set for the next step; "
                      "where that is 0, the update is measured at the last non-zero rate); required without optimizer "
                      "state")
    step.add_argument("--max_grad_norm", type=float, default=None,
                      help="gradient clipping before the step (default: the checkpoint's training_args.bin, else 1.0; "
                      "0 disables)")
    step.add_argument("--ignore_optimizer", action="store_true",
                      help="diagnose along the gradient with SGD at --learning_rate even if optimizer.pt exists")
    step.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the checkpoint's)")
    step.add_argument("--trust_checkpoint", action="store_true",
                      help="unpickle training_args.bin whatever it holds (a pickle can run code: only for checkpoints "
                      "you trust); by default it is read with torch.load(weights_only=True) and an allow-list of "
                      "TrainingArguments types")
    measure = diagnose.add_argument_group("the measurement")
    measure.add_argument("--radii", type=_radii, default=("output", "attention"),
                         help="comma-separated radii: output, attention, ffn (default: output,attention)")
    measure.add_argument("--estimator", choices=ESTIMATORS, default="jvp",
                         help="jvp (forward-mode AD, exact; default) or fd (central differences)")
    measure.add_argument("--r_target", type=_positive_float, default=1.0,
                         help="the target r of the safe learning rate (default: 1)")
    measure.add_argument("--top_tokens", type=_count, default=10, help="fragile tokens to list (default: 10)")
    measure.add_argument("--seed", type=int, default=0, help="seed for dropout in the gradient's forward (default: 0)")
    measure.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    output = diagnose.add_argument_group("output")
    output.add_argument("--output_dir", default=None,
                        help="where the report goes (default: CHECKPOINT/ghosts_diagnosis, for a hub name "
                        "./ghosts_diagnosis)")
    output.add_argument("--all", action="store_true",
                        help="CHECKPOINT is a run directory: diagnose every checkpoint-* in it, tabulate r and the safe "
                        "learning rate, and plot them")

    plot = commands.add_parser(
        "plot",
        help="plot r and the radii of a RhoTrainer / RhoCallback run from its trainer_state.json",
        description="Draw r, r_applied and the radii against the step from the ghosts/* keys of trainer_state.json "
        "(in RUN_DIR or its newest checkpoint-*).",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a Trainer output_dir (or one checkpoint-* directory)")
    plot.add_argument("--output", default=None, help="the PNG to write (default: RUN_DIR/ghosts.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-ghosts``; returns the exit status (0, or 2 for bad input with a message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "diagnose":
            from hf_ghosts.cli.diagnose import run_diagnose

            run_diagnose(args)
        else:
            from hf_ghosts.cli.plot import run_plot

            run_plot(args)
    except (CliError, MissingExtraError) as error:  # bad input, or the cli extra not installed
        print(f"hf-ghosts {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
