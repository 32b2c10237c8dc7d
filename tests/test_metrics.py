"""The logged keys: README table == ``metrics.LOGGED_KEYS`` == what a training run logs; the window's aggregation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from hf_ghosts import RhoTrainer
from hf_ghosts.architectures import BLOCK_KINDS
from hf_ghosts.metrics import LOGGED_KEYS, MetricWindow, StepRecord
from hf_ghosts.settings import RADII, RADIUS_FIELDS
from tests.helpers import rho_args, tiny_causal_lm, token_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_key_table() -> list[tuple[str, str, str]]:
    """(key, meaning, aggregation) rows of the README's "## Logged keys" table, ``\\|`` unescaped, backticks off the key."""
    section = README.read_text().split("\n## Logged keys\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].replace(" ", "") == "|key|meaning|aggregation|", rows[0]
    table = []
    for line in rows[2:]:
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, line
        table.append((cells[0].strip("`"), cells[1], cells[2]))
    return table


def key_pattern(key: str) -> re.Pattern:
    """``ghosts/rho_attn/layer_{l}/head_{h}`` -> a regex with an integer for each ``{...}``; ``{radius}``: a radius name;
    ``{kind}``: a block kind."""
    names = {"{radius}": "(" + "|".join(RADII) + ")", "{kind}": "(" + "|".join(BLOCK_KINDS) + ")"}
    parts = re.split(r"(\{\w+\})", key)
    return re.compile("".join(names.get(part, r"\d+") if part.startswith("{") else re.escape(part) for part in parts))


def test_readme_table_is_the_metrics_table() -> None:
    documented = readme_key_table()
    table = [(key.key, key.meaning, key.aggregation) for key in LOGGED_KEYS]
    assert [row[0] for row in documented] == [row[0] for row in table], "README's logged keys differ from metrics.LOGGED_KEYS"
    assert documented == table


def test_a_training_run_logs_exactly_the_documented_keys(tmp_path) -> None:
    """All three radii, per-head radii, a probed batch without labels or unmasked positions (rows 2-3: step 2), and
    block-wise steps, all in one log."""
    data = token_dataset(rows=8)
    labels, mask = data["labels"], data["attention_mask"]
    data = data.remove_columns("labels").add_column("labels", [[-100] * len(row) if i in (2, 3) else row for i, row in enumerate(labels)])
    data = data.remove_columns("attention_mask").add_column(
        "attention_mask", [[0] * len(row) if i in (2, 3) else row for i, row in enumerate(mask)]
    )
    args = rho_args(
        tmp_path, per_device_train_batch_size=2, train_sampling_strategy="sequential", max_steps=3, logging_steps=3,
        learning_rate=0.05, rho_radii=["output", "attention", "ffn"], rho_log_per_head=True, rho_every=1,
        rho_watch_radii=["ffn_activation"], rho_radius="topk_exact", rho_topk=2, rho_granularity="blocks",
    )
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=data)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    logged = {key for key in entry if key.startswith("ghosts/")}
    patterns = {key: key_pattern(key) for key, _, _ in readme_key_table()}
    undocumented = [key for key in logged if not any(pattern.fullmatch(key) for pattern in patterns.values())]
    never_logged = [key for key, pattern in patterns.items() if not any(pattern.fullmatch(key) for key in logged)]
    assert undocumented == [] and never_logged == []
    assert len([key for key in logged if "/layer_" in key]) == 2 * 4  # layers x heads of the tiny GPT-NeoX
    assert entry["ghosts/no_output_tokens"] == entry["ghosts/no_attention_tokens"] == entry["ghosts/no_ffn_tokens"] == 1.0
    assert entry["ghosts/probed"] == 1.0
    assert entry["ghosts/block_probes"] > 0 and {key for key in logged if "/block_scale/" in key}
    assert entry["ghosts/fd_fallback"] == 0.0 and 0 < entry["ghosts/fd_error"] < 1e-2 and entry["ghosts/fd_step"] == 1e-2


def test_table_fields_are_step_record_fields() -> None:
    """Every key's field is a StepRecord field, or a radius of the one radius table (``record.rho_out``)."""
    fields = set(StepRecord.__dataclass_fields__) | set(RADIUS_FIELDS.values())
    record = StepRecord(step=1, update_norm=1.0, radii={"rho_attn": 0.5})
    assert (record.rho_attn, record.rho_out) == (0.5, None)
    with pytest.raises(AttributeError):
        record.rho_typo  # noqa: B018
    assert [key.field for key in LOGGED_KEYS if key.field is not None and key.field not in fields] == []
    assert all(key.aggregation in ("max", "min") for key in LOGGED_KEYS if key.field is not None)


# ----------------------------------------------------------------------------- the window, by hand


def records() -> list[StepRecord]:
    """Four steps: probed and clipped, reused, skipped, probed on a batch without labels."""
    return [
        StepRecord(step=1, update_norm=2.0, r=4.0, r_applied=1.0, scale=0.25, rho=0.5, probed=True, clipped=True,
                   radii={"rho_out": 0.5, "rho_attn": 0.75}, output_tokens=10, rho_attn_heads=torch.tensor([[0.75, 1.0], [2.0, 3.0]])),
        StepRecord(step=2, update_norm=0.25, r=0.5, r_applied=0.5, scale=1.0, rho=0.5),
        StepRecord(step=3, update_norm=math.nan, skipped="gradient"),
        StepRecord(step=4, update_norm=1.0, r=0.0, r_applied=0.0, scale=1.0, rho=math.inf, probed=True,
                   radii={"rho_out": math.inf, "rho_attn": 1.5}, output_tokens=0, rho_attn_heads=torch.tensor([[1.5, 0.5], [4.0, 2.5]])),
    ]


def test_window_reduces_by_hand_computed_values() -> None:
    window = MetricWindow(per_head=True)
    for record in records():
        window.add(record)
    assert window.pop() == {
        "ghosts/r": 4.0, "ghosts/r_applied": 1.0, "ghosts/update_norm": 2.0, "ghosts/scale": 0.25, "ghosts/rho": 0.5,
        "ghosts/rho_out": 0.5, "ghosts/rho_attn": 0.75,
        "ghosts/clipped": 0.5,  # 1 of 2 probed steps
        "ghosts/probed": 2 / 3,  # of the 3 steps not skipped
        "ghosts/skipped_nonfinite": 1.0, "ghosts/no_output_tokens": 1.0, "ghosts/would_skip": 0.0,
        "ghosts/would_clip": 0.0,  # no probed record says would_clip
        "ghosts/rho_attn/layer_0/head_0": 0.75, "ghosts/rho_attn/layer_0/head_1": 0.5,
        "ghosts/rho_attn/layer_1/head_0": 2.0, "ghosts/rho_attn/layer_1/head_1": 2.5,
    }
    assert window.pop() == {"ghosts/skipped_nonfinite": 0.0, "ghosts/would_skip": 0.0}, "pop empties the window"


def test_window_without_per_head_or_probes() -> None:
    window = MetricWindow(per_head=False)
    window.add(records()[1])
    assert window.pop() == {
        "ghosts/r": 0.5, "ghosts/r_applied": 0.5, "ghosts/update_norm": 0.25, "ghosts/scale": 1.0, "ghosts/rho": 0.5,
        "ghosts/probed": 0.0, "ghosts/skipped_nonfinite": 0.0, "ghosts/would_skip": 0.0,
    }


def test_window_counts_bottlenecks_would_bind_would_clip_and_would_skip() -> None:
    """Hand-made records: 3 probed (output bound twice, attention once; the watched ffn was lower once), 1 reused,
    2 that monitoring let stand with a NaN gradient."""
    window = MetricWindow(radii=("output", "attention"), watch_radii=("ffn",))
    for record in (
        StepRecord(step=1, update_norm=1.0, r=2.0, r_applied=2.0, rho=0.5, probed=True, bottleneck="output", would_clip=True),
        StepRecord(step=2, update_norm=1.0, r=0.5, r_applied=0.5, rho=2.0, probed=True, bottleneck="output",
                   would_bind="ffn", would_clip=False),
        StepRecord(step=3, update_norm=1.0, r=0.4, r_applied=0.4, rho=2.5),
        StepRecord(step=4, update_norm=math.nan, would_skip="gradient"),
        StepRecord(step=5, update_norm=math.nan, would_skip="update"),
        StepRecord(step=6, update_norm=1.0, r=0.5, r_applied=0.5, rho=2.0, probed=True, bottleneck="attention",
                   would_clip=False),
    ):
        window.add(record)
    metrics = window.pop()
    assert metrics["ghosts/bottleneck/output"] == 2.0 and metrics["ghosts/bottleneck/attention"] == 1.0
    assert metrics["ghosts/would_bind/ffn"] == 1.0
    assert metrics["ghosts/would_clip"] == pytest.approx(1 / 3)
    assert metrics["ghosts/would_skip"] == 2.0 and metrics["ghosts/skipped_nonfinite"] == 0.0
    assert metrics["ghosts/probed"] == pytest.approx(3 / 4)  # the would-skip steps count in neither
    assert metrics["ghosts/r"] == 2.0 and metrics["ghosts/update_norm"] == 1.0  # NaN norms stay out of the max


def block_records() -> list[StepRecord]:
    """A block-wise step, a global step (no block gave a decrease), a reused step, a second block-wise step."""
    return [
        StepRecord(step=1, update_norm=2.0, r=4.0, r_applied=2.0, scale=0.6, rho=0.5, probed=True, clipped=True,
                   block_probes=8, block_scales={"embed": 0.25, "head": 1.0}),
        StepRecord(step=2, update_norm=2.0, r=4.0, r_applied=2.0, scale=0.5, rho=0.5, probed=True, clipped=True),
        StepRecord(step=3, update_norm=0.5, r=1.0, r_applied=1.0, scale=1.0, rho=0.5),
        StepRecord(step=4, update_norm=2.0, r=3.0, r_applied=1.5, scale=0.7, rho=0.5, probed=True, clipped=True,
                   block_probes=1, block_scales={"embed": 0.5, "head": 0.75}),
    ]


def test_window_sums_block_probes_and_takes_the_least_block_scale() -> None:
    window = MetricWindow(blocks=True)
    for record in block_records():
        window.add(record)
    metrics = window.pop()
    assert metrics["ghosts/block_probes"] == 9.0 and metrics["ghosts/scale"] == 0.5
    assert {k: v for k, v in metrics.items() if "/block_scale/" in k} == {"ghosts/block_scale/embed": 0.25,
                                                                           "ghosts/block_scale/head": 0.75}
    assert window.pop()["ghosts/block_probes"] == 0.0, "pop empties the window"
    assert "ghosts/block_probes" not in MetricWindow().pop(), "a global run logs no block keys"
    assert block_records()[0].scalars()["block_scale/embed"] == 0.25


@pytest.mark.parametrize("split", [1, 2, 3])
def test_window_state_round_trip_resumes_the_window_exactly(split: int) -> None:
    straight = MetricWindow(per_head=True)
    first = MetricWindow(per_head=True)
    for record in records():
        straight.add(record)
    for record in records()[:split]:
        first.add(record)
    resumed = MetricWindow(per_head=True)
    resumed.load_state_dict(first.state_dict())
    for record in records()[split:]:
        resumed.add(record)
    assert resumed.pop() == straight.pop()
    straight, first, resumed = (MetricWindow(blocks=True) for _ in range(3))
    for record in block_records():
        straight.add(record)
    for record in block_records()[:split]:
        first.add(record)
    resumed.load_state_dict(first.state_dict())
    for record in block_records()[split:]:
        resumed.add(record)
    assert resumed.pop() == straight.pop()
    assert "block_probes" not in MetricWindow().state_dict(), "a global run's state is what it was before blocks"
