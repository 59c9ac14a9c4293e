"""The HF <-> Megatron contract of one architecture: config translation and an explicit weight map.

Each architecture module (llama, qwen2, mistral, mixtral) subclasses :class:`ModelAdapter` and
declares its weight map as data: which Megatron parameter comes from which HF tensor(s), and how
it is split over tensor parallel ranks (a ``models.splits.Split`` strategy, which reads and
exports its kind of tensor), and which options its Megatron layer spec needs
(:class:`LayerSpecOptions`). Walking a model's tensors lives in ``models/weights.py``; nothing
here knows about processes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.splits import Split

__all__ = ["TE_FUSED_NORM_NAMES", "AttentionShape", "LayerSpecOptions", "ModelAdapter", "Split", "WeightSpec",
           "shared_expert_weight_specs"]


@dataclass(frozen=True)
class WeightSpec:
    megatron: str  # name relative to its scope (global, layer, or expert)
    hf: tuple[str, ...]  # HF name templates; ``{layer}`` and ``{expert}`` are global indices
    split: Split


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerSpecOptions:
    """What an architecture asks of Megatron's layer spec (``models.builder.layer_spec``)."""

    num_experts: int | None = None  # MoE layers' experts (None: dense model)
    qk_layernorm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3, OLMo 2)
    moe_layers: tuple[bool, ...] | None = None  # per global layer: MoE (True) or dense; None: all alike
    multi_latent_attention: bool = False  # DeepSeek's MLA (megatron-core's MLASelfAttention) instead of GQA
    latent_norm_eps: float | None = None  # MLA's q / kv latent norms' epsilon (None: the layers' rms_norm_eps)


#: Transformer Engine's layer spec fuses a layer's norms into the linear layer after them
#: (``models.layer_spec``); those parameters are the same HF tensors as the local spec's norms. MoE
#: layers keep a separate ``pre_mlp_layernorm`` under TE: the names never collide.
TE_FUSED_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

#: The same under multi-head latent attention: TE fuses the q / kv latent norms into the up-projections.
MLA_TE_FUSED_NORM_NAMES = {
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
# Transformer Engine's grouped experts (TEGroupedMLP, --moe_grouped_gemm): one weight per local expert.
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def shared_expert_weight_specs(hf_prefix: str, gate: str | None = None) -> list[WeightSpec]:
    """megatron-core's shared expert (``SharedExpertMLP``: a SwiGLU MLP split over TP like a dense one,
    and, gated, a replicated ``[1, hidden]`` ``gate_weight``) from the HF module ``hf_prefix``
    (``model.layers.{layer}.mlp.shared_expert.``) and the gate's HF tensor name, if any."""
    specs = [
        WeightSpec("mlp.shared_experts.linear_fc1.weight", (hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight"),
                   Split.GATE_UP),
        WeightSpec("mlp.shared_experts.linear_fc2.weight", (hf_prefix + "down_proj.weight",), Split.ROW),
    ]
    if gate is not None:
        specs.append(WeightSpec("mlp.shared_experts.gate_weight", (gate,), Split.REPLICATED))
    return specs


class ModelAdapter:
    """Base adapter for Llama-style decoders (RMSNorm, SwiGLU, RoPE, GQA)."""

    #: ``config.model_type`` values this adapter accepts.
    model_types: tuple[str, ...] = ()
    #: ``architectures`` written into exported configs.
    hf_causal_lm_class: str = ""
    #: megatron-core's config class (in ``megatron.core.transformer.transformer_config``) the builder
    #: instantiates with ``transformer_config_kwargs``: MLATransformerConfig for latent attention.
    transformer_config_class: str = "TransformerConfig"

    def __init__(self, hf_config):
        self.hf_config = hf_config
        self._check_supported()

    # ----- config -------------------------------------------------------------------------
    def _check_supported(self) -> None:
        rope = self.rope_parameters
        if rope.get("rope_type", "default") not in ("default", "llama3"):
            raise ValueError(
                f"rope_scaling type {rope.get('rope_type')!r} is not supported "
                f"(supported: default, llama3)"
            )
        if rope.get("rope_type") == "llama3":
            expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            for key, value in expected.items():
                if float(rope.get(key, value)) != float(value):
                    raise ValueError(
                        f"llama3 rope_scaling with {key}={rope.get(key)} is not supported "
                        f"(megatron-core implements {key}={value})"
                    )

    @property
    def rope_parameters(self) -> dict:
        params = getattr(self.hf_config, "rope_parameters", None) or getattr(self.hf_config, "rope_scaling", None)
        params = dict(params or {})
        params.setdefault("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0))
        return params

    @property
    def attention(self) -> AttentionShape:
        c = self.hf_config
        num_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return AttentionShape(c.num_attention_heads, num_kv, head_dim)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))

    @property
    def num_experts(self) -> int | None:
        return None

    @property
    def expert_ffn_hidden_size(self) -> int | None:
        """Hidden size of one routed expert (None: a dense model)."""
        return self.hf_config.intermediate_size if self.num_experts else None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` routes to experts (False: a dense MLP, ``dense_mlp_specs``).
        Default: every layer of a model with experts."""
        return bool(self.num_experts)

    @property
    def moe_layer_pattern(self) -> tuple[bool, ...]:
        """``is_moe_layer`` of every global layer (megatron-core's ``moe_layer_freq`` as a list)."""
        return tuple(self.is_moe_layer(layer) for layer in range(self.num_layers))

    @property
    def shared_expert_intermediate_size(self) -> int | None:
        """Hidden size of the MoE layers' always-on shared expert(s), all of them together (megatron-core's
        ``moe_shared_expert_intermediate_size``); None: no shared expert."""
        return None

    @property
    def shared_expert_gate(self) -> bool:
        """Whether the shared expert's output is scaled by ``sigmoid(x . w)`` (Qwen2-MoE's
        ``shared_expert_gate``; megatron-core's ``moe_shared_expert_gate``). DeepSeek's has no gate."""
        return False

    @property
    def lora_expert_names_mean_experts_only(self) -> bool:
        """LoRA ``--target_modules`` names shared by the experts and a dense / shared-expert MLP
        (``gate_proj``...) adapt the routed experts only, as PEFT means them for this architecture
        (``models.lora.targets``)."""
        return False

    @property
    def qk_layernorm(self) -> bool:
        """Per-head RMSNorm on q and k before rotary (Qwen3, OLMo 2): ``qk_norm_specs`` names its weights."""
        return False

    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def max_attention_span(self) -> int | None:
        """Longest sample whose attention the Megatron model computes exactly (None: no limit
        beyond the positions). An architecture with windowed attention returns its window: longer
        samples are refused rather than silently attended in full."""
        return None

    def layer_spec_options(self) -> LayerSpecOptions:
        return LayerSpecOptions(num_experts=self.num_experts, qk_layernorm=self.qk_layernorm,
                                moe_layers=self.moe_layer_pattern if self.num_experts else None)

    def transformer_config_kwargs(self) -> dict:
        """Architecture fields of Megatron's ``TransformerConfig`` (parallel sizes added by the builder)."""
        c, attn = self.hf_config, self.attention
        return dict(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            ffn_hidden_size=c.intermediate_size,
            num_attention_heads=attn.num_heads,
            num_query_groups=attn.num_kv_heads,
            kv_channels=attn.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=c.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            init_method_std=getattr(c, "initializer_range", 0.02),
            qk_layernorm=self.qk_layernorm,
            **self.moe_config_kwargs(),
        )

    def moe_config_kwargs(self) -> dict:
        """The ``TransformerConfig`` fields every MoE architecture shares: experts, the per-layer pattern
        (``moe_layer_freq`` as a list, from ``is_moe_layer``) and the shared expert; {} for a dense model.
        Routing (softmax before or after top-k, scaling) is each architecture's own."""
        if not self.num_experts:
            return {}
        kwargs = dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=self.hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=self.expert_ffn_hidden_size,
            moe_layer_freq=[int(moe) for moe in self.moe_layer_pattern],
            # HF's load-balancing loss is added by models.moe_aux (--aux_loss_coef), not Megatron's.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        )
        if self.shared_expert_intermediate_size:
            kwargs.update(moe_shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                          moe_shared_expert_gate=self.shared_expert_gate)
        return kwargs

    def gpt_model_kwargs(self) -> dict:
        """Keyword arguments of Megatron's ``GPTModel`` beyond config / spec / pre-post process."""
        rope = self.rope_parameters
        kwargs = dict(
            max_sequence_length=self.hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=int(rope["rope_theta"]),
            share_embeddings_and_output_weights=self.tie_word_embeddings,
        )
        if rope.get("rope_type") == "llama3":
            kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
        return kwargs

    # ----- weight map ---------------------------------------------------------------------
    def global_specs(self) -> list[WeightSpec]:
        output = "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"
        return [
            WeightSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Split.VOCAB),
            WeightSpec("decoder.final_layernorm.weight", ("model.norm.weight",), Split.REPLICATED),
            WeightSpec("output_layer.weight", (output,), Split.VOCAB),
            WeightSpec("value_head.weight", ("score.weight",), Split.REPLICATED),
        ]

    def layer_specs(self) -> list[WeightSpec]:
        p = "model.layers.{layer}."
        specs = [
            WeightSpec("input_layernorm.weight", (p + "input_layernorm.weight",), Split.REPLICATED),
            WeightSpec("pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), Split.REPLICATED),
            *self.attention_specs(),
            *self.mlp_specs(),
        ]
        if self.num_experts:
            specs += self.shared_expert_specs()
            if not all(self.moe_layer_pattern):
                specs += self.dense_mlp_specs()
        return specs

    def attention_specs(self) -> list[WeightSpec]:
        """A layer's self-attention: fused q/k/v (with biases, q/k norms as configured) and ``o_proj``."""
        p = "model.layers.{layer}."
        specs = [
            WeightSpec(
                "self_attention.linear_qkv.weight",
                tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
                Split.QKV,
            ),
            WeightSpec("self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), Split.ROW),
        ]
        if self.qkv_bias:
            specs.append(
                WeightSpec(
                    "self_attention.linear_qkv.bias",
                    tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"),
                    Split.QKV,
                )
            )
        if self.qk_layernorm:
            specs += self.qk_norm_specs()
        return specs

    def qk_norm_specs(self) -> list[WeightSpec]:
        """The per-head q / k norms (``head_dim`` wide, replicated): HF's ``self_attn.{q,k}_norm``."""
        p = "model.layers.{layer}.self_attn."
        return [WeightSpec("self_attention.q_layernorm.weight", (p + "q_norm.weight",), Split.REPLICATED),
                WeightSpec("self_attention.k_layernorm.weight", (p + "k_norm.weight",), Split.REPLICATED)]

    def mlp_specs(self) -> list[WeightSpec]:
        """A layer's MLP: the dense MLP of a dense model; an MoE model's router (its experts are
        ``expert_specs``, its dense layers ``dense_mlp_specs``, its shared expert ``shared_expert_specs``)."""
        return self.dense_mlp_specs()

    def dense_mlp_specs(self) -> list[WeightSpec]:
        """A dense SwiGLU MLP (every layer of a dense model; the layers of an MoE model that
        ``is_moe_layer`` says are dense): HF ``mlp.gate_proj / up_proj / down_proj``."""
        p = "model.layers.{layer}.mlp."
        return [
            WeightSpec("mlp.linear_fc1.weight", (p + "gate_proj.weight", p + "up_proj.weight"), Split.GATE_UP),
            WeightSpec("mlp.linear_fc2.weight", (p + "down_proj.weight",), Split.ROW),
        ]

    def expert_specs(self) -> list[WeightSpec]:
        return []

    def shared_expert_specs(self) -> list[WeightSpec]:
        """An MoE layer's shared expert (megatron-core's ``mlp.shared_experts``); [] when there is none.
        ``shared_expert_weight_specs`` builds them from the HF names."""
        return []

    def kv_cache_values_per_token(self, tensor_parallel_size: int) -> int:
        """Values one token keeps in the KV cache of one GPU of a vLLM engine at ``tensor_parallel_size``,
        over all layers (the planner's rollout estimate): K and V of the GPU's KV heads (a KV head is
        replicated when TP exceeds their number)."""
        attn = self.attention
        return 2 * self.num_layers * max(attn.num_kv_heads // tensor_parallel_size, 1) * attn.head_dim

    def check_parallel(self, *, tensor_model_parallel_size: int) -> None:
        """Refuse, naming the flag, a TP size that the architecture's own tensors do not split by
        (the heads, layers and experts are ``ParallelConfig.validate_model``'s)."""

    def is_passthrough(self, hf_name: str) -> bool:
        """Whether an HF tensor is outside the Megatron model yet carried unchanged from the source
        checkpoint into Megatron checkpoints and HF exports (DeepSeek's multi-token-prediction layers)."""
        return False

    # ----- name resolution ----------------------------------------------------------------
    def resolve(self, megatron_name: str, *, layer_offset: int, expert_offset: int) -> tuple[WeightSpec, dict]:
        """The spec of a local Megatron parameter name and the global indices to fill its HF names."""
        match = _LAYER.match(megatron_name)
        if match is None:
            return self._find(self.global_specs(), megatron_name), {}
        layer, rest = int(match.group(1)) + layer_offset, match.group(2)
        expert = _EXPERT.match(rest)
        if expert is not None:
            local, name = int(expert.group(1)), expert.group(2)
        elif (grouped := _GROUPED_EXPERT.match(rest)) is not None:
            local, name = int(grouped.group(2)), f"{grouped.group(1)}.weight"
        else:
            fused = MLA_TE_FUSED_NORM_NAMES if self.layer_spec_options().multi_latent_attention else TE_FUSED_NORM_NAMES
            return self._find(self.layer_specs(), fused.get(rest, rest)), {"layer": layer}
        return self._find(self.expert_specs(), name), {"layer": layer, "expert": local + expert_offset}

    def _find(self, specs: list[WeightSpec], name: str) -> WeightSpec:
        for spec in specs:
            if spec.megatron == name:
                return spec
        raise KeyError(f"{type(self).__name__} has no HF mapping for Megatron parameter {name!r}")

    def padded_vocab_size(self, tensor_model_parallel_size: int, divisor: int = 128) -> int:
        """Megatron's vocab padding: a multiple of ``divisor x TP`` so every TP rank gets equal rows."""
        multiple = divisor * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def export_dtype(self) -> torch.dtype:
        dtype = getattr(self.hf_config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize == 1:
            return torch.bfloat16  # an FP8 checkpoint's weights were dequantised on loading
        return dtype or torch.float32
