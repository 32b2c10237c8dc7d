"""The probe's dtype (``rho_probe_dtype``) and the estimator ``"auto"``: resolution, the fd refusal, bf16 accuracy.

Accuracy is checked against the float64 central-difference references of tests/references.py (never against the
probe itself), on every family of ``tests.helpers.FAMILIES``. The ``device`` parameter runs each accuracy test on CPU (bf16
works there) and on CUDA; the CUDA cases carry the ``gpu`` marker and are deselected where CUDA is missing
(``-m "not gpu"``, which conftest applies automatically on a CPU-only machine): not skipped, deselected.
"""

from __future__ import annotations

import pytest
import torch

from hf_ghosts import RadiusProbe, RhoController, RhoTrainer, RhoTrainingArguments
from hf_ghosts.settings import RhoSettings, resolve_estimator, resolve_probe_dtype
from tests.helpers import FAMILIES, random_direction, rho_args, tiny_causal_lm, token_batch, token_dataset
from tests.references import (
    causal_output_positions,
    float64_copy,
    reference_attention_spreads,
    reference_output_spreads,
)

pytestmark = pytest.mark.usefixtures("single_thread")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# ------------------------------------------------------------------------------------------ resolution
@pytest.mark.parametrize(
    ("estimator", "probe_dtype", "training", "device", "want_estimator", "want_dtype"),
    [
        # "auto": a JVP in the 16-bit training dtype on CUDA; fp32 central differences everywhere else
        ("auto", "auto", BF16, "cuda", "jvp", BF16),
        ("auto", "auto", FP16, "cuda", "jvp", FP16),
        ("auto", "auto", FP32, "cuda", "fd", FP32),
        ("auto", "auto", BF16, "cpu", "fd", FP32),
        ("auto", "auto", FP32, "cpu", "fd", FP32),
        # an explicit estimator keeps "auto" dtype honest: fd stays fp32, jvp follows 16-bit CUDA training
        ("fd", "auto", BF16, "cuda", "fd", FP32),
        ("jvp", "auto", BF16, "cuda", "jvp", BF16),
        ("jvp", "auto", BF16, "cpu", "jvp", FP32),
        ("jvp", "auto", FP32, "cuda", "jvp", FP32),
        # an explicit dtype decides "auto"'s estimator
        ("auto", "bfloat16", FP32, "cpu", "jvp", BF16),
        ("auto", "float16", FP32, "cuda", "jvp", FP16),
        ("auto", "float32", BF16, "cuda", "fd", FP32),
        ("jvp", "float32", BF16, "cuda", "jvp", FP32),
        ("jvp", "bfloat16", FP32, "cpu", "jvp", BF16),
    ],
)
def test_resolution_table(estimator, probe_dtype, training, device, want_estimator, want_dtype) -> None:
    resolved = resolve_estimator(estimator, probe_dtype, training, device)
    assert resolved == want_estimator
    assert resolve_probe_dtype(probe_dtype, resolved, training, device) == want_dtype


@pytest.mark.parametrize("probe_dtype", ["bfloat16", "float16"])
def test_fd_in_16_bits_is_refused_with_the_reason(tmp_path, probe_dtype: str) -> None:
    reason = r"fd.*rounding \(error ~ eps \* \|z\| / h"
    with pytest.raises(ValueError, match=r"^RhoController\.probe_dtype: .*" + reason):
        RhoSettings(estimator="fd", probe_dtype=probe_dtype)
    with pytest.raises(ValueError, match=r"^RhoController\.probe_dtype: .*" + reason):  # "auto" that resolves to fd
        RhoSettings(estimator="fd").resolved(FP32, "cuda").refuse_fd_in_16_bits(getattr(torch, probe_dtype))
    with pytest.raises(ValueError, match=r"^RadiusProbe\.dtype: .*" + reason):
        RadiusProbe(tiny_causal_lm("gpt_neox"), ("output",), "fd", dtype=probe_dtype)
    with pytest.raises(ValueError, match=r"^RadiusProbe\.dtype: .*" + reason):
        RadiusProbe(tiny_causal_lm("gpt_neox"), ("output",), "fd", dtype=getattr(torch, probe_dtype))
    model = tiny_causal_lm("gpt_neox")
    with pytest.raises(ValueError, match=r"^RhoController\.probe_dtype: .*" + reason):
        RhoController(model, torch.optim.AdamW(model.parameters()), estimator="fd", probe_dtype=probe_dtype)
    with pytest.raises(ValueError, match=r"^RhoTrainingArguments\.rho_probe_dtype: .*" + reason):
        RhoTrainingArguments(output_dir=str(tmp_path), report_to=[], rho_estimator="fd", rho_probe_dtype=probe_dtype)


def test_invalid_probe_dtype_and_auto_in_the_probe_are_refused() -> None:
    model = tiny_causal_lm("gpt_neox")
    with pytest.raises(ValueError, match=r"^RhoController\.probe_dtype: got 'bf16'; expected one of \['auto'"):
        RhoController(model, torch.optim.AdamW(model.parameters()), probe_dtype="bf16")
    with pytest.raises(ValueError, match=r"^RadiusProbe\.estimator: got 'auto'; expected one of \['jvp', 'fd'\]"):
        RadiusProbe(model, ("output",), "auto")
    with pytest.raises(ValueError, match=r"^RadiusProbe\.dtype: got 'auto'"):
        RadiusProbe(model, ("output",), "jvp", dtype="auto")


def test_controller_resolves_auto_from_the_parameters() -> None:
    """Plain loop: bf16 parameters on CPU keep the fp32 fd probe; an explicit bf16 dtype picks the JVP."""
    model = tiny_causal_lm("gpt_neox").to(BF16)
    optimizer = torch.optim.AdamW(model.parameters())
    probe = RhoController(model, optimizer).probe
    assert (probe.estimator, probe.dtype) == ("fd", FP32)
    probe = RhoController(model, optimizer, probe_dtype="bfloat16").probe
    assert (probe.estimator, probe.dtype) == ("jvp", BF16)


def test_rho_trainer_resolves_auto_from_bf16_and_the_device(tmp_path) -> None:
    """On CPU a bf16 run keeps the fp32 fd probe (the CUDA case is in test_gpu.py); the arguments pass through."""
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path, bf16=True), train_dataset=token_dataset())
    assert trainer.rho_controller.training_dtype == BF16
    assert (trainer.rho_controller.probe.estimator, trainer.rho_controller.probe.dtype) == ("fd", FP32)
    args = rho_args(tmp_path, bf16=True, rho_probe_dtype="bfloat16")
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=token_dataset())
    assert (trainer.rho_controller.probe.estimator, trainer.rho_controller.probe.dtype) == ("jvp", BF16)
    trainer.train()
    records = trainer.state.log_history
    assert all(entry["ghosts/r_applied"] <= 1.0 + 1e-6 for entry in records if "ghosts/r_applied" in entry)


# ------------------------------------------------------------------------------------------ accuracy
def bf16_errors(family: str, device: str) -> dict[str, float]:
    """Relative errors of a bf16 jvp probe (fp32 weights, as in mixed-precision training) against float64."""
    model = tiny_causal_lm(family)
    batch = token_batch(batch=3, length=12, pad_right=3)
    direction = random_direction(model)
    probe = RadiusProbe(model.to(device), ("output", "attention"), "jvp", dtype=BF16)
    report = probe.measure({k: v.to(device) for k, v in batch.items()}, {k: v.to(device) for k, v in direction.items()})
    reference = float64_copy(model.cpu())
    valid = causal_output_positions(batch["labels"])
    out = reference_output_spreads(reference, batch, direction)[valid].max()
    attn = reference_attention_spreads(reference, batch, direction)
    return {
        "output": float((report.out_spread.cpu().double() - out).abs() / out),
        "attention": float(((report.attn_spread.cpu().double() - attn).abs() / attn).max()),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_jvp_probe_within_2_percent_of_float64(family: str, device: str) -> None:
    errors = bf16_errors(family, device)
    assert errors["output"] < 0.02 and errors["attention"] < 0.02, errors
