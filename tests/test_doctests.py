"""Every example the docs show runs, and prints what they show: the docstring examples of ``hf_ghosts`` and the
``>>>`` blocks of README.md and docs/*.md (the math API, the probe), run by :mod:`doctest`.

A docstring that says "Example" shows it as a ``>>>`` session (no prose examples: those cannot fail); a markdown
block is run when the line before its fence is ``<!-- doctest: tests/test_doctests.py -->``. Run one module's
examples alone with ``python -m pytest --doctest-modules hf_ghosts/radii/step.py``.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_ghosts"
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- doctest: tests/test_doctests.py -->"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

pytestmark = pytest.mark.usefixtures("single_thread")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def modules_with_examples() -> list[str]:
    """The ``hf_ghosts`` modules whose source holds a ``>>>`` line (found by reading, so none is left out)."""
    return sorted(module_name(path) for path in PACKAGE.rglob("*.py") if re.search(r"^\s*>>> ", path.read_text(), re.M))


def docstring_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in modules_with_examples():
        module = importlib.import_module(name)
        found += [test for test in finder.find(module, name) if test.examples and test.name.startswith(name)]
    return sorted(found, key=lambda test: test.name)


def markdown_examples() -> list[doctest.DocTest]:
    parser, found = doctest.DocTestParser(), []
    for path in MARKDOWN:
        blocks = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", path.read_text(), flags=re.DOTALL)
        for index, block in enumerate(blocks):
            name = f"{path.relative_to(ROOT).as_posix()}" + (f"[{index}]" if index else "")
            found.append(parser.get_doctest(block, {}, name, str(path), 0))
    return found


DOCSTRINGS = docstring_examples()
BLOCKS = markdown_examples()


def run(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=True)
    assert runner.failures == 0, "".join(report)
    assert runner.tries == len(test.examples) > 0


@pytest.mark.parametrize("test", [pytest.param(t, id=t.name) for t in DOCSTRINGS])
def test_docstring_example(test: doctest.DocTest) -> None:
    run(test)


@pytest.mark.parametrize("test", [pytest.param(t, id=t.name) for t in BLOCKS])
def test_markdown_example(test: doctest.DocTest) -> None:
    run(test)


def test_every_documented_example_is_run() -> None:
    """Each docstring that says "Example" carries ``>>>`` lines after it, and the markdown has its doctest blocks."""
    prose, sessions = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node) or ""
                sessions += ">>> " in text
                for match in re.finditer(r"\bExamples?\b", text):
                    if ">>> " not in text[match.end():]:
                        prose.append(f"{module_name(path)}.{getattr(node, 'name', '')}")
    assert prose == [], "examples written as prose: show them as a >>> session"
    assert len(DOCSTRINGS) == sessions >= 20, "a docstring's >>> session that doctest does not find (and so never runs)"
    assert [test.name for test in BLOCKS] == ["docs/math.md", "docs/probe.md"]


def test_a_wrong_output_fails() -> None:
    """The runner compares what an example prints (a changed digit is a failure, not a pass)."""
    parser = doctest.DocTestParser()
    right = parser.get_doctest(">>> import torch\n>>> torch.tensor(0.25)\ntensor(0.2500)\n", {}, "right", None, 0)
    wrong = parser.get_doctest(">>> import torch\n>>> torch.tensor(0.25)\ntensor(0.2501)\n", {}, "wrong", None, 0)
    run(right)
    with pytest.raises(AssertionError, match="Expected"):
        run(wrong)
