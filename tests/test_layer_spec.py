"""Which layer spec builds the decoder (models/layer_spec.py), for each machine it may run on, and
what the choice means for the norms and for the HF <-> Megatron names."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from models.adapter import LayerSpecOptions
from models.layer_spec import block_spec, choose_layer_spec
from models.norms import LocalNorm
from tests.dist_harness import run_distributed


def test_transformer_engine_with_cuda_takes_the_te_spec_and_its_fused_norm_names():
    choice = choose_layer_spec("auto", te_available=True, on_cuda=True)
    assert choice.impl == "transformer_engine" and choice.norm_module == "TENorm"
    assert choice.layer_norm_names(moe=False) == {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    }
    # TE's MoE layers keep their own pre-MLP norm (the experts' linears have none to fuse).
    assert choice.layer_norm_names(moe=True)["pre_mlp_layernorm.weight"] == "pre_mlp_layernorm.weight"


@pytest.mark.parametrize("te_available,on_cuda,apex_available", [
    (False, True, False), (False, True, True), (True, False, False), (False, False, True),
], ids=["cuda_no_te", "cuda_apex_no_te", "te_no_cuda", "cpu"])
def test_without_te_and_cuda_the_local_spec_with_our_norm(te_available, on_cuda, apex_available):
    choice = choose_layer_spec("auto", te_available=te_available, on_cuda=on_cuda, apex_available=apex_available)
    assert choice.impl == "local" and choice.norm_module == "LocalNorm"
    assert choice.layer_norm_names(moe=False) == {n: n for n in ("input_layernorm.weight", "pre_mlp_layernorm.weight")}


def test_forcing_an_implementation():
    assert choose_layer_spec("local", te_available=True, on_cuda=True).impl == "local"
    assert choose_layer_spec("transformer_engine", te_available=True, on_cuda=True).impl == "transformer_engine"
    with pytest.raises(ValueError, match="--transformer_impl transformer_engine needs Transformer Engine"):
        choose_layer_spec("transformer_engine", te_available=False, on_cuda=True)
    with pytest.raises(ValueError, match="--transformer_impl transformer_engine needs CUDA"):
        choose_layer_spec("transformer_engine", te_available=True, on_cuda=False)
    with pytest.raises(ValueError, match="--transformer_impl must be one of auto, local, transformer_engine"):
        choose_layer_spec("te", te_available=True, on_cuda=True)


def _modules(spec) -> list[type]:
    """Every module class a (nested) spec would build."""
    if isinstance(spec, type):
        return [spec]
    if isinstance(spec, ModuleSpec):
        return [spec.module, *_modules(spec.submodules)]
    if dataclasses.is_dataclass(spec):
        return [m for f in dataclasses.fields(spec) for m in _modules(getattr(spec, f.name))]
    if isinstance(spec, (list, tuple)):
        return [m for item in spec for m in _modules(item)]
    return []


def test_local_block_spec_never_uses_megatrons_torch_or_apex_norms():
    """With Apex and no TE, Megatron's LayerNormImpl is Apex's FusedLayerNorm (asserts LayerNorm):
    the block spec names its final norm itself, for uniform and for mixed dense / MoE stages."""
    choice = choose_layer_spec("auto", te_available=False, on_cuda=True, apex_available=True)
    options = LayerSpecOptions(num_experts=4, qk_layernorm=True)
    block = block_spec(choice, options, layer_is_moe=[True, False, False, True], normalization="RMSNorm",
                       ring_head_stride=2)
    modules = _modules(block)
    assert block.layer_norm is LocalNorm
    assert FusedLayerNorm not in modules and WrappedTorchNorm not in modules
    for layer in block.layer_specs:
        sub = layer.submodules
        assert sub.input_layernorm is sub.pre_mlp_layernorm is LocalNorm
        assert sub.self_attention.submodules.q_layernorm is sub.self_attention.submodules.k_layernorm is LocalNorm
        assert sub.self_attention.submodules.core_attention.params == {"ring_head_stride": 2}
    moe, dense = block.layer_specs[0].submodules, block.layer_specs[1].submodules
    # Checkpoint keys as TE's spec writes them: dense norms fused, MoE pre-MLP norm separate.
    assert dense.sharded_state_dict_keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                                 "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert moe.sharded_state_dict_keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_te_norm_names_resolve_to_the_hf_norms(arch, tiny_models):
    from models.registry import load_adapter

    adapter = load_adapter(tiny_models[arch])
    moe = arch == "mixtral"
    names = choose_layer_spec("auto", te_available=True, on_cuda=True).layer_norm_names(moe=moe)
    hf_names = {}
    for local, megatron in names.items():
        spec, index = adapter.resolve(f"decoder.layers.1.{megatron}", layer_offset=2, expert_offset=0)
        hf_names[local] = spec.hf[0].format(**index)
    assert hf_names == {"input_layernorm.weight": "model.layers.3.input_layernorm.weight",
                        "pre_mlp_layernorm.weight": "model.layers.3.post_attention_layernorm.weight"}


def _load_checkpoints_missing_entries(rank, world_size, path, root):
    from megatron.core.dist_checkpointing import ShardedObject

    from models.builder import build_model
    from models.hf_checkpoint import CheckpointError
    from models.mcore_checkpoint import load_model, save_sharded
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    adapter = load_adapter(path)
    saved = build_model(adapter, ParallelConfig())
    full = saved.sharded_state_dict()
    # As the other layer spec writes it: TE's norms carry an extra state the local norms do not.
    no_extra = {k: v for k, v in full.items() if not isinstance(v, ShardedObject)}
    no_norm = {k: v for k, v in full.items() if k != "decoder.final_layernorm.weight"}
    for name, sharded in (("no_extra", no_extra), ("no_norm", no_norm)):
        save_sharded({"model": sharded}, f"{root}/{name}", adapter=adapter, hf_source_dir=path,
                     padded_vocab_size=saved.vocab_size)
    initialize_parallel(ParallelConfig(), seed=1)  # other random weights until loaded
    loaded = build_model(adapter, ParallelConfig())
    load_model(loaded, f"{root}/no_extra")
    same = all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values())
               if torch.is_tensor(a))
    try:
        load_model(loaded, f"{root}/no_norm")
        error = None
    except CheckpointError as exc:
        error = str(exc)
    return len(full) - len(no_extra), same, error


def test_megatron_checkpoints_without_module_extra_states_load(tiny_models, tmp_path):
    ((num_extra, same, error),) = run_distributed(
        _load_checkpoints_missing_entries, 1, args=(tiny_models["llama"], str(tmp_path)), timeout=300)
    assert num_extra > 0 and same
    assert error is not None and "decoder.final_layernorm.weight" in error
