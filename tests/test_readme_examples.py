"""The README's TRL and PEFT examples run as written, on a tiny Llama, a word-level tokenizer and 8 rows of text.

The blocks are read from the README (those after a ``<!-- tested: tests/test_readme_examples.py -->`` line) and
executed with ``model``, ``tokenizer`` and ``dataset`` bound; the only change is a short CPU run (two steps, no
reporting) spliced in after ``output_dir=...``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import text_dataset, tiny_causal_lm, tiny_tokenizer

pytest.importorskip("trl")
pytest.importorskip("peft")

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested: tests/test_readme_examples.py -->"
SHORT_CPU_RUN = 'use_cpu=True, max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", logging_steps=1, '

pytestmark = pytest.mark.usefixtures("single_thread")


def readme_blocks() -> list[str]:
    text = README.read_text()
    blocks = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2, "the README's TRL and PEFT examples"
    return blocks


def short_run(block: str) -> str:
    spliced, count = re.subn(r'(output_dir="[\w-]+",\s*)', lambda m: m.group(1) + SHORT_CPU_RUN, block)
    assert count == 1, "one output_dir= to splice the short run after"
    return spliced


@pytest.mark.parametrize("index", [0, 1], ids=["sft", "lora"])
def test_readme_example_runs(index: int, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_causal_lm("llama"), "tokenizer": tiny_tokenizer(), "dataset": text_dataset()}
    exec(compile(short_run(readme_blocks()[index]), f"README block {index}", "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer).__name__ == "RhoSFTTrainer" and type(trainer.args).__name__ == "RhoSFTConfig"
    logged = [h for h in trainer.state.log_history if "ghosts/rho" in h]
    assert len(logged) == 2 and all(math.isfinite(h["ghosts/rho"]) for h in logged)
    if index == 1:
        assert type(trainer.model).__name__.startswith("Peft") and trainer.rho_controller.probe._head is not None
