"""GLM-4.5 / GLM-4.5-Air (``model_type`` glm4_moe): GQA attention with DeepSeek-V3's sigmoid-routed MoE.

Attention is Llama's fused q/k/v (``ModelAdapter``) with q/k/v biases when ``attention_bias``, per-head
q/k RMSNorms before rotary when ``use_qk_norm`` (megatron-core's ``qk_layernorm``, HF ``self_attn.q_norm /
k_norm``), an explicit ``head_dim`` and partial rotary: HF rotates the first ``head_dim x
partial_rotary_factor`` dims of each head as halves and passes the rest, which is megatron-core's
``rotary_percent`` (``GPTModel``) with its default, non-interleaved layout.

The MoE is ``models.deepseek_v3.SigmoidRoutedMoe`` unchanged (HF's ``Glm4MoeTopkRouter`` is DeepSeek-V3's
``noaux_tc`` router): dense layers before ``first_k_dense_replace``, sigmoid scores plus the
``e_score_correction_bias`` buffer for the choice, group-limited top-k, renormalised weights times
``routed_scaling_factor``, ``n_shared_experts`` shared experts. MTP layers (``num_nextn_predict_layers``:
HF layer ``num_hidden_layers`` + i, which HF's model drops on load) are carried through conversion and
export unchanged and never trained.
"""
from __future__ import annotations

from models.adapter import ModelAdapter
from models.deepseek_v3 import SigmoidRoutedMoe


class Glm4MoeAdapter(SigmoidRoutedMoe, ModelAdapter):
    model_types = ("glm4_moe",)
    hf_causal_lm_class = "Glm4MoeForCausalLM"

    def _check_supported(self) -> None:
        c, rope = self.hf_config, self.rope_parameters
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"glm4_moe: rope_scaling type {rope.get('rope_type')!r} is not supported (default)")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"glm4_moe: hidden_act {c.hidden_act!r} is not supported (silu)")
        if int(self.attention.head_dim * self.partial_rotary_factor) % 2:  # both truncate to int, HF then halves
            raise ValueError(f"glm4_moe: partial_rotary_factor {self.partial_rotary_factor} x head_dim "
                             f"{self.attention.head_dim} is not an even number of rotary dims")
        if self.num_experts:
            self._check_router()

    @property
    def partial_rotary_factor(self) -> float:
        # HF's rotary reads it from rope_parameters (the config attribute may hold a stale default).
        return float(self.rope_parameters.get("partial_rotary_factor",
                                              getattr(self.hf_config, "partial_rotary_factor", 1.0)))

    @property
    def qkv_bias(self) -> bool:
        return bool(self.hf_config.attention_bias)

    @property
    def qk_layernorm(self) -> bool:
        return bool(self.hf_config.use_qk_norm)

    def transformer_config_kwargs(self) -> dict:
        kwargs = super().transformer_config_kwargs()
        if self.num_experts:
            kwargs.update(self._router_kwargs())
        return kwargs

    def gpt_model_kwargs(self) -> dict:
        return {**super().gpt_model_kwargs(), "rotary_percent": self.partial_rotary_factor}
