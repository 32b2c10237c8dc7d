"""The family sweep: jvp, fd and a float64 reference for the output and attention radii on tiny models of each
family, and the README's family table generated from it and :data:`~hf_ghosts.architectures.ARCHITECTURES`.

Regenerate the README table with ``python -m tests.test_probe_families`` from the repository root (prints it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from hf_ghosts import RadiusProbe, compat
from hf_ghosts.architectures import FFN_PREACTIVATIONS, attention_blocker, chunked_head_blocker
from tests.helpers import random_direction, token_batch
from tests.references import (
    causal_output_positions,
    float64_copy,
    reference_attention_spreads,
    reference_output_spreads,
)

README = Path(__file__).resolve().parents[1] / "README.md"
V = 256
_BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
_GQA = dict(_BASE, num_key_value_heads=2)
# model_type -> tiny config (2 layers, hidden 32); the table's rows, in this order
FAMILIES: dict[str, dict] = {
    "gpt_neox": _BASE,
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=8),
    "gemma": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8, attn_logit_softcapping=None),  # final_logit_softcapping=30 kept
    "phi3": dict(_GQA, pad_token_id=0),
    "gpt2": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "opt": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "gpt_bigcode": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "falcon": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "mixtral": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "mamba": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=4),
}


def tiny_family(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **FAMILIES[model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class Row:
    """What one family supports, and how far jvp and fd (float32, default settings) are from the float64 reference."""

    model_type: str
    attention: bool  # the probe measures attention (attention_blocker found nothing against it)
    dispatches: bool  # transformers calls the AttentionInterface when the model runs (compat.dispatches_attention)
    ffn: bool
    chunked_head: bool
    jvp_error: float  # max over the measured radii of |rho_jvp / rho_ref - 1|
    fd_error: float
    fd_vs_jvp: float


def sweep_one(model_type: str) -> Row:
    model = tiny_family(model_type)
    attention = attention_blocker(model) is None
    radii = ("output", "attention") if attention else ("output",)
    batch, direction = token_batch(batch=2, length=10, pad_right=2), random_direction(model)
    jvp = RadiusProbe(model, radii, "jvp").measure(batch, direction)
    fd = RadiusProbe(model, radii, "fd").measure(batch, direction)
    reference_model = float64_copy(model)
    if reference_model._can_set_experts_implementation():
        reference_model.set_experts_implementation("eager")  # _grouped_mm has no float64 kernel
    spreads = reference_output_spreads(reference_model, batch, direction)
    reference = {"output": math.pi / float(spreads[causal_output_positions(batch["labels"])].max())}
    if attention:
        reference["attention"] = math.pi / float(reference_attention_spreads(reference_model, batch, direction).max())

    def error(report, against) -> float:
        return max(abs(float(report.radii()[name]) / float(against[name]) - 1) for name in radii)

    dispatches = compat.dispatches_attention(model, batch["input_ids"])
    return Row(model_type, attention, dispatches, model_type in FFN_PREACTIVATIONS, chunked_head_blocker(model) is None,
               error(jvp, reference), error(fd, reference), error(fd, jvp.radii()))


def attention_cell(row: Row) -> str:
    """The attention column: yes/no, or for a family transformers routes from a given release on, that release
    (the same text whatever transformers is installed; the sweep checks the installed one against it)."""
    since = compat.ATTENTION_ROUTED_SINCE.get(row.model_type)
    if since is not None:
        return f"yes with transformers >= {since} (no before: its own attention)"
    return "yes" if row.attention else "no"


def table(rows: list[Row]) -> str:
    """The README's family table (support columns only: the errors are asserted, not printed, so it is stable)."""
    yes = {True: "yes", False: "no"}
    lines = ["| family (`model_type`) | output | attention | ffn | chunked head | jvp | fd |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        jvp = "yes (experts run eagerly)" if row.model_type in ("mixtral", "qwen2_moe") else "yes"
        lines.append(f"| `{row.model_type}` | yes | {attention_cell(row)} | {yes[row.ffn]} | {yes[row.chunked_head]} "
                     f"| {jvp} | yes |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [sweep_one(model_type) for model_type in FAMILIES]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_jvp_and_fd_match_the_float64_reference_on_every_family(rows: list[Row]) -> None:
    for row in rows:
        # Gemma's RMSNorm (and Mamba's mixer) compute in float32 in the float64 reference too: rounding in its differences
        assert row.jvp_error < (3e-3 if row.model_type.startswith("gemma") else 5e-4), row
        assert row.fd_error < 1e-2 and row.fd_vs_jvp < 1e-2, row  # fd at its defaults: within 1% of jvp
    # the probe measures attention exactly where transformers dispatches it (asked by running the model), and the
    # families that moved to the interface in a given release are routed exactly from that release on
    assert {row.model_type: row.attention for row in rows} == {row.model_type: row.dispatches for row in rows}
    for row in rows:
        routed = compat.attention_routed_in_installed(row.model_type)
        assert routed is None or row.attention == routed, (row, compat.ATTENTION_ROUTED_SINCE)
    assert any(row.attention for row in rows) and not all(row.attention for row in rows)  # mamba: no attention at all


FALCON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    dict(), dict(alibi=True), dict(new_decoder_architecture=True, num_kv_heads=2), dict(multi_query=False),
    dict(parallel_attn=False, bias=True),
], ids=["rotary-mqa", "alibi", "new-decoder-gqa", "mha", "sequential-bias"])
def test_falcon_attention_where_transformers_routes_it(variant: dict) -> None:
    """Falcon's layouts against the float64 reference where transformers routes its attention (ALiBi's bias reaches
    the probe as an additive float mask), and refused, naming the fix, where it does not."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.FalconForCausalLM(transformers.FalconConfig(**FALCON, **variant))
    batch, direction = token_batch(batch=2, length=10, pad_right=2), random_direction(model)
    if not compat.dispatches_attention(model, batch["input_ids"]):
        assert compat.attention_routed_in_installed("falcon") is False
        with pytest.raises(ValueError, match=r"does not route its attention.*radii=\('output',\)"):
            RadiusProbe(model)
        return
    reference_model = float64_copy(model)
    spreads = reference_output_spreads(reference_model, batch, direction)
    reference = {"output": math.pi / float(spreads[causal_output_positions(batch["labels"])].max()),
                 "attention": math.pi / float(reference_attention_spreads(reference_model, batch, direction).max())}
    for estimator, tolerance in (("jvp", 1e-5), ("fd", 1e-3)):
        radii = RadiusProbe(model, ("output", "attention"), estimator).measure(batch, direction).radii()
        for name, expected in reference.items():
            assert abs(float(radii[name]) / expected - 1) < tolerance, (estimator, name, float(radii[name]), expected)


@pytest.mark.slow
def test_readme_family_table_is_generated_from_the_sweep(rows: list[Row]) -> None:
    assert table(rows) in README.read_text(), f"regenerate with `python -m tests.test_probe_families`:\n{table(rows)}"


if __name__ == "__main__":
    swept = [sweep_one(model_type) for model_type in FAMILIES]
    print(table(swept))
    for row in swept:
        print(f"{row.model_type:12s} jvp {row.jvp_error:.1e}  fd {row.fd_error:.1e}  fd vs jvp {row.fd_vs_jvp:.1e}")
