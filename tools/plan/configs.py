"""Built-in HF configs of the models people plan for, so the planner needs no download.

Values are those of the published ``config.json`` files (Meta, Qwen, Mistral AI, DeepSeek, Moonshot AI,
Zhipu AI; MTP layers and FP8 quantisation, which the planned model does not hold, left out); a path to any
HF model directory (or a ``config.json``) of a supported architecture works the same way.
"""
from __future__ import annotations

import os

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="bfloat16")
_MIXTRAL = dict(model_type="mixtral", rms_norm_eps=1e-5, rope_theta=1e6, num_experts_per_tok=2,
                num_local_experts=8, tie_word_embeddings=False, torch_dtype="bfloat16")

_QWEN3 = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
              tie_word_embeddings=False, torch_dtype="bfloat16")
_QWEN3_MOE = dict(_QWEN3, model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[])

_DEEPSEEK_V3 = dict(model_type="deepseek_v3", kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                    hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", num_nextn_predict_layers=0)
_GLM4_MOE = dict(model_type="glm4_moe", vocab_size=151552, head_dim=128, num_attention_heads=96, num_key_value_heads=8,
                 attention_bias=True, rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5),
                 num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                 rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype="bfloat16",
                 num_nextn_predict_layers=0)

BUILTIN: dict[str, dict] = {
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "llama3.1-405b": dict(_LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                          num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-72b": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                        tie_word_embeddings=False, torch_dtype="bfloat16"),
    "mixtral-8x7b": dict(_MIXTRAL, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768),
    "mixtral-8x22b": dict(_MIXTRAL, vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                          num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                          max_position_embeddings=65536),
    "qwen3-8b": dict(_QWEN3, model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "qwen3-32b": dict(_QWEN3, model_type="qwen3", hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8),
    "qwen3-30b-a3b": dict(_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4),
    "qwen3-235b-a22b": dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4),
    "qwen2-57b-a14b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=3584, intermediate_size=18944,
                           moe_intermediate_size=2560, shared_expert_intermediate_size=20480, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                           norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                           tie_word_embeddings=False, torch_dtype="bfloat16"),
    "deepseek-v3": dict(_DEEPSEEK_V3, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
                        routed_scaling_factor=2.5, rms_norm_eps=1e-6, max_position_embeddings=163840,
                        rope_scaling=dict(type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
    "moonlight-16b-a3b": dict(_DEEPSEEK_V3, vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                              moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                              num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
                              num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
                              routed_scaling_factor=2.446, rms_norm_eps=1e-5, max_position_embeddings=8192,
                              rope_theta=50000.0),
    "glm-4.5": dict(_GLM4_MOE, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                    num_hidden_layers=92, n_routed_experts=160, first_k_dense_replace=3, routed_scaling_factor=2.5,
                    use_qk_norm=True),
    "glm-4.5-air": dict(_GLM4_MOE, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                        num_hidden_layers=46, n_routed_experts=128, first_k_dense_replace=1, routed_scaling_factor=1.0,
                        use_qk_norm=False),
}


def load_hf_config(model: str):
    """An HF config from a built-in name, a model directory or a ``config.json`` path."""
    from transformers import AutoConfig

    if model in BUILTIN:
        fields = dict(BUILTIN[model])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if not os.path.exists(model):
        raise ValueError(f"--model {model!r} is neither a built-in ({', '.join(BUILTIN)}) nor a path")
    path = os.path.dirname(model) if model.endswith(".json") else model
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model}: cannot read an HF config: {exc}") from exc
