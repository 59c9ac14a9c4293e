"""Qwen3-MoE: Qwen3 attention (qk-norm, explicit head_dim) with top-k routed SwiGLU experts.

Routing as HF's ``Qwen3MoeTopKRouter``: softmax over all experts, top-k, then renormalised over
the k when ``norm_topk_prob`` (Megatron's top-k then softmax, ``moe_router_pre_softmax=False``) or
not (the plain top-k of the full softmax: ``moe_router_pre_softmax=True``). Layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` stride are dense SwiGLU MLPs of
``intermediate_size`` (``is_moe_layer``); experts have ``moe_intermediate_size``. Names are the
on-disk ones (``mlp.gate``, ``mlp.experts.{i}.gate_proj``...), not transformers 5's fused
in-memory experts. ``--aux_loss_coef`` is HF's ``aux_loss`` (``models.moe_aux``: the same
``load_balancing_loss_func`` as Mixtral's, pooled over the MoE layers only).
"""
from models.adapter import Split, WeightSpec
from models.qwen3 import Qwen3Adapter


class QwenMoeLayout:
    """The MoE layout Qwen2-MoE and Qwen3-MoE share (a mixin before a ``ModelAdapter``)."""

    hf_config: object

    @property
    def num_experts(self) -> int | None:
        return self.hf_config.num_experts or None

    @property
    def expert_ffn_hidden_size(self) -> int | None:
        return self.hf_config.moe_intermediate_size if self.num_experts else None

    def is_moe_layer(self, layer: int) -> bool:
        # HF's Qwen{2,3}MoeDecoderLayer, verbatim.
        c = self.hf_config
        return (layer not in (c.mlp_only_layers or ())) and bool(self.num_experts) and (
            (layer + 1) % c.decoder_sparse_step == 0)

    @property
    def lora_expert_names_mean_experts_only(self) -> bool:
        # PEFT 0.21 maps qwen2_moe / qwen3_moe's gate_proj / up_proj / down_proj onto the fused experts only.
        return bool(self.num_experts)

    def moe_routing_kwargs(self) -> dict:
        return {"moe_router_pre_softmax": not self.hf_config.norm_topk_prob} if self.num_experts else {}

    def mlp_specs(self) -> list[WeightSpec]:
        if not self.num_experts:
            return self.dense_mlp_specs()
        return [WeightSpec("mlp.router.weight", ("model.layers.{layer}.mlp.gate.weight",), Split.REPLICATED)]

    def expert_specs(self) -> list[WeightSpec]:
        p = "model.layers.{layer}.mlp.experts.{expert}."
        return [
            WeightSpec("linear_fc1.weight", (p + "gate_proj.weight", p + "up_proj.weight"), Split.GATE_UP),
            WeightSpec("linear_fc2.weight", (p + "down_proj.weight",), Split.ROW),
        ]


class Qwen3MoeAdapter(QwenMoeLayout, Qwen3Adapter):
    model_types = ("qwen3_moe",)
    hf_causal_lm_class = "Qwen3MoeForCausalLM"

    def transformer_config_kwargs(self) -> dict:
        return {**super().transformer_config_kwargs(), **self.moe_routing_kwargs()}
