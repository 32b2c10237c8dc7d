"""The declared version range: every dependency has a lower bound, and ci/constraints-lowest.txt (the lowest-versions
CI run) pins exactly those bounds, so the range pyproject.toml claims is the range CI installs and tests."""

from __future__ import annotations

import os
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, Requirement]:
    """Every requirement of the package and of its extras (the package's own extras, e.g. ``hf_ghosts[cli]``, skipped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, Requirement] = {}
    for line in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name != canonicalize_name(project["name"]):
            found[name] = requirement
    return found


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def lowest_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "ci" / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_every_dependency_has_a_lower_bound_that_the_lowest_run_pins() -> None:
    requirements = declared()
    unbounded = sorted(name for name, requirement in requirements.items() if lower_bound(requirement) is None)
    assert not unbounded, f"give these a lower bound in pyproject.toml (and pin it in ci/constraints-lowest.txt): {unbounded}"
    pins = lowest_pins()
    assert set(pins) == set(requirements), (sorted(set(pins) ^ set(requirements)))
    wrong = {name: (str(pins[name]), str(lower_bound(r))) for name, r in requirements.items() if pins[name] != lower_bound(r)}
    assert not wrong, f"ci/constraints-lowest.txt differs from pyproject.toml's lower bounds (pinned, declared): {wrong}"


def test_the_lowest_run_installed_the_lower_bounds() -> None:
    """In the lowest-versions CI run (``HF_GHOSTS_VERSIONS=lowest``, set by .ci/run) every declared dependency is
    installed at its lower bound; elsewhere every installed one satisfies the declared range."""
    requirements = declared()
    lowest = os.environ.get("HF_GHOSTS_VERSIONS") == "lowest"
    for name, requirement in requirements.items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = Version(version(name))
        except Exception:  # an extra that is not installed here
            continue
        if lowest:
            assert Version(installed.base_version) == lower_bound(requirement), (name, str(installed))
        else:
            assert requirement.specifier.contains(installed, prereleases=True), (name, str(installed), str(requirement))
