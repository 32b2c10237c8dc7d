"""Each workaround in ``hf_ghosts.compat`` against the installed ``transformers``: still needed, still working.

A test here that fails says which workaround to delete (upstream fixed it) or to update (upstream moved
what it uses).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, Trainer

from hf_ghosts import compat
from tests.helpers import FAMILIES, rho_args, tiny_causal_lm, tiny_config, token_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- renamed checkpoint keys
def resume_without_training(tmp_path, rename: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain ``Trainer``: train 2 steps (checkpoint-2), then resume a model with other weights at step 2 (no step left).

    Returns the checkpoint's tensors and the resumed model's state dict.
    """
    common = dict(max_steps=2, save_strategy="steps", save_steps=2, learning_rate=0.05)
    Trainer(model=tiny_causal_lm("gpt_neox"), args=rho_args(tmp_path, **common), train_dataset=token_dataset()).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    model = tiny_causal_lm("gpt_neox", seed=7)
    resumed = Trainer(model=model, args=rho_args(tmp_path, output_dir=str(tmp_path / "resumed"), **common), train_dataset=token_dataset())
    if rename:
        with compat.checkpoint_keys_renamed(model):
            resumed.train(resume_from_checkpoint=str(checkpoint))
    else:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    return load_file(str(checkpoint / "model.safetensors")), model.state_dict()


def test_plain_trainer_resume_still_drops_the_gpt_neox_head(tmp_path) -> None:
    saved, loaded = resume_without_training(tmp_path, rename=False)
    if "embed_out.weight" not in saved:
        pytest.fail(
            "upstream fixed GPT-NeoX checkpoints: the head is saved as lm_head.weight, not embed_out.weight. "
            "Delete compat.checkpoint_keys_renamed / compat.checkpoint_to_model_keys and RhoTrainer's "
            "_load_from_checkpoint / _load_best_model overrides."
        )
    body = [name for name in loaded if name != "lm_head.weight"]
    assert all(torch.equal(loaded[name], saved[name]) for name in body), "the resume loaded nothing: the test proves nothing"
    if torch.equal(loaded["lm_head.weight"], saved["embed_out.weight"]):
        pytest.fail(
            "upstream fixed Trainer resume of GPT-NeoX: lm_head is restored from embed_out.weight by itself. "
            "Delete compat.checkpoint_keys_renamed / compat.checkpoint_to_model_keys and RhoTrainer's "
            "_load_from_checkpoint / _load_best_model overrides."
        )


def test_checkpoint_keys_renamed_restores_the_gpt_neox_head(tmp_path) -> None:
    saved, loaded = resume_without_training(tmp_path, rename=True)
    assert torch.equal(loaded["lm_head.weight"], saved["embed_out.weight"])
    assert all(torch.equal(loaded[name], saved[name]) for name in loaded if name != "lm_head.weight")


def test_checkpoint_to_model_keys_maps_only_unknown_renamed_keys() -> None:
    head, other = torch.zeros(1), torch.ones(1)
    neox = tiny_causal_lm("gpt_neox")
    mapped = compat.checkpoint_to_model_keys(neox, {"embed_out.weight": head, "gpt_neox.final_layer_norm.weight": other})
    assert mapped == {"lm_head.weight": head, "gpt_neox.final_layer_norm.weight": other}
    assert compat.checkpoint_to_model_keys(neox, {"lm_head.weight": head}) == {"lm_head.weight": head}
    llama = tiny_causal_lm("llama")
    assert compat.checkpoint_to_model_keys(llama, {"embed_out.weight": head}) == {"embed_out.weight": head}


def test_checkpoint_keys_renamed_leaves_the_model_as_it_was() -> None:
    model = tiny_causal_lm("gpt_neox")
    with compat.checkpoint_keys_renamed(model):
        assert "load_state_dict" in model.__dict__
    assert "load_state_dict" not in model.__dict__


# ----------------------------------------------------------------------------- bare backbones
def test_model_mapping_names_still_names_the_bare_backbones() -> None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError as error:
        pytest.fail(f"transformers moved MODEL_MAPPING_NAMES ({error}): update compat.is_bare_backbone")
    assert MODEL_MAPPING_NAMES["gpt_neox"] == "GPTNeoXModel", "MODEL_MAPPING_NAMES changed shape: update compat.is_bare_backbone"
    for family in FAMILIES:
        bare = AutoModel.from_config(tiny_config(family))
        with_head = tiny_causal_lm(family)
        assert bare.base_model is bare and with_head.base_model is not with_head, family  # public-API reference
        assert compat.is_bare_backbone(bare), family
        assert not compat.is_bare_backbone(with_head), family
    assert not compat.is_bare_backbone(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- DTensor shard offsets
def test_dtensor_offset_still_reads_torchs_shard_rule(tmp_path) -> None:
    """One gloo process, a DTensor sharded on dim 0: ``compat.dtensor_offset`` reaches torch's private rule (fails,
    naming compat, if it moved). What it gives on 2 ranks, a fused projection split at each rank's offset, is checked
    by tests/test_distributed.py (test_fsdp2_block_steps_are_rank_identical_and_equal_to_ddp)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_ghosts.distributed import local_offset

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.randn(6, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        assert compat.dtensor_offset(sharded) == local_offset(sharded) == (0, 0)
        assert local_offset(torch.zeros(6, 4)) == (0, 0)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- FSDP2 all-gather dtype
def test_fsdp_full_precision_switches_the_all_gather_dtype_and_back(tmp_path) -> None:
    """One gloo process, ``fully_shard`` with a bf16 policy: inside the switch the forward sees fp32 weights and
    equals the fp32 module exactly; outside, bf16 again. Fails (naming compat) if FSDP2's internals moved."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        reference = copy.deepcopy(model)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, output_dtype=torch.bfloat16)
        fully_shard(model[0], mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        seen: list[torch.dtype] = []
        model[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        x = torch.randn(3, 8)
        trained = model(x)
        trained.float().sum().backward()  # lazy init, a bf16 all-gather, its buffers allocated
        assert seen == [torch.bfloat16] and trained.dtype == torch.bfloat16
        for module in (model, model[0]):
            module.reshard()
        groups = compat.fsdp_param_groups(model[0])
        for name in ("param_dtype", "all_gather_outputs", "free_unsharded_param", "_unsharded_param"):
            assert hasattr(groups[0].fsdp_params[0], name), f"torch's FSDPParam has no {name} any more: update compat.fsdp_full_precision"
        with compat.fsdp_full_precision([model, model[0]]), torch.no_grad():
            probed = model(x)
            for module in (model, model[0]):
                module.reshard()
        assert seen[-1] == torch.float32, "fsdp_full_precision no longer changes FSDP2's all-gather dtype: update compat"
        assert probed.dtype == torch.float32
        torch.testing.assert_close(probed, reference(x).detach(), rtol=0, atol=0)
        assert model(x).dtype == torch.bfloat16 and seen[-1] == torch.bfloat16
        assert {p.param_dtype for g in groups for p in g.fsdp_params} == {torch.bfloat16}
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- switching MoE experts
def test_grouped_mm_still_has_no_forward_ad() -> None:
    """compat.experts_implementation runs MoE experts eagerly inside a jvp probe because _grouped_mm has no forward AD."""
    import torch.autograd.forward_ad as fwAD

    mat_a, mat_b = torch.randn(4, 8), torch.randn(2, 8, 8)
    offsets = torch.tensor([2, 4], dtype=torch.int32)
    try:
        with fwAD.dual_level():
            torch._grouped_mm(fwAD.make_dual(mat_a, torch.ones_like(mat_a)), mat_b, offs=offsets)
    except (NotImplementedError, RuntimeError) as error:
        assert "forward" in str(error).lower() or "not implemented" in str(error).lower(), error
    else:
        pytest.fail("upstream fixed: _grouped_mm has forward AD; delete compat.experts_implementation")


def test_experts_implementation_switches_and_restores() -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=16, num_local_experts=2,
                                        num_experts_per_tok=1)
    model = transformers.MixtralForCausalLM(config)
    found = model.get_experts_implementation()
    with compat.experts_implementation(model, "eager"):
        assert compat.experts_implementation_of(model) == "eager"
    assert model.get_experts_implementation() == found and compat.experts_implementation_of(model) == found[""]


# ----------------------------------------------------------------------------- sdpa for the ghosts attention
def test_ghosts_attention_delegates_to_what_transformers_registers_as_sdpa() -> None:
    """Outside a probe the ghosts attention is sdpa bit for bit only if compat's pieces are the registered ones."""
    from transformers import AttentionInterface, AttentionMaskInterface

    assert AttentionInterface()["sdpa"] is compat.sdpa_attention_forward, (
        "transformers registers another sdpa attention: update compat.sdpa_attention_forward"
    )
    assert AttentionMaskInterface()["sdpa"] is compat.sdpa_mask, (
        "transformers registers another sdpa mask: update compat.sdpa_mask"
    )
    grouped = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)  # [b, kv heads, t, d]
    expected = grouped.repeat_interleave(2, dim=1)  # each key/value head serves 2 consecutive query heads
    assert torch.equal(compat.repeat_kv(grouped, 2), expected), "transformers changed repeat_kv: update compat"


# ----------------------------------------------------------------------------- the eager, unwrapped forward
def test_accelerate_still_wraps_forward_in_autocast_and_the_probe_unwraps_it() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 16)
    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer of an earlier test set it up without bf16
    try:
        Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
        if "forward" not in model.__dict__ or not hasattr(model, "_original_forward"):
            pytest.fail("upstream changed: Accelerate no longer wraps forward as _original_forward: update "
                        "compat.without_autocast_wrapper")
        wrapper = model.forward
        with torch.no_grad():
            assert not torch.equal(model(x), reference(x)), "the wrapper runs in fp32: the test proves nothing"
            with compat.without_autocast_wrapper(model):
                torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        assert model.__dict__["forward"] is wrapper
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    plain = torch.nn.Linear(2, 2)
    with compat.without_autocast_wrapper(plain):
        assert "forward" not in plain.__dict__
    assert "forward" not in plain.__dict__


def test_module_compile_still_stores_the_compiled_call_and_the_probe_bypasses_it() -> None:
    model = torch.nn.Linear(2, 2)
    model.compile()  # lazy: nothing compiles until a call
    compiled = model.__dict__.get("_compiled_call_impl")
    if compiled is None:
        pytest.fail("upstream changed: nn.Module.compile() no longer sets _compiled_call_impl: "
                    "update compat.without_compiled_call")
    tracing: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: tracing.append(torch.compiler.is_compiling()))
    with compat.without_compiled_call(model):
        assert model._compiled_call_impl is None
        x = torch.randn(3, 2)
        torch.testing.assert_close(model(x), torch.nn.functional.linear(x, model.weight, model.bias), rtol=0, atol=0)
    assert tracing == [False], "the forward was traced by dynamo: compat.without_compiled_call no longer bypasses it"
    assert model._compiled_call_impl is compiled


# ----------------------------------------------------------------------------- what a model wraps and routes
def test_compile_still_wraps_the_eager_module_as_orig_mod() -> None:
    """Upstream renamed ``OptimizedModule._orig_mod``: update compat.compiled_original."""
    model = tiny_causal_lm("llama")
    compiled = torch.compile(model)
    assert compat.compiled_original(compiled) is model and compat.compiled_original(model) is None


def test_can_set_attn_implementation_still_answers_yes_for_a_model_without_attention() -> None:
    """transformers' private ``_can_set_attn_implementation``: yes for Llama, and (why the source check exists) yes for
    Mamba, which has no attention; the source check tells them apart. A failure says which of the two changed."""
    from transformers import MambaConfig, MambaForCausalLM

    llama = tiny_causal_lm("llama")
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    assert compat.can_set_attention(llama) and compat.can_set_attention(mamba)
    assert any(compat.module_routes_attention(type(m).__module__) for m in llama.modules())
    assert not any(compat.module_routes_attention(type(m).__module__) for m in mamba.modules())


@pytest.mark.parametrize("model_type", sorted(compat.ATTENTION_ROUTED_SINCE))
def test_attention_routed_since_matches_the_installed_transformers(model_type: str) -> None:
    """``ATTENTION_ROUTED_SINCE``: the family dispatches through ``AttentionInterface`` exactly from that release on
    (checked by running it), and the source checks the probe relies on say the same. Red at either end of the tested
    range when the release in the table is wrong."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4)
    model = transformers.AutoModelForCausalLM.from_config(config)
    routed = compat.dispatches_attention(model, torch.randint(0, 64, (1, 5)))
    assert routed == compat.attention_routed_in_installed(model_type), (transformers.__version__, routed)
    assert routed == (compat.can_set_attention(model)
                      and any(compat.module_routes_attention(type(m).__module__) for m in model.modules()))


def test_dispatches_attention_by_running_the_model() -> None:
    """The behavioural check: Llama dispatches; a model with its own attention code and Mamba (none) do not; the
    model's implementation is restored."""
    from transformers import MambaConfig, MambaForCausalLM

    from tests.own_attention import own_attention_lm

    ids = torch.randint(0, 64, (1, 5))
    llama = tiny_causal_lm("llama")
    found = llama.config._attn_implementation
    assert compat.dispatches_attention(llama, ids) and llama.config._attn_implementation == found
    assert not compat.dispatches_attention(own_attention_lm(), ids)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    assert not compat.dispatches_attention(mamba, ids)
