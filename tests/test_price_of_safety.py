"""``rescale_moments`` (the first moment follows the applied step) and a smoke run of benchmarks/price_of_safety.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_causal_lm, token_batch
from test_benchmarks import benchmark

from hf_ghosts import RhoController, RhoTrainingArguments

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rescale_moments_scales_the_first_moment_only() -> None:
    # a clipped step: exp_avg is scale times plain AdamW's, exp_avg_sq untouched (AdamW on a copy as reference)
    model = tiny_causal_lm("gpt_neox")
    reference = copy.deepcopy(model)
    opt_a = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt_b = torch.optim.AdamW(reference.parameters(), lr=0.05)
    controller = RhoController(model, opt_a, r_target=0.05, estimator="jvp", every=1, rescale_moments=True)
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


@pytest.mark.slow
def test_price_of_safety_benchmark_writes_every_setting(tmp_path: Path) -> None:
    out = tmp_path / "price.json"
    module = benchmark("price_of_safety")
    module.main(["--size", "tiny", "--steps", "4", "--eval_blocks", "4", "--out", str(out), "--png", str(tmp_path / "p.png")])
    result = json.loads(out.read_text())
    assert [row["setting"] for row in result["rows"]] == list(module.SETTINGS)
    for row in result["rows"]:
        assert row["eval_loss"] > 0 and row["time_ratio"] > 0
        assert len(row["records"]) == (0 if row["setting"] == "plain" else 4)
    assert result["table"].count("\n") == len(module.SETTINGS) + 1
    assert (tmp_path / "p.png").stat().st_size > 0
    again = module.main(["--from_json", str(out), "--png", str(tmp_path / "again.png")])
    assert again["table"] == result["table"] and (tmp_path / "again.png").stat().st_size > 0


def test_each_mode_has_its_default_target(tmp_path) -> None:
    model = tiny_causal_lm("gpt_neox")
    targets = {mode: RhoController(model, mode=mode).r_target for mode in ("clip", "set", "monitor")}
    assert targets == {"clip": 2.0, "set": 1.0, "monitor": 2.0}
    assert RhoController(model, mode="set", r_target=0.5).r_target == 0.5
    args = RhoTrainingArguments(output_dir=str(tmp_path), rho_mode="set", report_to=[])
    assert args.rho_target is None and RhoController(model, settings=args.rho_settings()).r_target == 1.0
