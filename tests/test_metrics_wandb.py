"""W&B offline round trip: what RhoTrainer logs is what the run file holds, under ``train/`` against ``train/global_step``.

Training runs in a subprocess so the W&B run is finished (and its ``run-<id>.wandb`` complete) before
it is read back (the repository root on its ``PYTHONPATH``, for ``tests.helpers``). wandb 0.31 ships no
Python reader for that file, so conftest's ``read_wandb_records`` fixture parses it: a LevelDB-style log
of 32 KiB blocks holding ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import wandb
    from tests.helpers import rho_args, tiny_causal_lm, token_dataset
    from hf_ghosts import RhoTrainer

    out = Path(sys.argv[1])
    args = rho_args(out, report_to=["wandb"], run_name="ghosts-round-trip", max_steps=4, learning_rate=0.05,
                    rho_radii=["output", "attention"])
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=token_dataset())
    trainer.train()
    wandb.finish()
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    """
)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_ghost_metrics(tmp_path: Path, read_wandb_records) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "WANDB_PROJECT": "hf-ghosts-tests", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    logged = {row["train/global_step"]: row for row in history if "train/ghosts/r" in row}

    log_history = json.loads((tmp_path / "log_history.json").read_text())
    expected = [entry for entry in log_history if "loss" in entry]
    assert [entry["step"] for entry in expected] == [1, 2, 3, 4]
    assert sorted(logged) == [1, 2, 3, 4]
    for entry in expected:
        row = logged[entry["step"]]
        for key, value in entry.items():
            if key.startswith("ghosts/"):
                assert row[f"train/{key}"] == value, key
    assert any(entry["ghosts/clipped"] > 0 for entry in expected)

    metrics = [record.metric for record in records if record.WhichOneof("record_type") == "metric"]
    assert any(metric.name == "train/global_step" for metric in metrics)
    assert any(metric.glob_name == "train/ghosts/*" and metric.step_metric == "train/global_step" for metric in metrics)
