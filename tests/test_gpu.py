"""What only a CUDA GPU can show: bf16 training with the probe in bf16, sdpa (and flash) attention, the chunked
head's memory at a 50k vocabulary. ``benchmarks/gpu_check.sh`` runs these (``-m gpu``).

Every test here carries the ``gpu`` marker: on a machine without CUDA, conftest deselects them (they are not
skipped: they cannot run there). The one ``importorskip`` is for flash-attn, which the benchmark GPU machine
does not have installed. bf16 accuracy on CUDA is ``test_probe_dtype.py``'s ``cuda`` cases.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_ghosts import RadiusProbe, RhoController, RhoTrainer
from tests.helpers import random_direction, rho_args, tiny_causal_lm, token_batch

pytestmark = pytest.mark.gpu


class Rows(torch.utils.data.Dataset):
    """16 rows of ``token_batch`` as a plain torch dataset (no ``datasets`` needed on the GPU machine)."""

    def __init__(self) -> None:
        self.batch = token_batch(batch=16, length=12, seed=3)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def train_on_cuda(tmp_path, attention: str) -> RhoTrainer:
    """4 bf16 steps of RhoTrainer on CUDA, defaults but a probe every step, the model loaded with ``attention``."""
    model = tiny_causal_lm("gpt_neox", attn_implementation=attention)
    args = rho_args(tmp_path, use_cpu=False, bf16=True, rho_every=1, learning_rate=3e-2)
    trainer = RhoTrainer(model=model, args=args, train_dataset=Rows())
    probe = trainer.rho_controller.probe  # "auto" on CUDA in bf16: a JVP in bf16
    assert (probe.estimator, probe.dtype) == ("jvp", torch.bfloat16)
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    assert trainer.model.config._attn_implementation == attention  # the probe switched to ghosts and back
    return trainer


def assert_controlled(trainer: RhoTrainer) -> None:
    logs = [entry for entry in trainer.state.log_history if "ghosts/r" in entry]
    assert len(logs) == 4 and all(entry["ghosts/probed"] == 1.0 for entry in logs)
    assert all(math.isfinite(entry["ghosts/rho"]) and entry["ghosts/rho"] > 0 for entry in logs)
    assert max(entry["ghosts/r"] for entry in logs) > 1.0  # lr 3e-2: the clip really acted
    assert all(entry["ghosts/r_applied"] <= 1.0 + 1e-3 for entry in logs)


def test_sdpa_bf16_training_with_the_ghosts_probe_on_cuda(tmp_path) -> None:
    assert_controlled(train_on_cuda(tmp_path, "sdpa"))


def test_flash_attention_bf16_training_with_the_ghosts_probe_on_cuda(tmp_path) -> None:
    pytest.importorskip("flash_attn", reason="flash-attn is not installed on this machine")
    assert_controlled(train_on_cuda(tmp_path, "flash_attention_2"))


def test_controller_auto_on_cuda_follows_bf16_parameters() -> None:
    model = tiny_causal_lm("gpt_neox").cuda().to(torch.bfloat16)
    probe = RhoController(model, torch.optim.AdamW(model.parameters())).probe
    assert (probe.estimator, probe.dtype) == ("jvp", torch.bfloat16)
    probe = RhoController(model.float(), torch.optim.AdamW(model.parameters())).probe
    assert (probe.estimator, probe.dtype) == ("fd", torch.float32)  # fp32 training keeps the fp32 fd probe


def peak_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the CUDA memory it allocated at its peak above what was alive before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


def test_chunked_head_at_50k_vocabulary_on_cuda() -> None:
    """Pythia's 50,304-token vocabulary, 8 x 512 tokens: the chunked head equals the full one, and its peak stays
    well below one fp32 logits tensor (824 MB), while the full head's exceeds it (4x measured on CPU)."""
    vocab, batch_size, length = 50304, 8, 512
    model = tiny_causal_lm("gpt_neox", vocab_size=vocab, hidden_size=64, intermediate_size=256,
                           max_position_embeddings=length).cuda()
    batch = {k: v.cuda() for k, v in token_batch(batch=batch_size, length=length).items()}
    direction = {k: v.cuda() for k, v in random_direction(model).items()}
    logits_bytes = batch_size * length * vocab * 4
    reports = {}
    peaks = {}
    for chunked in (True, False):
        probe = RadiusProbe(model, ("output",), "jvp", chunked_head=chunked, vocab_chunk=4096)
        probe.measure(batch, direction)  # warm-up (kernels, allocator)
        reports[chunked], peaks[chunked] = peak_bytes(lambda probe=probe: probe.measure(batch, direction))
    torch.testing.assert_close(reports[True].out_spread, reports[False].out_spread, rtol=1e-4, atol=0)
    assert int(reports[True].output_tokens) == int(reports[False].output_tokens) == batch_size * (length - 1)
    assert peaks[False] > logits_bytes, (peaks, logits_bytes)  # the measurement can see a logits tensor
    # chunked: a few [8 x 512, 4096] blocks (67 MB each) and the activations; 0.34x measured on CPU
    assert peaks[True] < 0.5 * logits_bytes, (peaks, logits_bytes)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_bf16_jvp_probe_runs_the_triton_kernel_within_one_percent_of_fp32(family: str) -> None:
    """On CUDA the ghosts attention's JVP takes the fused kernel (padding included: the probe's causal & padding
    mask becomes key padding), and a bf16 probe's radii are within 1% of an fp32 probe's on the same batch."""
    pytest.importorskip("triton")
    model = tiny_causal_lm(family).cuda()
    batch = {key: value.cuda() for key, value in token_batch(batch=4, length=64, pad_left=5).items()}
    direction = {name: t.cuda() for name, t in random_direction(model).items()}
    half = RadiusProbe(model, ("output", "attention"), "jvp", dtype="bfloat16")
    reports = {"bf16": half.measure(batch, direction), "fp32": RadiusProbe(model, ("output", "attention"), "jvp").measure(batch, direction)}
    assert half.attention_kernels == ("triton",)
    bf16, fp32 = reports["bf16"], reports["fp32"]
    assert torch.allclose(bf16.rho_out.double(), fp32.rho_out.double(), rtol=0.01)
    assert torch.allclose(bf16.rho_attn.double(), fp32.rho_attn.double(), rtol=0.01)
