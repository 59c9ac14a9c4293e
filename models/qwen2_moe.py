"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases, ``qkv_bias``) with
top-k routed experts (``models.qwen3_moe.QwenMoeLayout``: ``norm_topk_prob``, dense layers by
``decoder_sparse_step`` / ``mlp_only_layers``) plus an always-on shared expert whose output is
scaled by ``sigmoid(shared_expert_gate(x))`` -- megatron-core's ``SharedExpertMLP`` with
``moe_shared_expert_gate``."""
from models.adapter import ModelAdapter, WeightSpec, shared_expert_weight_specs
from models.qwen3 import refuse_qwen_attention_options
from models.qwen3_moe import QwenMoeLayout


class Qwen2MoeAdapter(QwenMoeLayout, ModelAdapter):
    model_types = ("qwen2_moe",)
    hf_causal_lm_class = "Qwen2MoeForCausalLM"

    def _check_supported(self) -> None:
        super()._check_supported()
        refuse_qwen_attention_options(self.hf_config)

    @property
    def qkv_bias(self) -> bool:
        return bool(getattr(self.hf_config, "qkv_bias", True))

    @property
    def shared_expert_intermediate_size(self) -> int | None:
        return (self.hf_config.shared_expert_intermediate_size or None) if self.num_experts else None

    @property
    def shared_expert_gate(self) -> bool:
        return True

    def shared_expert_specs(self) -> list[WeightSpec]:
        if not self.shared_expert_intermediate_size:
            return []
        p = "model.layers.{layer}.mlp."
        return shared_expert_weight_specs(p + "shared_expert.", gate=p + "shared_expert_gate.weight")

    def transformer_config_kwargs(self) -> dict:
        return {**super().transformer_config_kwargs(), **self.moe_routing_kwargs()}
