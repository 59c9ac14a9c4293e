"""A Moonlight-16B-A3B-style checkpoint: ``model_type: deepseek_v3`` plus ``auto_map`` to DeepSeek's remote code.

Its config.json is read by transformers' own ``DeepseekV3Config`` (the model type is local, so no
``trust_remote_code`` is asked for and the remote modules are never imported: here they raise if they are);
the extra keys of DeepSeek's code (``aux_loss_alpha``, ``seq_aux``, ``moe_layer_freq`` 1, ``pretraining_tp``,
``ep_size``) are carried and ignored, as transformers ignores them. With Moonlight's values where they differ
from DeepSeek-V3 (no q LoRA rank, one group, top-6 with two shared experts, ``routed_scaling_factor`` 2.446,
``rms_norm_eps`` 1e-5, ``rope_theta`` 50000 with ``rope_scaling: null``) the model gives HF's logits at EP=2,
converts and exports bit-exact, and the export keeps the remote-code files its ``auto_map`` names. vLLM's
config parser takes it with ``trust_remote_code=False``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed

ATOL = 1e-4  # fp32
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
#: Moonlight-16B-A3B's config.json keys that transformers' DeepseekV3Config does not define or writes otherwise.
MOONLIGHT_KEYS = {"auto_map": AUTO_MAP, "aux_loss_alpha": 0.001, "seq_aux": True, "moe_layer_freq": 1,
                  "pretraining_tp": 1, "ep_size": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                  "rope_scaling": None, "rope_theta": 50000.0, "architectures": ["DeepseekV3ForCausalLM"]}
REMOTE_CODE = 'raise RuntimeError("remote code was imported")\n'


@pytest.fixture(scope="module")
def moonlight(tmp_path_factory) -> str:
    from models.tiny import build_tiny_model

    path = build_tiny_model("deepseek_v3", tmp_path_factory.mktemp("moonlight") / "model", seed=8, init_std=0.1,
                            q_lora_rank=None, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=6,
                            n_shared_experts=2, routed_scaling_factor=2.446, rms_norm_eps=1e-5,
                            first_k_dense_replace=1,
                            rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    for key in ("rope_parameters", "rope_interleave"):  # Moonlight's file has neither (HF's default: interleaved)
        config.pop(key, None)
    file.write_text(json.dumps({**config, **MOONLIGHT_KEYS}, indent=2))
    for module in ("configuration_deepseek", "modeling_deepseek"):
        (Path(path) / f"{module}.py").write_text(REMOTE_CODE)
    return path


def test_config_loads_with_transformers_own_class(moonlight):
    from transformers import DeepseekV3Config

    from models.registry import load_adapter

    adapter = load_adapter(moonlight)
    c = adapter.hf_config
    assert type(c) is DeepseekV3Config
    assert (c.q_lora_rank, c.n_group, c.topk_group, c.num_experts_per_tok) == (None, 1, 1, 6)
    assert adapter.rope_parameters["rope_theta"] == 50000.0 and c.rope_interleave
    assert c.moe_layer_freq == 1 and c.auto_map == AUTO_MAP


def test_logits_equal_hf_at_expert_parallel_2(moonlight):
    from tests.test_deepseek_v3 import _hf_logits, _logits_in_layouts

    per_rank = run_distributed(_logits_in_layouts, 2, args=({"moonlight": moonlight}, (("ep2", 1, 1, 1, 2),)),
                               timeout=300)
    merged = {key: value for result in per_rank for key, value in result.items()}
    expected = _hf_logits(moonlight)
    for kind in ("padded", "packed"):
        torch.testing.assert_close(merged[("ep2", "moonlight")][kind], expected[kind], atol=ATOL, rtol=0, msg=kind)


def test_conversion_round_trips_and_export_keeps_the_remote_code_files(moonlight, tmp_path):
    from tests.test_convert import _convert, _tensors

    mcore, exported = tmp_path / "mcore", tmp_path / "hf"
    _convert("tools.convert.hf_to_mcore", "--hf_path", moonlight, "--save_path", str(mcore),
             "--expert_model_parallel_size", "2")
    _convert("tools.convert.mcore_to_hf", "--load_path", str(mcore), "--save_path", str(exported))
    original, roundtrip = _tensors(moonlight), _tensors(str(exported))
    assert sorted(roundtrip) == sorted(original)
    assert all(torch.equal(roundtrip[name], tensor) for name, tensor in original.items())
    assert json.loads((exported / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (exported / "configuration_deepseek.py").read_text() == REMOTE_CODE


def _vllm_config(_rank, _world, path):
    from vllm.transformers_utils.config import get_config

    config = get_config(path, trust_remote_code=False)
    return type(config).__name__, config.n_group, config.q_lora_rank


def test_vllm_reads_the_config_without_remote_code(moonlight):
    assert run_distributed(_vllm_config, 1, args=(moonlight,), timeout=300)[0] == ("DeepseekV3Config", 1, None)
