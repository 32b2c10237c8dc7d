"""``rescale_moments`` (the first moment follows the applied step) and a smoke run of benchmarks/price_of_safety.py."""

from __future__ import annotations

import copy
import json
from importlib import import_module
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_ghosts import RhoController, RhoTrainer, RhoTrainingArguments
from tests.helpers import tiny_causal_lm, token_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rescale_moments_scales_the_first_moment_only() -> None:
    # a clipped step: exp_avg is scale times plain AdamW's, exp_avg_sq untouched (AdamW on a copy as reference)
    model = tiny_causal_lm("gpt_neox")
    reference = copy.deepcopy(model)
    opt_a = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt_b = torch.optim.AdamW(reference.parameters(), lr=0.05)
    controller = RhoController(model, opt_a, r_target=0.05, estimator="jvp", every=1, rescale_moments=True,
                               granularity="global")
    batch = token_batch()
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    controller.step(batch)
    opt_b.step()
    scale = controller.last.scale
    assert scale < 1
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(opt_a.state[p]["exp_avg"], scale * opt_b.state[q]["exp_avg"], rtol=1e-6, atol=0)
        torch.testing.assert_close(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"], rtol=0, atol=0)
    assert controller.last.clipped


def test_rescale_moments_refuses_an_optimizer_without_first_moment(tmp_path) -> None:
    model = tiny_causal_lm("gpt_neox")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"RhoController.rescale_moments: SGD has no first moment"):
        RhoController(model, sgd, rescale_moments=True)
    args = RhoTrainingArguments(output_dir=str(tmp_path), rho_rescale_moments=True, report_to=[])
    controller = RhoController(model, settings=args.rho_settings())
    with pytest.raises(ValueError, match=r"RhoTrainingArguments.rho_rescale_moments: SGD has no first moment"):
        controller.attach(sgd)
    with pytest.raises(ValueError, match=r"RhoTrainingArguments.rho_rescale_moments: got 1; expected True or False"):
        RhoTrainingArguments(output_dir=str(tmp_path), rho_rescale_moments=1, report_to=[])


def replay_eval_loss(harness, fields: dict | None, steps: int, eval_blocks: int, workdir: Path) -> float:
    """One setting trained alone (a plain ``Trainer`` or ``RhoTrainer``, no interleaving, no timer) on the tiny
    size's weights and batches with the benchmark's documented schedule, then evaluated on its held-out blocks."""
    size = harness.SIZES["tiny"]
    common = dict(
        output_dir=str(workdir), per_device_train_batch_size=size.batch, per_device_eval_batch_size=size.batch,
        max_steps=steps, learning_rate=size.lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0, use_cpu=True,
    )
    args = TrainingArguments(**common) if fields is None else RhoTrainingArguments(**common, **fields)
    train = harness.Blocks(harness.token_blocks(size.batch * steps, size.seq, seed=0))
    trainer = (Trainer if fields is None else RhoTrainer)(model=size.model(), args=args, train_dataset=train)
    trainer.train()
    return float(trainer.evaluate(harness.Blocks(harness.token_blocks(eval_blocks, size.seq, seed=1)))["eval_loss"])


@pytest.mark.slow
def test_price_of_safety_benchmark_writes_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "price.json"
    module = import_module("price_of_safety")
    module.main(["--size", "tiny", "--steps", "4", "--eval_blocks", "4", "--out", str(out), "--png", str(tmp_path / "p.png")])
    result = json.loads(out.read_text())
    rows = {row["setting"]: row for row in result["rows"]}
    assert list(rows) == list(module.SETTINGS)
    # Interleaving changes nothing: plain AdamW and the default (bound_r2) trained alone reach the same eval loss.
    harness = import_module("harness")
    for name in ("plain", "bound_r2"):
        replayed = replay_eval_loss(harness, module.SETTINGS[name], 4, 4, tmp_path / f"replay_{name}")
        assert rows[name]["eval_loss"] == pytest.approx(replayed, rel=1e-6), name
    for row in rows.values():
        assert len(row["records"]) == (0 if row["setting"] == "plain" else 4)
        assert row["time_ratio"] == pytest.approx(row["step_s"] / rows["plain"]["step_s"], rel=1e-9)
    assert rows["plain"]["time_ratio"] == 1.0
    assert result["table"].count("\n") == len(module.SETTINGS) + 1
    again = module.main(["--from_json", str(out), "--png", str(tmp_path / "again.png")])
    assert again["table"] == result["table"]
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "p.png").read_bytes()  # the figure is the JSON's alone
    # The left panel draws each setting's proposed r on its probed steps, nothing else.
    figures: list[plt.Figure] = []
    monkeypatch.setattr(module, "save_figure", lambda figure, path: figures.append(figure) or path)
    module.plot(result["rows"], str(tmp_path / "unused.png"), "title")
    (figure,) = figures
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True))
             for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")}
    plt.close(figure)
    probed = {name: [(record["step"], record["r"]) for record in row["records"] if record.get("probed")]
              for name, row in rows.items()}
    assert drawn == {name: points for name, points in probed.items() if points}


def test_each_mode_has_its_default_target(tmp_path) -> None:
    model = tiny_causal_lm("gpt_neox")
    targets = {mode: RhoController(model, mode=mode).r_target for mode in ("clip", "set", "monitor")}
    assert targets == {"clip": 2.0, "set": 1.0, "monitor": 2.0}
    assert RhoController(model, mode="set", r_target=0.5).r_target == 0.5
    args = RhoTrainingArguments(output_dir=str(tmp_path), rho_mode="set", report_to=[])
    assert args.rho_target is None and RhoController(model, settings=args.rho_settings()).r_target == 1.0
