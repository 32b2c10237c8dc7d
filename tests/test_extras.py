"""Dependencies as extras: the training path imports none of them, and each one's absence is an ImportError that names
its extra (``hf_ghosts/_optional.py``). Absence is simulated in a subprocess with ``sys.modules[name] = None``, which
makes ``import name`` raise ``ImportError`` as if the package were not installed."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hf_ghosts._optional import EXTRAS, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = ("wandb", "matplotlib", "datasets", "tokenizers", "evaluate")  # never imported by the training path


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "recipes"), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def distributions(extra: str) -> set[str]:
    """The distributions ``pip install "hf_ghosts[extra]"`` adds, the package's own extras expanded."""
    found = set()
    for line in PROJECT["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
            for inner in requirement.extras:
                found |= distributions(inner)
        else:
            found.add(canonicalize_name(requirement.name))
    return found


def require_calls() -> list[tuple[str, str, str]]:
    """Every ``require("module", extra="name")`` (:func:`hf_ghosts._optional.require`) in the package and the recipes:
    ``(file, module, extra)``."""
    calls = []
    for path in [*ROOT.joinpath("hf_ghosts").rglob("*.py"), *ROOT.joinpath("recipes").glob("*.py")]:
        tree = ast.parse(path.read_text())
        if not any(isinstance(node, ast.ImportFrom) and node.module == "hf_ghosts._optional" for node in ast.walk(tree)):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                extra = next(k.value.value for k in node.keywords if k.arg == "extra")
                calls.append((str(path.relative_to(ROOT)), node.args[0].value, extra))
    return calls


# ------------------------------------------------------------------------------------------ the declared extras
def test_the_extras_are_those_of_pyproject_and_the_core_is_the_training_path() -> None:
    assert set(EXTRAS) == set(PROJECT["optional-dependencies"])
    core = {canonicalize_name(Requirement(line).name) for line in PROJECT["dependencies"]}
    assert core == {"torch", "transformers", "accelerate", "numpy"}
    assert distributions("test") >= distributions("recipes") >= distributions("cli") | distributions("wandb")
    assert "evaluate" not in core | {name for extra in EXTRAS for name in distributions(extra)}


def test_every_require_names_an_extra_that_installs_the_module() -> None:
    calls = require_calls()
    assert {module.split(".")[0] for _, module, _ in calls} == {"wandb", "matplotlib", "datasets", "tokenizers"}
    owners = packages_distributions()
    for path, module, extra in calls:
        wanted = {canonicalize_name(name) for name in owners[module.split(".")[0]]}
        assert wanted & distributions(extra), (path, module, extra, sorted(distributions(extra)))


def test_require_names_the_extra_and_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # an earlier test may have imported it
    for module in ("matplotlib", "matplotlib.pyplot"):
        with pytest.raises(MissingExtraError, match=re.escape('hf_ghosts[cli] needs matplotlib, which is not '
                                                              'installed: pip install "hf_ghosts[cli]"')):
            require(module, extra="cli")
    assert isinstance(MissingExtraError("x"), ImportError)
    with pytest.raises(ValueError, match=r"unknown extra 'plots'"):
        require("json", extra="plots")
    assert require("json", extra="cli") is json


def test_an_installed_package_that_fails_inside_keeps_its_own_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ghosts_fake_package.py").write_text("import ghosts_fake_dependency\n")  # installed; its dependency not
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as caught:
        require("ghosts_fake_package", extra="cli")
    assert not isinstance(caught.value, MissingExtraError) and caught.value.name == "ghosts_fake_dependency"
    monkeypatch.delitem(sys.modules, "ghosts_fake_package", raising=False)


def test_the_readme_install_table_is_the_extras() -> None:
    rows = "\n".join(f"| `{extra}` | {what} |" for extra, what in EXTRAS.items())
    assert rows in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------------------ the training path
TRAIN = """
    import json, sys, tempfile
    for name in {blocked!r}:
        sys.modules[name] = None  # not installed, as far as `import` can tell
    from transformers import Trainer  # what transformers imports by itself (its Trainer imports datasets if it can)
    before = set(sys.modules)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    import hf_ghosts
    from hf_ghosts import RhoTrainer, RhoTrainingArguments

    torch.manual_seed(0)  # GPT-2: tanh-GELU, whose activation radius takes numpy's roots
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    rows = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(0, 64, (8, 8))]
    with tempfile.TemporaryDirectory() as out:
        args = RhoTrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                    rho_watch_radii=["ffn", "ffn_activation"])
        trainer = RhoTrainer(model=model, args=args, train_dataset=rows)
        trainer.train()
    logged = [key for entry in trainer.state.log_history for key in entry if key.startswith("ghosts/")]
    new = sorted(name for name in set(sys.modules) - before if name.split(".")[0] in {optional!r})
    print(json.dumps({{"new": new, "logged": sorted(set(logged))}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [(), ("wandb", "matplotlib", "datasets", "evaluate")], ids=["installed", "absent"])
def test_import_and_a_rho_trainer_run_import_no_extra(blocked: tuple[str, ...]) -> None:
    """``import hf_ghosts`` and a RhoTrainer run with ``report_to=[]`` (FFN radii watched) import none of the extras'
    packages beyond what transformers' own Trainer imports, and train where they are absent (tokenizers cannot be:
    transformers itself requires it)."""
    done = run_python(TRAIN.format(blocked=blocked, optional=OPTIONAL))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["new"] == []
    assert {"ghosts/r", "ghosts/rho_ffn", "ghosts/rho_ffn_activation"} <= set(result["logged"])


# ------------------------------------------------------------------------------------------ each extra's absence
ABSENT = """
    import json, sys, tempfile
    from pathlib import Path
    from transformers import TrainingArguments

    def error_of(blocked, call):
        saved = sys.modules.get(blocked)
        sys.modules[blocked] = None  # not installed, as far as `import` can tell
        try:
            call()
        except ImportError as error:
            return f"{{type(error).__name__}}: {{error}}"
        finally:
            if saved is None:
                del sys.modules[blocked]
            else:
                sys.modules[blocked] = saved
        return "no error"

    def plots():
        import hf_ghosts.plots

    def cli_plot():
        from hf_ghosts.cli import main
        assert main(["plot", tempfile.mkdtemp()]) == 2

    def wandb():
        from hf_ghosts.metrics import define_wandb_metrics
        define_wandb_metrics(TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=["wandb"]))

    def datasets():
        from hf_ghosts.cli.data import pydoc_splits
        pydoc_splits()

    def tokenizers():
        from presets import train_bpe_tokenizer
        train_bpe_tokenizer(["some text"] * 4, vocab_size=300)

    cases = {{"matplotlib": plots, "datasets": datasets, "wandb": wandb, "tokenizers": tokenizers}}
    found = {{name: error_of(name, call) for name, call in cases.items()}}
    found["cli_plot"] = error_of("matplotlib", cli_plot)
    print(json.dumps(found))
"""


@pytest.mark.slow
def test_each_extras_absence_is_an_import_error_naming_it() -> None:
    done = run_python(ABSENT.format())
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"matplotlib": "cli", "datasets": "cli", "wandb": "wandb", "tokenizers": "recipes"}
    for module, extra in expected.items():
        assert found[module] == (f'MissingExtraError: hf_ghosts[{extra}] needs {module}, which is not installed: '
                                 f'pip install "hf_ghosts[{extra}]" (from a clone: pip install -e ".[{extra}]")'), found
    # the command line says it as its other errors: on stderr, exit status 2 (no traceback)
    assert found["cli_plot"] == "no error", found
    assert 'hf-ghosts plot: error: hf_ghosts[cli] needs matplotlib' in done.stderr
