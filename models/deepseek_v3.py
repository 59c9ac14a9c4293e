"""DeepSeek-V3 (and Kimi-K2, Moonlight: ``model_type`` deepseek_v3): multi-head latent attention and a
sigmoid-routed mixture of experts with shared experts.

Attention (megatron-core's ``MLASelfAttention`` under ``MLATransformerConfig``): q from
``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` (or one ``q_proj`` when ``q_lora_rank`` is null), k/v
from the latent ``kv_a_proj_with_mqa`` (``kv_lora_rank`` latent + one shared rotary key) ->
``kv_a_layernorm`` -> ``kv_b_proj``; each head is ``qk_nope_head_dim`` plain + ``qk_rope_head_dim``
rotary dims for q/k and ``v_head_dim`` for v. Every projection is its own column-parallel linear
(``Split.COLUMN``), HF's row layouts are Megatron's: per head [nope; rope] in ``q_b_proj``, per head
[k_nope; v] in ``kv_b_proj``, [latent; rope] in ``kv_a_proj_with_mqa``. Megatron's MLA rotary takes
the rotary dims as interleaved pairs, which is HF's ``rope_interleave`` (the default); without it
the rotary rows are permuted on load (and back on export) so that the same rotation results.
YaRN rope scaling is carried with its ``mscale`` / ``mscale_all_dim`` as HF applies them (to cos/sin
and to the softmax scale).

MoE layers (from ``first_k_dense_replace`` on; the first ones are dense MLPs): sigmoid scores, the
``e_score_correction_bias`` buffer added for the choice only (Megatron's router ``expert_bias``:
mapped, exported and synced, never trained by the optimizer; updated only by
``moe_router_bias_update_rate``, which this adapter leaves at 0: HF's model does not move it),
group-limited top-k (``n_group`` / ``topk_group``), renormalised top-k weights times
``routed_scaling_factor``, and ``n_shared_experts`` always-on shared experts.

MTP layers (``num_nextn_predict_layers``: HF tensors of layers ``num_hidden_layers`` + i) are not part of
the trained model (HF's model drops them too): conversion and export carry them unchanged
(``is_passthrough``), and no option trains them.
"""
from __future__ import annotations

import re

import torch

from models.adapter import AttentionShape, LayerSpecOptions, ModelAdapter, Split, WeightSpec, shared_expert_weight_specs
from models.splits import ColumnSplit

#: HF's DeepSeek latent norms (``q_a_layernorm``, ``kv_a_layernorm``) are built with this epsilon, not
#: ``rms_norm_eps``; megatron-core gives them ``layernorm_epsilon``, so another ``rms_norm_eps`` (Moonlight's
#: 1e-5) builds them as ``FixedEpsNorm`` (local layer spec; Transformer Engine's fused one is refused).
_LATENT_NORM_EPS = 1e-6
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def _interleave_rope_rows(block: int, rope: int):
    """``row_order`` of a tensor of ``block``-row blocks (one per head) whose last ``rope`` rows HF rotates
    as halves: Megatron's MLA reads them as interleaved pairs, so HF's row ``i`` of the first half goes to
    ``2i`` and row ``i`` of the second half to ``2i + 1``."""
    half = torch.arange(rope // 2)
    within = torch.stack([half, half + rope // 2], dim=1).flatten() + (block - rope)

    def row_order(num_rows: int) -> torch.Tensor:
        rows = torch.arange(num_rows).view(num_rows // block, block).clone()
        rows[:, block - rope:] = rows[:, within]
        return rows.flatten()

    return row_order


class SigmoidRoutedMoe:
    """The MoE layout DeepSeek-V3 and GLM-4.5 share (a mixin before a ``ModelAdapter``): dense layers before
    ``first_k_dense_replace``, sigmoid scores with the ``e_score_correction_bias`` buffer (Megatron's router
    ``expert_bias``), group-limited top-k, renormalised weights times ``routed_scaling_factor``, always-on
    shared experts, HF names ``mlp.gate`` / ``mlp.experts.{i}`` / ``mlp.shared_experts``; multi-token-prediction
    layers (index >= ``num_hidden_layers``) carried through conversion unchanged."""

    hf_config: object

    def _check_router(self) -> None:
        c = self.hf_config
        if c.num_experts_per_tok > 1 and not c.norm_topk_prob:
            raise ValueError(f"{c.model_type}: norm_topk_prob=false is not supported with sigmoid routing "
                             "(megatron-core renormalises the top-k sigmoid scores)")
        if self._group_limited and c.num_experts_per_tok // c.topk_group != 2:
            raise ValueError(
                f"{c.model_type}: group-limited routing with num_experts_per_tok // topk_group = "
                f"{c.num_experts_per_tok // c.topk_group} is not supported: HF scores a group by its top 2 experts, "
                "megatron-core by its top num_experts_per_tok // topk_group")

    def is_passthrough(self, hf_name: str) -> bool:
        match = _LAYER_INDEX.match(hf_name)
        return match is not None and int(match.group(1)) >= self.hf_config.num_hidden_layers

    @property
    def _group_limited(self) -> bool:
        c = self.hf_config
        return bool(c.n_group and c.n_group > 1 and c.topk_group < c.n_group)

    @property
    def num_experts(self) -> int | None:
        return getattr(self.hf_config, "n_routed_experts", None) or None

    @property
    def expert_ffn_hidden_size(self) -> int | None:
        return self.hf_config.moe_intermediate_size if self.num_experts else None

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.num_experts) and layer >= (self.hf_config.first_k_dense_replace or 0)

    @property
    def lora_expert_names_mean_experts_only(self) -> bool:
        # PEFT 0.21 converts deepseek_v2 / deepseek_v3 / glm4_moe as qwen2_moe: gate_proj / up_proj / down_proj
        # become the fused routed experts' target_parameters; the dense MLPs and shared experts stay frozen.
        return bool(self.num_experts)

    @property
    def shared_expert_intermediate_size(self) -> int | None:
        shared = getattr(self.hf_config, "n_shared_experts", None)
        return self.hf_config.moe_intermediate_size * shared if shared else None

    def _router_kwargs(self) -> dict:
        c = self.hf_config
        kwargs = dict(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,  # HF's bias is fixed: training does not move it
            moe_router_topk_scaling_factor=float(c.routed_scaling_factor),
        )
        if self._group_limited:
            kwargs.update(moe_router_num_groups=c.n_group, moe_router_group_topk=c.topk_group)
        return kwargs

    def mlp_specs(self) -> list[WeightSpec]:
        if not self.num_experts:
            return self.dense_mlp_specs()
        gate = "model.layers.{layer}.mlp.gate."
        return [WeightSpec("mlp.router.weight", (gate + "weight",), Split.REPLICATED),
                WeightSpec("mlp.router.expert_bias", (gate + "e_score_correction_bias",), Split.REPLICATED)]

    def expert_specs(self) -> list[WeightSpec]:
        p = "model.layers.{layer}.mlp.experts.{expert}."
        return [
            WeightSpec("linear_fc1.weight", (p + "gate_proj.weight", p + "up_proj.weight"), Split.GATE_UP),
            WeightSpec("linear_fc2.weight", (p + "down_proj.weight",), Split.ROW),
        ]

    def shared_expert_specs(self) -> list[WeightSpec]:
        if not self.shared_expert_intermediate_size:
            return []
        return shared_expert_weight_specs("model.layers.{layer}.mlp.shared_experts.")


class DeepseekV3Adapter(SigmoidRoutedMoe, ModelAdapter):
    model_types = ("deepseek_v3",)
    hf_causal_lm_class = "DeepseekV3ForCausalLM"
    transformer_config_class = "MLATransformerConfig"

    # ----- config -------------------------------------------------------------------------
    def _check_supported(self) -> None:
        c = self.hf_config
        rope = self.rope_parameters
        if rope.get("rope_type", "default") not in ("default", "yarn"):
            raise ValueError(f"{c.model_type}: rope_scaling type {rope.get('rope_type')!r} is not supported "
                             "(supported: default, yarn)")
        if rope.get("rope_type") == "yarn":
            self._check_yarn(rope)
        if getattr(c, "attention_bias", False):
            raise ValueError(f"{c.model_type}: attention_bias=true is not supported (megatron-core's latent "
                             "attention has no biases on q_a_proj / kv_a_proj_with_mqa)")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"{c.model_type}: hidden_act {c.hidden_act!r} is not supported (silu)")
        if self.num_experts:
            self._check_router()
        freq = getattr(c, "moe_layer_freq", 1)  # DeepSeek's remote code; transformers' model ignores it
        if self.num_experts and freq != 1:
            raise ValueError(f"{c.model_type}: moe_layer_freq={freq} is not supported (transformers' model, which "
                             "this one equals, makes every layer from first_k_dense_replace on MoE; DeepSeek's own "
                             "code puts dense layers between)")

    def _check_yarn(self, rope: dict) -> None:
        name = self.hf_config.model_type
        if not rope.get("truncate", True):
            raise ValueError(f"{name}: yarn rope_scaling with truncate=false is not supported (megatron-core's MLA "
                             "rounds the correction range)")
        if rope.get("mscale_all_dim") and not rope.get("mscale"):
            raise ValueError(f"{name}: yarn rope_scaling with mscale_all_dim but no mscale is not supported "
                             "(megatron-core scales cos/sin by mscale / mscale_all_dim)")
        if rope.get("attention_factor") is not None:
            raise ValueError(f"{name}: yarn rope_scaling with an explicit attention_factor is not supported "
                             "(megatron-core derives it from factor, mscale and mscale_all_dim)")

    def check_parallel(self, *, tensor_model_parallel_size: int) -> None:
        c, tp = self.hf_config, tensor_model_parallel_size
        # megatron-core splits the latent down-projections over TP too (then gathers their outputs).
        for field, rows in (("q_lora_rank", c.q_lora_rank), ("kv_lora_rank + qk_rope_head_dim",
                                                              c.kv_lora_rank + c.qk_rope_head_dim)):
            if rows and rows % tp:
                raise ValueError(f"--tensor_model_parallel_size {tp} does not divide {c.model_type}'s {field} "
                                 f"({rows}): megatron-core splits the latent down-projections over TP")

    def kv_cache_values_per_token(self, tensor_parallel_size: int) -> int:
        # vLLM's MLA caches the compressed latent and the shared rotary key (kv_a_proj_with_mqa's output), not
        # per-head K/V; every TP rank holds all of it (the heads are split after kv_b_proj).
        c = self.hf_config
        return self.num_layers * (c.kv_lora_rank + c.qk_rope_head_dim)

    @property
    def attention(self) -> AttentionShape:
        c = self.hf_config
        return AttentionShape(c.num_attention_heads, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)

    def layer_spec_options(self) -> LayerSpecOptions:
        # Moonlight's rms_norm_eps is 1e-5: its latent norms keep HF's 1e-6 (models.norms.FixedEpsNorm).
        latent_eps = None if float(self.hf_config.rms_norm_eps) == _LATENT_NORM_EPS else _LATENT_NORM_EPS
        return LayerSpecOptions(num_experts=self.num_experts, multi_latent_attention=True, latent_norm_eps=latent_eps,
                                moe_layers=self.moe_layer_pattern if self.num_experts else None)

    def transformer_config_kwargs(self) -> dict:
        c = self.hf_config
        kwargs = {
            **super().transformer_config_kwargs(),
            "kv_channels": c.v_head_dim,
            "q_lora_rank": c.q_lora_rank,
            "kv_lora_rank": c.kv_lora_rank,
            "qk_head_dim": c.qk_nope_head_dim,
            "qk_pos_emb_head_dim": c.qk_rope_head_dim,
            "v_head_dim": c.v_head_dim,
            "rotary_base": float(self.rope_parameters["rope_theta"]),
            **self._rope_kwargs(),
        }
        if self.num_experts:
            kwargs.update(self._router_kwargs())
        return kwargs

    def _rope_kwargs(self) -> dict:
        rope = self.rope_parameters
        if rope.get("rope_type", "default") == "default":
            return dict(rope_type="rope", mscale=1.0, mscale_all_dim=0.0)
        factor = rope.get("factor") or self.hf_config.max_position_embeddings / rope["original_max_position_embeddings"]
        both = bool(rope.get("mscale") and rope.get("mscale_all_dim"))
        # HF: cos/sin x get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when both are set, else
        # x get_mscale(factor); megatron-core's ratio with (1, 0) is the latter.
        return dict(
            rope_type="yarn", rotary_scaling_factor=float(factor),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope["mscale"]) if both else 1.0,
            mscale_all_dim=float(rope["mscale_all_dim"]) if both else 0.0,
        )

    # ----- weight map ---------------------------------------------------------------------
    def attention_specs(self) -> list[WeightSpec]:
        c = self.hf_config
        a = "model.layers.{layer}.self_attn."
        head = c.qk_nope_head_dim + c.qk_rope_head_dim
        q_split = kv_down_split = Split.COLUMN
        if not getattr(c, "rope_interleave", True):
            q_split = ColumnSplit(_interleave_rope_rows(head, c.qk_rope_head_dim), name="COLUMN_ROPE_HALVES")
            kv_down_split = ColumnSplit(_interleave_rope_rows(c.kv_lora_rank + c.qk_rope_head_dim, c.qk_rope_head_dim),
                                        name="COLUMN_ROPE_HALVES")
        if c.q_lora_rank is None:
            q_specs = [WeightSpec("self_attention.linear_q_proj.weight", (a + "q_proj.weight",), q_split)]
        else:
            q_specs = [
                WeightSpec("self_attention.linear_q_down_proj.weight", (a + "q_a_proj.weight",), Split.COLUMN),
                WeightSpec("self_attention.q_layernorm.weight", (a + "q_a_layernorm.weight",), Split.REPLICATED),
                WeightSpec("self_attention.linear_q_up_proj.weight", (a + "q_b_proj.weight",), q_split),
            ]
        return [
            *q_specs,
            WeightSpec("self_attention.linear_kv_down_proj.weight", (a + "kv_a_proj_with_mqa.weight",), kv_down_split),
            WeightSpec("self_attention.kv_layernorm.weight", (a + "kv_a_layernorm.weight",), Split.REPLICATED),
            WeightSpec("self_attention.linear_kv_up_proj.weight", (a + "kv_b_proj.weight",), Split.COLUMN),
            WeightSpec("self_attention.linear_proj.weight", (a + "o_proj.weight",), Split.ROW),
        ]
