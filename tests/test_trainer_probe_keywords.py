"""The probe's model-specific keywords from the Trainer: ``rho_ffn_spec``, ``rho_shift_labels``, ``rho_chunked_head`` in
the trainer's constructor (objects of one model, not fields of the JSON/CLI arguments), and errors that name them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from hf_ghosts import FfnSpec, RadiusProbe, RhoTrainer
from tests.helpers import StepRecorder, rho_args, tiny_causal_lm, token_batch

pytestmark = pytest.mark.usefixtures("single_thread")

BLOOM_FFN = FfnSpec("mlp.dense_h_to_4h", "unused")  # Bloom: not in the FFN table


def bloom() -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=32, n_layer=2, n_head=4))


def rows(count: int = 8) -> list[dict[str, torch.Tensor]]:
    batch = token_batch(batch=count, length=12, seed=3)
    return [{key: value[i] for key, value in batch.items()} for i in range(count)]


def test_an_unknown_ffn_trains_under_rho_trainer_given_rho_ffn_spec(tmp_path) -> None:
    model = bloom()
    before = copy.deepcopy(model)
    args = rho_args(tmp_path, rho_radii=["output", "ffn"], rho_mode="monitor", max_steps=1, rho_estimator="fd",
                    train_sampling_strategy="sequential")
    data = rows()
    trainer = RhoTrainer(model=model, args=args, train_dataset=data, rho_ffn_spec=BLOOM_FFN)
    recorder = StepRecorder(lambda: trainer.rho_controller)
    trainer.add_callback(recorder)
    trainer.train()
    assert sorted(trainer.rho_controller.probe._ffn.modules) == [f"transformer.h.{i}.mlp.dense_h_to_4h" for i in range(2)]
    (record,) = recorder.records
    assert math.isfinite(record.rho_ffn) and record.rho_ffn > 0
    # monitor: the step is AdamW's own; the probe given ffn_spec directly measures the same radius along it
    update = {name: p.detach() - before.get_parameter(name).detach() for name, p in model.named_parameters()}
    batch = {key: torch.stack([row[key] for row in data[:4]]) for key in data[0]}
    direct = RadiusProbe(before, ("output", "ffn"), "fd", ffn_spec=BLOOM_FFN).measure(batch, update)
    assert record.rho_ffn == pytest.approx(direct.ffn_radius.item(), rel=1e-5)
    assert trainer.state.log_history[0]["ghosts/rho_ffn"] == pytest.approx(record.rho_ffn)


@pytest.mark.parametrize(("fields", "setting"), [
    ({"rho_radii": ["output", "ffn"]}, "'ffn' from rho_radii"),
    ({"rho_radii": ["output"], "rho_watch_radii": ["ffn", "ffn_activation"]}, "'ffn', 'ffn_activation' from rho_watch_radii"),
])
def test_the_unknown_ffn_error_names_the_trainers_keyword(tmp_path, fields: dict, setting: str) -> None:
    expected = (r"model_type 'bloom'.*Pass `rho_ffn_spec=FfnSpec\(module_suffix=\.\.\., activation_attr=\.\.\.\)` to "
                rf"the trainer's constructor naming the module whose output feeds the activation, or drop {setting}\.")
    with pytest.raises(ValueError, match=expected):
        RhoTrainer(model=bloom(), args=rho_args(tmp_path, **fields))
    with pytest.raises(ValueError, match=r"No module of BloomForCausalLM ends with 'mlp\.up'; pass `rho_ffn_spec="):
        RhoTrainer(model=bloom(), args=rho_args(tmp_path, **fields), rho_ffn_spec=FfnSpec("mlp.up", "unused"))
    # the controller and the probe: their own keyword
    with pytest.raises(ValueError, match=r"Pass `ffn_spec=FfnSpec\(.*\)` to RadiusProbe .* drop 'ffn' from radii\."):
        RadiusProbe(bloom(), ("output", "ffn"))


def test_rho_shift_labels_and_rho_chunked_head_reach_the_probe(tmp_path) -> None:
    def probe(**keywords):
        trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path), **keywords)
        return trainer.rho_controller.probe

    default = probe()
    assert default._shift_labels is None and default._head is not None  # None: decided per model (chunked on GPT-NeoX)
    routed = probe(rho_shift_labels=False, rho_chunked_head=False)
    assert routed._shift_labels is False and routed._head is None
    with pytest.raises(ValueError, match=r"^rho_chunked_head=True given to the trainer's constructor, but BloomForCausalLM"):
        RhoTrainer(model=bloom(), args=rho_args(tmp_path, rho_radii=["output"]), rho_chunked_head=True)
