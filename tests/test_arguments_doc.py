"""The ``rho_*`` field tables of the README (the key fields) and of docs/arguments.md (every field) are generated from
the fields of :class:`~hf_ghosts.arguments.RhoArgumentsMixin`: their defaults and their ``help``, one source.

Regenerate both tables in place with ``python tests/test_arguments_doc.py``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from hf_ghosts.arguments import RhoArgumentsMixin

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARGUMENTS_PAGE = ROOT / "docs" / "arguments.md"
MARKER = "<!-- generated from the rho_* fields: python tests/test_arguments_doc.py -->"
# The README's table: the fields a first run is most likely to set; docs/arguments.md has them all.
KEY_FIELDS = ("rho_mode", "rho_target", "rho_radii", "rho_watch_radii", "rho_estimator", "rho_every", "rho_radius",
              "rho_granularity")
HEADER = ["| field | default | meaning |", "|---|---|---|"]


def default_of(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def shown_default(value: object) -> str:
    """The default as Python spells it, strings in double quotes (``"clip"``, ``["output", "attention"]``)."""
    return repr(value).replace("'", '"')


def markdown_cell(text: str) -> str:
    """``text`` as one table cell: ``|`` escaped, and ``*``, ``~``, ``<`` too (emphasis, strike-through, HTML tags)."""
    return re.sub(r"([|*~<])", r"\\\1", " ".join(text.split()))


def rho_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RhoArgumentsMixin) if f.name.startswith("rho_")]


def table(names: tuple[str, ...] | None = None) -> str:
    """The fields ``names`` (all, in declaration order, for ``None``) as a markdown table: name, default, help."""
    by_name = {f.name: f for f in rho_fields()}
    chosen = [by_name[name] for name in names] if names is not None else list(by_name.values())
    rows = [f"| `{f.name}` | `{shown_default(default_of(f))}` | {markdown_cell(f.metadata['help'])} |" for f in chosen]
    return "\n".join([*HEADER, *rows])


def generated_table(path: Path) -> str:
    """The table that follows :data:`MARKER` in ``path`` (one marker per file)."""
    text = path.read_text()
    assert text.count(MARKER) == 1, f"{path.name}: expected one line {MARKER!r}"
    lines = text.split(MARKER, 1)[1].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(line)
    return "\n".join(rows)


def regenerate(path: Path, names: tuple[str, ...] | None) -> None:
    text = path.read_text()
    path.write_text(text.replace(generated_table(path), table(names), 1))


def test_the_readme_shows_the_key_fields_as_generated() -> None:
    assert generated_table(README) == table(KEY_FIELDS), "regenerate with `python tests/test_arguments_doc.py`"


def test_docs_arguments_shows_every_field_as_generated() -> None:
    assert generated_table(ARGUMENTS_PAGE) == table(), "regenerate with `python tests/test_arguments_doc.py`"
    documented = re.findall(r"^\| `(rho_\w+)` \|", generated_table(ARGUMENTS_PAGE), flags=re.MULTILINE)
    assert documented == [f.name for f in rho_fields()] and len(documented) == 20


def test_every_field_has_help_and_the_table_renders_it() -> None:
    """Each field's help is a sentence of its own, and the rendering keeps it word for word (escapes aside)."""
    for f in rho_fields():
        assert f.metadata.get("help", "").strip(), f.name
    row = table(("rho_mode",)).splitlines()[-1]
    assert row == ("| `rho_mode` | `\"clip\"` | 'clip': scale the update by min(1, rho_target\\*rho/\\|u\\|); 'set': "
                   "make the step length exactly rho_target\\*rho (direction from the optimizer); 'monitor': measure "
                   "and log only. |")
    assert shown_default(["output", "attention"]) == '["output", "attention"]' and shown_default(None) == "None"


if __name__ == "__main__":
    regenerate(README, KEY_FIELDS)
    regenerate(ARGUMENTS_PAGE, None)
    print(f"regenerated the rho_* tables of {README.name} and {ARGUMENTS_PAGE.relative_to(ROOT)}", file=sys.stderr)
