"""Mixtral: Mistral attention with a top-k mixture of SwiGLU experts in every layer.

Names follow the on-disk (safetensors) layout ``block_sparse_moe.experts.{i}.w1/w2/w3`` that
users share and vLLM loads, not transformers 5's fused in-memory parameters.
"""
from models.adapter import Split, WeightSpec
from models.mistral import MistralAdapter


class MixtralAdapter(MistralAdapter):
    model_types = ("mixtral",)
    hf_causal_lm_class = "MixtralForCausalLM"

    @property
    def num_experts(self) -> int:
        return self.hf_config.num_local_experts

    def transformer_config_kwargs(self) -> dict:
        return {
            **super().transformer_config_kwargs(),
            # Mixtral: softmax over all experts, top-k, renormalise == Megatron's top-k then softmax.
            "moe_router_pre_softmax": False,
        }

    def mlp_specs(self) -> list[WeightSpec]:
        gate = "model.layers.{layer}.block_sparse_moe.gate.weight"
        return [WeightSpec("mlp.router.weight", (gate,), Split.REPLICATED)]

    def expert_specs(self) -> list[WeightSpec]:
        p = "model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return [
            WeightSpec("linear_fc1.weight", (p + "w1.weight", p + "w3.weight"), Split.GATE_UP),
            WeightSpec("linear_fc2.weight", (p + "w2.weight",), Split.ROW),
        ]
