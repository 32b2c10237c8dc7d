"""The blocks of a block-wise step: every parameter of every family in exactly one block, the pieces summing to the
update exactly, fused q/k/v projections split where transformers' attention forwards read q, k and v, PEFT adapters
beside their base module, tied embeddings as one block."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from hf_ghosts.architectures import BLOCK_KINDS, BLOCK_NAMES, DEFAULT_BLOCK_NAMES, fused_qkv_split, parameter_block
from hf_ghosts.blocks import ParameterBlocks
from hf_ghosts.compat import dispatches_attention
from tests.helpers import tiny_causal_lm, token_batch
from tests.references import float64_copy, recorded_scores
from tests.test_probe_families import FAMILIES, tiny_family

pytestmark = pytest.mark.usefixtures("single_thread")

TRANSFORMER_KINDS = {"embed", "qk", "vo", "mlp", "norm", "final_norm"}  # "head" where untied


def blocks_of(model: torch.nn.Module) -> tuple[ParameterBlocks, list[str], list[torch.Tensor]]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    return ParameterBlocks.of(model, names, params), list(names), list(params)


def assert_partition(blocks: ParameterBlocks, names: list[str], params: list[torch.Tensor]) -> None:
    """Each element of each parameter in exactly one block; the pieces of a random update sum to it exactly."""
    ones = [torch.ones_like(p) for p in params]
    count = {name: torch.zeros_like(p) for name, p in zip(names, params, strict=True)}
    for piece in blocks.pieces(ones):
        for name, tensor in piece.items():
            count[name] += tensor
    assert all(bool((c == 1).all()) for c in count.values())
    update = [torch.randn_like(p) for p in params]
    total = {name: torch.zeros_like(p) for name, p in zip(names, params, strict=True)}
    for piece in blocks.pieces(update):
        for name, tensor in piece.items():
            total[name] += tensor  # each element of the sum has exactly one non-zero term: exact
    assert all(torch.equal(total[name], u) for name, u in zip(names, update, strict=True))
    scales = torch.rand(len(blocks.kinds), dtype=torch.float64)
    combined = blocks.combine(update, scales)  # w = sum_b s_b u_b, parameter by parameter
    expected = [sum(float(scales[b]) * blocks.pieces(update)[b].get(name, torch.zeros_like(u)) for b in range(len(blocks.kinds)))
                for name, u in zip(names, update, strict=True)]
    for w, e in zip(combined, expected, strict=True):
        torch.testing.assert_close(w, e)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_parameter_of_every_family_is_in_exactly_one_block(model_type: str) -> None:
    model = tiny_family(model_type)
    blocks, names, params = blocks_of(model)
    assert_partition(blocks, names, params)
    assert set(blocks.kinds) <= set(BLOCK_KINDS) and list(blocks.kinds) == [k for k in BLOCK_KINDS if k in blocks.kinds]
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = (TRANSFORMER_KINDS | ({"head"} if not tied and model.get_output_embeddings() is not None else set()))
    if model_type == "mamba":  # no attention, no MLP: the mixers go to "other" (placed, never dropped)
        expected = {"embed", "norm", "final_norm", "other"}
    assert set(blocks.kinds) == expected, (model_type, blocks.kinds)
    assert model_type in BLOCK_NAMES


def test_tied_embeddings_are_one_block() -> None:
    model = tiny_family("gemma")  # lm_head.weight is embed_tokens.weight
    blocks, names, _ = blocks_of(model)
    assert "lm_head.weight" not in names and "head" not in blocks.kinds
    assert blocks.where[names.index("model.embed_tokens.weight")] == blocks.kinds.index("embed")


def test_an_unknown_family_uses_the_default_names_and_places_the_rest_in_other() -> None:
    model = tiny_causal_lm("llama")
    model.config.model_type = "my_llama"  # not in the table
    model.extra = torch.nn.Linear(2, 2)  # a parameter no table knows
    assert BLOCK_NAMES.get("my_llama") is None
    blocks, names, params = blocks_of(model)
    assert_partition(blocks, names, params)
    assert blocks.kinds[blocks.where[names.index("extra.weight")]] == "other"
    assert blocks.kinds[blocks.where[names.index("model.layers.1.self_attn.k_proj.weight")]] == "qk"
    assert DEFAULT_BLOCK_NAMES.kind_of("model.layers.0.mlp.up_proj.weight") == "mlp"


def test_peft_adapters_land_in_their_base_module_block() -> None:
    peft = pytest.importorskip("peft")
    llama = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    blocks, names, params = blocks_of(llama)
    assert_partition(blocks, names, params)
    kinds = {name: blocks.kinds[blocks.where[names.index(name)]] for name in names}
    assert all(name.split(".lora_")[0].endswith(("q_proj", "v_proj", "down_proj")) for name in names)
    assert {kinds[n] for n in names if "q_proj" in n} == {"qk"}
    assert {kinds[n] for n in names if "v_proj" in n} == {"vo"}
    assert {kinds[n] for n in names if "down_proj" in n} == {"mlp"}
    # on GPT-NeoX's fused projection, LoRA's B (rows: q, k, v) is split like the weight; A (its input side) goes to q/k
    neox = peft.get_peft_model(tiny_causal_lm("gpt_neox"), peft.LoraConfig(r=2, target_modules=["query_key_value"]))
    blocks, names, params = blocks_of(neox)
    assert_partition(blocks, names, params)
    for name, p in zip(names, params, strict=True):
        at = blocks.where[names.index(name)]
        if ".lora_B." in name:
            assert not isinstance(at, int) and at.dim == 0 and p.shape[0] == 96
        else:
            assert blocks.kinds[at] == "qk", name


FUSED = {  # model_type and config changes of each fused q/k/v layout
    "gpt_neox": {}, "phi3": {}, "gpt2": {}, "gpt_bigcode": {}, "gpt_bigcode mha": {"multi_query": False},
    "falcon": {}, "falcon mha": {"multi_query": False}, "falcon new": {"new_decoder_architecture": True, "num_kv_heads": 2},
}


def layer0_scores(model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor], routed: bool) -> torch.Tensor:
    """Layer 0's pre-softmax scores, recorded by an attention function of our own where transformers routes the
    family's attention; where it does not (Falcon before 5.25), the queries and keys Falcon's own ``_split_heads``
    reads from the fused projection's output (what its attention multiplies into scores)."""
    if routed:
        return recorded_scores(model, batch)[0]
    attention = model.transformer.h[0].self_attention
    seen = []
    handle = attention.query_key_value.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    query, key, _ = attention._split_heads(seen[0])
    return torch.cat([query.flatten(), key.flatten()])


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_qkv_split_matches_what_the_attention_reads(case: str) -> None:
    """Behaviour, not the layout written out again: moving any head slot of layer 0's fused projection that the split
    calls q/k changes layer 0's attention scores (recorded by an attention function of our own; Falcon's queries and
    keys as its own attention splits them, where transformers does not route it); moving one it calls v leaves them
    exactly as they were."""
    model_type = case.split()[0]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**FAMILIES[model_type], **FUSED[case]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = float64_copy(transformers.AutoModelForCausalLM.from_config(config))
    batch = token_batch(batch=2, length=8)
    routed = dispatches_attention(model, batch["input_ids"])
    assert routed or model_type == "falcon", f"{model_type} no longer routes its attention"
    base = layer0_scores(model, batch, routed)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    checked = 0
    for name, p in model.named_parameters():
        at = parameter_block(name, tuple(p.shape), model)
        if isinstance(at, str) or ".0." not in name:
            continue
        dim, is_qk = at
        for start in range(0, p.shape[dim], head_dim):
            rows = torch.zeros(p.shape[dim], dtype=torch.bool)
            rows[start:start + head_dim] = True
            assert bool((is_qk[rows] == is_qk[start]).all()), "a head slot split between q/k and v"
            saved = p.detach().clone()
            with torch.no_grad():
                p.add_(torch.randn_like(p) * rows.reshape([-1 if d == dim else 1 for d in range(p.dim())]).double())
            moved = float((layer0_scores(model, batch, routed) - base).abs().max())
            with torch.no_grad():
                p.copy_(saved)
            assert (moved > 1e-6) == bool(is_qk[start]), (name, start, moved)
            checked += 1
    assert checked >= 6


def test_fused_qkv_split_leaves_other_widths_whole() -> None:
    config = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4)
    assert fused_qkv_split((2, 32), "heads", config) is None  # LoRA's A: rank x hidden
    dim, is_qk = fused_qkv_split((96, 2), "heads", config)  # LoRA's B: 3 hidden x rank
    assert dim == 0 and is_qk.tolist() == ([True] * 16 + [False] * 8) * 4
    with pytest.raises(ValueError, match="fused_qkv_split: layout 'rows'"):
        fused_qkv_split((96, 32), "rows", config)


@pytest.mark.parametrize(("model_type", "name", "kind"), [
    ("llama", "embed_tokens.weight", "embed"),  # a bare backbone: no "model." in front
    ("llama", "layers.0.input_layernorm.weight", "norm"),
    ("llama", "norm.weight", "final_norm"),
    ("gpt2", "h.1.ln_2.bias", "norm"),
    ("gpt2", "ln_f.weight", "final_norm"),
    ("phi", "model.layers.0.self_attn.q_layernorm.weight", "qk"),
    ("phi", "model.layers.0.self_attn.dense.bias", "vo"),
    ("phi", "model.final_layernorm.weight", "final_norm"),
    ("gptj", "transformer.h.3.attn.out_proj.weight", "vo"),
    ("gptj", "transformer.h.3.mlp.fc_in.bias", "mlp"),
    ("opt", "model.decoder.layers.2.final_layer_norm.weight", "norm"),  # a layer's norm, not the final one
    ("opt", "model.decoder.final_layer_norm.weight", "final_norm"),
    ("opt", "model.decoder.project_in.weight", "other"),
    ("gpt_neox", "embed_out.weight", "head"),
    ("olmo2", "model.layers.0.self_attn.k_norm.weight", "qk"),
])
def test_block_names_by_hand(model_type: str, name: str, kind: str) -> None:
    """Names of families the sweep does not build (and bare backbones), placed by hand."""
    assert BLOCK_NAMES[model_type].kind_of(name) == kind
