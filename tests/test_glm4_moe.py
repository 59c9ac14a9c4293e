"""GLM-4.5 (issue 30, ``models/glm4_moe.py``): GQA with partial rotary, q/k/v biases and qk-norm plus
DeepSeek-V3's sigmoid-routed MoE give HF transformers' logits (fp32) at one process, TP=2, PP=2, CP=2
and EP=2, padded and packed; the HF <-> Megatron conversion round-trips bit-exact (an MTP layer
carried unchanged) and the export loads in transformers with identical logits.

Two tiny models from transformers' own ``Glm4MoeConfig`` (``models.tiny``): "glm" has 20-dim heads (!=
hidden 48 / 4 heads) half rotated, q/k/v biases, qk-norm, layer 0 dense and group-limited routing
(2 groups) with a random ``e_score_correction_bias``; "air" is GLM-4.5-Air's shape of the same: no
biases, no qk-norm, one group, two dense layers, 8 of each head's 20 dims rotated.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_deepseek_v3 import ATOL, _add_mtp_layer, _hf_logits, _logits_in_layouts, assert_moe_lora_equals_peft

#: (name, TP, PP, CP, EP) on 2 ranks; "one": data parallel only, each rank the single-process model.
LAYOUTS = (("one", 1, 1, 1, 1), ("tp2", 2, 1, 1, 1), ("pp2", 1, 2, 1, 1), ("cp2", 1, 1, 2, 1), ("ep2", 1, 1, 1, 2))


@pytest.fixture(scope="module")
def glm_models(tmp_path_factory) -> dict[str, str]:
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("glm4_moe")
    return {
        "glm": build_tiny_model("glm4_moe", root / "glm", seed=6, init_std=0.1),
        "air": build_tiny_model("glm4_moe", root / "air", seed=7, init_std=0.1, attention_bias=False,
                                use_qk_norm=False, n_group=1, topk_group=1, first_k_dense_replace=2,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "partial_rotary_factor": 0.4}),
    }


def test_logits_equal_hf_at_one_process_tp_pp_cp_and_ep(glm_models):
    per_rank = run_distributed(_logits_in_layouts, 2, args=(glm_models, LAYOUTS), timeout=600)
    merged = {key: value for result in per_rank for key, value in result.items()}
    assert set(merged) == {(layout[0], arch) for layout in LAYOUTS for arch in glm_models}
    for arch, path in glm_models.items():
        expected = _hf_logits(path)
        for layout in LAYOUTS:
            for kind in ("padded", "packed"):
                torch.testing.assert_close(merged[(layout[0], arch)][kind], expected[kind], atol=ATOL, rtol=0,
                                           msg=f"{arch} {layout[0]} {kind}")


def test_conversion_round_trips_bit_exact_and_exports_load_in_hf(glm_models, tmp_path):
    """HF -> Megatron (TP=2 x EP=2, with an MTP layer) -> HF at one rank: every tensor bit-exact (the
    q/k/v biases, q/k norms and router biases included), the MTP layer carried unchanged; transformers
    loads the export with identical logits."""
    import shutil

    from tests.test_convert import _convert, _tensors

    source = str(shutil.copytree(glm_models["glm"], tmp_path / "src"))
    mtp = _add_mtp_layer(source, num_layers=4)
    mcore, exported = tmp_path / "mcore", tmp_path / "hf"
    _convert("tools.convert.hf_to_mcore", "--hf_path", source, "--save_path", str(mcore),
             "--tensor_model_parallel_size", "2", "--expert_model_parallel_size", "2")
    _convert("tools.convert.mcore_to_hf", "--load_path", str(mcore), "--save_path", str(exported))
    original, roundtrip = _tensors(source), _tensors(str(exported))
    assert sorted(roundtrip) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(roundtrip[name], tensor), f"{name} differs"
    for part in ("q_proj.bias", "q_norm.weight", "e_score_correction_bias", "shared_experts.up_proj.weight"):
        assert any(name.endswith(part) for name in original), part
    assert set(mtp) <= set(original)
    logits, expected = _hf_logits(str(exported)), _hf_logits(source)
    assert all(torch.equal(logits[kind], expected[kind]) for kind in expected)


def test_partial_rotary_and_router_bias_change_hf_logits(glm_models, tmp_path):
    """The equalities above can fail: rotating whole heads or zeroing the router bias moves HF's logits by
    far more than the tolerance."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    base = _hf_logits(glm_models["glm"])["padded"]
    full = shutil.copytree(glm_models["glm"], tmp_path / "full")
    config = AutoConfig.from_pretrained(full)
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 1.0}
    config.save_pretrained(full)
    assert (_hf_logits(str(full))["padded"] - base).abs().max() > 20 * ATOL
    unbiased = shutil.copytree(glm_models["glm"], tmp_path / "unbiased")
    tensors = load_file(str(unbiased / "model.safetensors"))
    save_file({n: torch.zeros_like(t) if n.endswith("e_score_correction_bias") else t for n, t in tensors.items()},
              str(unbiased / "model.safetensors"), metadata={"format": "pt"})
    assert (_hf_logits(str(unbiased))["padded"] - base).abs().max() > 20 * ATOL


@pytest.mark.parametrize("field,value,message", [
    ("norm_topk_prob", False, "norm_topk_prob=false is not supported with sigmoid routing"),
    ("num_experts_per_tok", 3, "num_experts_per_tok // topk_group = 3 is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5,
                         "original_max_position_embeddings": 128}, "'yarn' is not supported"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.15},
     "partial_rotary_factor 0.15 x head_dim 20 is not an even number"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
])
def test_unsupported_configs_are_refused_naming_the_field(field, value, message):
    from models.registry import get_adapter
    from models.tiny import tiny_config

    with pytest.raises(ValueError, match=message):
        get_adapter(tiny_config("glm4_moe", 100, **{field: value}))


def test_lora_on_attention_and_experts_equals_peft(glm_models, tmp_path):
    """all-linear LoRA (q/k/v with their biases and qk-norm, partial rotary: Megatron keeps HF's q/k rows, so
    the q/k adapters need no permutation; o_proj; the routed experts) gives HF PEFT's logits at TP=2 and EP=2,
    and the merged export PEFT's (``tests.test_deepseek_v3.assert_moe_lora_equals_peft``)."""
    from models.lora.targets import describe_targets
    from models.registry import load_adapter

    assert describe_targets(load_adapter(glm_models["glm"]), ("all-linear",)) == (
        "LoRA adapters on attention: q_proj k_proj v_proj o_proj; routed experts (a pair per expert): gate_proj "
        "up_proj down_proj; frozen: the routers, the dense MLP of layer 0, the shared experts")
    assert_moe_lora_equals_peft({"glm": (glm_models["glm"], ("all-linear",))}, tmp_path)


def test_router_flags_follow_the_sigmoid_router():
    """GLM's router has DeepSeek-V3's expert bias: --moe_router_bias_update_rate acts, --aux_loss_coef is refused."""
    from models.builder import ModelBuildConfig, check_router_options
    from models.registry import get_adapter
    from models.tiny import tiny_config

    glm = get_adapter(tiny_config("glm4_moe", 100))
    check_router_options(ModelBuildConfig(moe_router_bias_update_rate=0.01), glm)
    with pytest.raises(ValueError, match=r"--aux_loss_coef 0.01: HF's glm4_moe defines no load-balancing loss"):
        check_router_options(ModelBuildConfig(aux_loss_coef=0.01), glm)
