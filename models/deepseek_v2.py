"""DeepSeek-V2 / V2.5 (``model_type`` deepseek_v2): DeepSeek-V3's layout (``models.deepseek_v3``: latent
attention, dense first layers, shared experts, the same HF names) with V2's router: softmax over all
experts, the top-k scores taken as they are (never renormalised) times ``routed_scaling_factor`` --
megatron-core's softmax-before-top-k -- and no expert bias. ``topk_method: group_limited_greedy`` scores
a group by its best expert, which megatron-core's group-limited routing does when ``num_experts_per_tok
// topk_group`` is 1; other ratios are refused. The rotary dims are complex pairs, which is MLA's
interleaved layout."""
from __future__ import annotations

from models.adapter import Split, WeightSpec
from models.deepseek_v3 import DeepseekV3Adapter


class DeepseekV2Adapter(DeepseekV3Adapter):
    model_types = ("deepseek_v2",)
    hf_causal_lm_class = "DeepseekV2ForCausalLM"

    def _check_router(self) -> None:
        c = self.hf_config
        if c.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"deepseek_v2: topk_method {c.topk_method!r} is not supported "
                             "(greedy, group_limited_greedy)")
        if getattr(c, "mlp_bias", False):
            raise ValueError("deepseek_v2: mlp_bias=true is not supported (the experts have no biases in megatron-core)")
        if self._group_limited and c.num_experts_per_tok // c.topk_group != 1:
            raise ValueError(
                f"deepseek_v2: group_limited_greedy with num_experts_per_tok // topk_group = "
                f"{c.num_experts_per_tok // c.topk_group} is not supported: HF scores a group by its best expert, "
                "megatron-core by its top num_experts_per_tok // topk_group")

    @property
    def _group_limited(self) -> bool:
        return self.hf_config.topk_method == "group_limited_greedy" and super()._group_limited

    def _router_kwargs(self) -> dict:
        c = self.hf_config
        kwargs = dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                      moe_router_topk_scaling_factor=float(c.routed_scaling_factor))
        if self._group_limited:
            kwargs.update(moe_router_num_groups=c.n_group, moe_router_group_topk=c.topk_group)
        return kwargs

    def mlp_specs(self) -> list[WeightSpec]:
        if not self.num_experts:
            return self.dense_mlp_specs()
        return [WeightSpec("mlp.router.weight", ("model.layers.{layer}.mlp.gate.weight",), Split.REPLICATED)]
