"""What an architecture adapter can say beyond its weight map, and that the builder and the weight
walker honour it: layer-spec options (qk-norm, mixed dense / MoE layers per pipeline stage), spec
params reaching the core attention, persistent buffers walked with the parameters, and Mistral's
sliding window refused rather than attended in full."""
from __future__ import annotations

import pytest
import torch

from engine.runtime.schedule import check_attention_span
from models.adapter import LayerSpecOptions
from models.splits import Split
from tests.dist_harness import run_distributed


def _build(rank, world_size, path, pp, qk_layernorm, moe_layers, stride):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from models.builder import ModelBuildConfig, build_model
    from models.mixtral import MixtralAdapter
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    class HookedAdapter(MixtralAdapter):
        def layer_spec_options(self):
            return LayerSpecOptions(num_experts=self.num_experts, qk_layernorm=qk_layernorm, moe_layers=moe_layers)

    config = ParallelConfig(pipeline_model_parallel_size=pp)
    initialize_parallel(config, seed=0)
    adapter = HookedAdapter(load_adapter(path).hf_config)
    model = build_model(adapter, config, ModelBuildConfig(ring_head_stride=stride))
    layers = model.decoder.layers
    return {
        "moe": [isinstance(layer.mlp, MoELayer) for layer in layers],
        "qk_norm": [getattr(layer.self_attention, "q_layernorm", None) is not None for layer in layers],
        "stride": {layer.self_attention.core_attention.ring_head_stride for layer in layers},
    }


@pytest.mark.parametrize("pp", [1, 2])
def test_layer_spec_options_reach_every_stage(tiny_models, pp):
    pattern = (True, False, False, True)  # the tiny Mixtral has four layers
    results = run_distributed(_build, pp, args=(tiny_models["mixtral"], pp, True, pattern, 2), timeout=300)
    per_stage = len(pattern) // pp
    for stage, result in enumerate(results):
        assert result["moe"] == list(pattern[stage * per_stage:(stage + 1) * per_stage])
        assert all(result["qk_norm"]) and result["stride"] == {2}


def _load_with_extra_buffer(rank, world_size, path):
    from models.builder import build_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights, named_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    adapter = load_adapter(path)
    model = build_model(adapter, ParallelConfig())
    # A persistent buffer the weight map does not know (like a router's expert_bias).
    model.decoder.layers[0].mlp.register_buffer("expert_bias", torch.zeros(4))
    model.decoder.layers[0].mlp.register_buffer("scratch", torch.zeros(1), persistent=False)
    names = [name for name, _ in named_weights(model)]
    try:
        load_hf_weights(model, adapter, path)
    except KeyError as err:
        return names, str(err)
    return names, None


def test_buffers_are_walked_with_the_parameters(tiny_models):
    (names, error), = run_distributed(_load_with_extra_buffer, 1, args=(tiny_models["llama"],), timeout=300)
    assert "decoder.layers.0.mlp.expert_bias" in names and "decoder.layers.0.mlp.scratch" not in names
    assert error is not None and "mlp.expert_bias" in error  # loud, not silently skipped


def test_split_strategies_are_named_objects():
    assert [repr(s) for s in (Split.REPLICATED, Split.ROW, Split.VOCAB, Split.QKV, Split.GATE_UP)] == [
        "Split.REPLICATED", "Split.ROW", "Split.VOCAB", "Split.QKV", "Split.GATE_UP"]
    assert not Split.REPLICATED.gathered and Split.QKV.gathered


def test_mistral_sliding_window_is_enforced(tmp_path):
    from models.registry import load_adapter
    from models.tiny import build_tiny_model

    windowed = load_adapter(build_tiny_model("mistral", tmp_path / "w", sliding_window=8))
    assert windowed.max_attention_span == 8
    assert load_adapter(build_tiny_model("mistral", tmp_path / "full")).max_attention_span is None
    check_attention_span({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, 8)
    with pytest.raises(ValueError, match=r"12 tokens is longer than the model's sliding attention window \(8\).*--max_len 8"):
        check_attention_span({"input_ids": torch.zeros(2, 12, dtype=torch.long)}, 8)
    packed = {"input_ids": torch.zeros(1, 14, dtype=torch.long), "cu_seqlens": torch.tensor([0, 7, 14])}
    check_attention_span(packed, 8)  # two samples of 7 in one packed row: each within the window
    with pytest.raises(ValueError, match="sliding attention window"):
        check_attention_span({**packed, "cu_seqlens": torch.tensor([0, 2, 14])}, 8)
