"""Uneven pipeline stages (``--decoder_first_pipeline_num_layers`` / ``--decoder_last_pipeline_num_layers``,
megatron-core's ``num_layers_in_first/last_pipeline_stage``): what DeepSeek-V3's 61 layers need at PP=16.

Tiny 3-layer Llama and DeepSeek-V3 (layer 0 dense, MoE layers 1-2) at PP=2 split 1+2 and 2+1 give HF's logits
(padded and packed); a conversion written at one split and exported at the other round-trips bit-exact (the
checkpoint reshards by global layer ids; the export streams each stage's layers under their HF ids, as the
weight sync does); sizes that do not add up are refused naming the flags.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

ATOL = 1e-4  # fp32
FIRST_ONE = {"decoder_first_pipeline_num_layers": 1}  # 1 + 2
LAST_ONE = {"decoder_last_pipeline_num_layers": 1}  # 2 + 1
LAYOUTS = (("pp2_1+2", 1, 2, 1, 1, FIRST_ONE), ("pp2_2+1", 1, 2, 1, 1, LAST_ONE))


@pytest.fixture(scope="module")
def three_layer_models(tmp_path_factory) -> dict[str, str]:
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("uneven")
    return {"llama": build_tiny_model("llama", root / "llama", seed=6, num_hidden_layers=3),
            "deepseek_v3": build_tiny_model("deepseek_v3", root / "deepseek_v3", seed=7, init_std=0.1,
                                            num_hidden_layers=3)}


def test_logits_equal_hf_with_uneven_pipeline_stages(three_layer_models):
    """3 layers do not split evenly over 2 stages: equality shows each stage built and loaded its own layers."""
    from tests.test_deepseek_v3 import _hf_logits, _logits_in_layouts

    per_rank = run_distributed(_logits_in_layouts, 2, args=(three_layer_models, LAYOUTS), timeout=300)
    merged = {key: value for result in per_rank for key, value in result.items()}
    assert set(merged) == {(layout[0], arch) for layout in LAYOUTS for arch in three_layer_models}
    for arch, path in three_layer_models.items():
        expected = _hf_logits(path)
        for layout in LAYOUTS:
            for kind in ("padded", "packed"):
                torch.testing.assert_close(merged[(layout[0], arch)][kind], expected[kind], atol=ATOL, rtol=0,
                                           msg=f"{arch} {layout[0]} {kind}")


def _flags(split: dict) -> list[str]:
    return [arg for flag, value in split.items() for arg in (f"--{flag}", str(value))]


def test_conversion_round_trips_across_uneven_splits(three_layer_models, tmp_path):
    """HF -> Megatron at 1+2 -> HF exported at 2+1: every tensor bit-exact (DeepSeek-V3: a dense layer, then MoE
    layers, so a layer id off by a stage's offset shows in the names and in the shapes)."""
    from tests.test_convert import _convert, _tensors

    source, mcore, exported = three_layer_models["deepseek_v3"], tmp_path / "mcore", tmp_path / "hf"
    pp2 = ["--pipeline_model_parallel_size", "2"]
    _convert("tools.convert.hf_to_mcore", "--hf_path", source, "--save_path", str(mcore), *pp2, *_flags(FIRST_ONE))
    _convert("tools.convert.mcore_to_hf", "--load_path", str(mcore), "--save_path", str(exported), *pp2,
             *_flags(LAST_ONE))
    original, roundtrip = _tensors(source), _tensors(str(exported))
    assert sorted(roundtrip) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(roundtrip[name], tensor), name


@pytest.mark.parametrize("sizes,num_layers,message", [
    (dict(pipeline_model_parallel_size=2), 3, r"--pipeline_model_parallel_size \(2\) must divide the number of "
     r"layers \(3\) \(or set the uneven split: --decoder_first_pipeline_num_layers / --decoder_last_pipeline_num_layers"),
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=2), 3,
     r"--decoder_first_pipeline_num_layers \(2\) \+ --decoder_last_pipeline_num_layers \(2\) must add up to the "
     r"number of layers \(3\)"),
    (dict(pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=2), 9,
     r"--decoder_first_pipeline_num_layers \(2\) leaves 7 of the 9 layers for the 3 other pipeline stage\(s\)"),
    (dict(pipeline_model_parallel_size=16, decoder_first_pipeline_num_layers=3, decoder_last_pipeline_num_layers=4),
     61, r"leave 54 of the 61 layers for the 14 other"),
])
def test_uneven_sizes_that_do_not_add_up_are_refused_naming_the_flags(sizes, num_layers, message):
    from parallel.config import ParallelConfig

    with pytest.raises(ValueError, match=message):
        ParallelConfig(**sizes).validate_model(num_layers=num_layers, num_attention_heads=4, num_query_groups=2)


def test_uneven_split_is_megatron_cores():
    """The split the planner and the weight map count is the one megatron-core builds (DeepSeek-V3 at PP=16)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from parallel.config import ParallelConfig

    parallel = ParallelConfig(pipeline_model_parallel_size=16, decoder_first_pipeline_num_layers=3,
                              decoder_last_pipeline_num_layers=2)
    config = TransformerConfig(num_layers=61, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=16,
                               pipeline_dtype=torch.float32, num_layers_in_first_pipeline_stage=3,
                               num_layers_in_last_pipeline_stage=2)
    assert parallel.stage_num_layers(61) == [get_num_layers_to_build(config, pp_rank=k) for k in range(16)]
    assert parallel.stage_layer_offsets(61) == [get_transformer_layer_offset(config, pp_rank=k) for k in range(16)]
    assert parallel.stage_num_layers(61) == [3, *[4] * 14, 2]


def test_role_flags_are_refused_as_typed():
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    with pytest.raises(OptionError, match=r"--actor_decoder_last_pipeline_num_layers needs "
                                          r"--actor_pipeline_model_parallel_size > 1"):
        train_ppo_ray.parse_args(["--pretrain", "m", "--prompt_data", "p.jsonl",
                                  "--actor_decoder_last_pipeline_num_layers", "2"])
