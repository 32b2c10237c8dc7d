"""The README's swap and the TRL and PEFT examples of docs/usage.md run as written, on a tiny Llama (a tiny
GPT-NeoX for the swap), a word-level tokenizer and 8 rows of text; the links of the README and docs/*.md lead
somewhere.

The blocks are read from the files (those after a ``<!-- tested: tests/test_readme_examples.py -->`` line) and
executed with ``model``, ``tokenizer`` and ``dataset`` (``train`` for the swap) bound; the only change is a short CPU
run (two steps, no reporting) spliced in after ``output_dir=...``. The swap is a diff: its ``+`` and unchanged lines
are the program.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.helpers import text_dataset, tiny_causal_lm, tiny_tokenizer, token_dataset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^()\s]+)\)")  # [text](target) and ![alt](target)
MARKER = "<!-- tested: tests/test_readme_examples.py -->"
SHORT_CPU_RUN = 'use_cpu=True, max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", logging_steps=1, '

pytestmark = pytest.mark.usefixtures("single_thread")


def usage_blocks() -> list[str]:
    blocks = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", USAGE.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2, "docs/usage.md's TRL and PEFT examples"
    return blocks


def swap_program() -> str:
    """The README's swap: the lines of its diff that remain after it (``+`` and unchanged), without the marks."""
    (diff,) = re.findall(re.escape(MARKER) + r"\n```diff\n(.*?)```", README.read_text(), flags=re.DOTALL)
    lines = diff.splitlines()
    removed, added = [x for x in lines if x.startswith("-")], [x for x in lines if x.startswith("+")]
    assert removed == ["-from transformers import Trainer"] and len(added) == 1, "a one-line swap"
    return "\n".join(line[1:] for line in lines if not line.startswith("-"))


def short_run(block: str) -> str:
    spliced, count = re.subn(r'(output_dir="[\w-]+",\s*)', lambda m: m.group(1) + SHORT_CPU_RUN, block)
    assert count == 1, "one output_dir= to splice the short run after"
    return spliced


@pytest.mark.parametrize("index", [0, 1], ids=["sft", "lora"])
def test_usage_example_runs(index: int, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_causal_lm("llama"), "tokenizer": tiny_tokenizer(), "dataset": text_dataset()}
    exec(compile(short_run(usage_blocks()[index]), f"docs/usage.md block {index}", "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer).__name__ == "RhoSFTTrainer" and type(trainer.args).__name__ == "RhoSFTConfig"
    logged = [h for h in trainer.state.log_history if "ghosts/rho" in h]
    assert len(logged) == 2 and all(math.isfinite(h["ghosts/rho"]) for h in logged)
    if index == 1:
        assert type(trainer.model).__name__.startswith("Peft") and trainer.rho_controller.probe._head is not None


def test_the_readme_swap_runs_a_rho_trainer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The swapped program trains a ``RhoTrainer`` with upgraded arguments (clip at the default target) and logs the
    radius; the same program without the swap trains a plain ``Trainer``."""
    monkeypatch.chdir(tmp_path)
    program = short_run(swap_program())
    namespace = {"model": tiny_causal_lm("gpt_neox"), "train": token_dataset()}
    exec(compile(program, "README swap", "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer).__name__ == "RhoTrainer" and type(trainer.args).__name__ == "RhoTrainingArguments"
    assert trainer.args.learning_rate == 3e-4 and trainer.rho_controller.r_target == 2.0
    logged = [h for h in trainer.state.log_history if "ghosts/rho" in h]
    assert len(logged) == 2 and all(math.isfinite(h["ghosts/rho"]) for h in logged)
    unswapped = {"model": tiny_causal_lm("gpt_neox"), "train": token_dataset()}
    exec(compile(program.replace("from hf_ghosts import RhoTrainer as Trainer", "from transformers import Trainer"),
                 "README without the swap", "exec"), unswapped)
    assert type(unswapped["trainer"]).__name__ == "Trainer"


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(path: Path) -> str:
    """The file without its fenced code blocks (a ``](`` in code is no link)."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_links_and_figures_of_the_readme_and_docs_resolve() -> None:
    """Every relative link of README.md and docs/*.md names an existing file, and its ``#anchor`` a heading there;
    every figure in docs/figures/ is shown somewhere (the Results and Cost pages moved out of the README)."""
    anchors = {path.resolve(): {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose(path), flags=re.MULTILINE)}
               for path in DOCS}
    shown, broken = set(), []
    for path in DOCS:
        for target in LINK.findall(prose(path)):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path.resolve()
            if not resolved.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and anchor not in anchors.get(resolved, set()):
                broken.append(f"{path.name}: {target} (no such heading)")
            shown.add(resolved)
    assert broken == []
    figures = {figure.resolve() for figure in (ROOT / "docs" / "figures").glob("*.png")}
    assert figures and figures - shown == set()
    assert github_anchor("The price of safety, and the default `r* = 2`") == "the-price-of-safety-and-the-default-r--2"
