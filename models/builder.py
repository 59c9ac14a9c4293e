"""Build this rank's Megatron ``GPTModel`` chunk for an architecture adapter.

Parallelism is applied from outside: the adapter says what the model is, the builder places it
on the current TP/PP/EP grid (pre/post-process by pipeline stage, vocab padding, heads).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer import transformer_config as megatron_configs
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from models.adapter import LayerSpecOptions, ModelAdapter
from models.build_config import (  # noqa: F401  (declared apart: the parsers import no torch)
    NO_RECOMPUTE,
    RECOMPUTE_MODULES,
    ModelBuildConfig,
    recompute_kwargs,
    resolve_bf16,
)
from models.heads import ValueHead
from models.layer_spec import TransformerImpl, block_spec, detect_layer_spec
from models.lora import apply_lora
from models.moe_aux import install_router_stats
from models.router_replay import install_routing_replay
from parallel.config import ParallelConfig


def layer_spec(options: LayerSpecOptions, config: TransformerConfig, build: ModelBuildConfig) -> TransformerBlockSubmodules:
    """This pipeline stage's layer specs (dense or MoE per ``options.moe_layers``) and final norm, in
    the implementation ``--transformer_impl`` resolves to here (``models.layer_spec``)."""
    moe_layers = options.moe_layers or [bool(options.num_experts)] * config.num_layers
    offset = get_transformer_layer_offset(config)
    local = list(moe_layers[offset: offset + get_num_layers_to_build(config)])
    return block_spec(detect_layer_spec(resolve_transformer_impl(build)), options, layer_is_moe=local,
                      normalization=config.normalization, ring_head_stride=build.ring_head_stride,
                      moe_grouped_gemm=config.moe_grouped_gemm)


def resolve_transformer_impl(build: ModelBuildConfig) -> TransformerImpl:
    """LoRA adapts megatron-core's local linears: it picks the local spec where ``auto`` would take
    Transformer Engine's, and refuses an explicit ``transformer_engine``."""
    if not build.lora.enabled:
        return build.transformer_impl
    if build.transformer_impl == "transformer_engine":
        raise ValueError("--lora_rank with --transformer_impl transformer_engine is not supported: LoRA adapts "
                         "megatron-core's local linears (--transformer_impl local, what auto picks with LoRA)")
    return "local"


def transformer_config(adapter: ModelAdapter, parallel: ParallelConfig, build: ModelBuildConfig) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        **adapter.transformer_config_kwargs(),
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        # Uneven stages: every layer offset (conversion, export, sync, LoRA, checkpoints) is megatron-core's
        # get_transformer_layer_offset of this config, so global layer ids follow the split.
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=build.params_dtype,
        pipeline_dtype=build.params_dtype,
        bf16=build.params_dtype == torch.bfloat16,
        fp16=build.params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA extensions (Apex / TE); the unfused paths are exact everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        # Variable-length micro-batches (RL responses, packing) need shape exchange between stages.
        variable_seq_lengths=parallel.pipeline_model_parallel_size > 1,
        # alltoall runs on CPU through parallel.cpu_backend.
        moe_token_dispatcher_type=build.moe_token_dispatcher_type,
    )
    if adapter.num_experts:
        kwargs.update(
            moe_router_dtype="fp32", moe_grouped_gemm=resolve_grouped_gemm(build),
            moe_expert_capacity_factor=build.moe_expert_capacity_factor,
            moe_token_drop_policy=build.moe_token_drop_policy,
            moe_pad_expert_input_to_capacity=build.moe_pad_expert_input_to_capacity,
            # Every router gets a replay hook (models.router_replay): inert until a role turns it on.
            moe_enable_routing_replay=True,
        )
    kwargs.update(recompute_kwargs(build))
    if build.router_z_loss_coef:
        kwargs["moe_z_loss_coeff"] = build.router_z_loss_coef
    if build.moe_router_bias_update_rate:
        kwargs["moe_router_bias_update_rate"] = build.moe_router_bias_update_rate
    kwargs.update(build.overrides)
    return getattr(megatron_configs, adapter.transformer_config_class)(**kwargs)


def resolve_grouped_gemm(build: ModelBuildConfig) -> bool:
    """``--moe_grouped_gemm``: unset means on exactly where TE's layer spec runs (TEGroupedMLP; the
    local spec's legacy GroupedMLP needs the separate grouped_gemm package and other weight names)."""
    te = detect_layer_spec(resolve_transformer_impl(build)).impl == "transformer_engine"
    if build.moe_grouped_gemm and not te:
        raise ValueError("--moe_grouped_gemm needs the Transformer Engine layer spec (TEGroupedMLP): install "
                         "transformer-engine on a CUDA machine, or leave it off")
    return te if build.moe_grouped_gemm is None else build.moe_grouped_gemm


def check_router_options(build: ModelBuildConfig, adapter: ModelAdapter) -> None:
    """What a router without HF's load-balancing loss or without an expert bias cannot do."""
    router = adapter.transformer_config_kwargs()
    rate = build.moe_router_bias_update_rate
    if rate < 0:
        raise ValueError(f"--moe_router_bias_update_rate must be >= 0, got {rate}")
    if rate and not router.get("moe_router_enable_expert_bias"):
        raise ValueError(f"--moe_router_bias_update_rate {rate}: the model's router has no expert bias "
                         "(DeepSeek-V3's e_score_correction_bias)")
    if build.aux_loss_coef and router.get("moe_router_score_function") == "sigmoid":
        raise ValueError(f"--aux_loss_coef {build.aux_loss_coef}: HF's {adapter.hf_config.model_type} defines no "
                         "load-balancing loss (its sigmoid router balances through the expert bias: "
                         "--moe_router_bias_update_rate)")


def check_moe_options(build: ModelBuildConfig, parallel: ParallelConfig, *, moe: bool) -> None:
    for flag, value in (("--aux_loss_coef", build.aux_loss_coef), ("--router_z_loss_coef", build.router_z_loss_coef)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
        if value and not moe:
            raise ValueError(f"{flag} {value}: the model has no experts (a dense model has no router to balance)")
    default = ModelBuildConfig()
    for name in ("moe_token_dispatcher_type", "moe_grouped_gemm", "moe_expert_capacity_factor",
                 "moe_token_drop_policy", "moe_pad_expert_input_to_capacity"):
        if not moe and getattr(build, name) != getattr(default, name):
            raise ValueError(f"--{name} {getattr(build, name)}: the model has no experts")
    if build.moe_token_dispatcher_type == "allgather" and parallel.pipeline_model_parallel_size > 1:
        raise ValueError("--moe_token_dispatcher_type allgather cannot take the variable sequence lengths that "
                         "--pipeline_model_parallel_size > 1 exchanges between stages: use alltoall")
    if build.moe_pad_expert_input_to_capacity and build.moe_expert_capacity_factor is None:
        raise ValueError("--moe_pad_expert_input_to_capacity needs --moe_expert_capacity_factor")
    if build.moe_expert_capacity_factor is not None and build.moe_expert_capacity_factor <= 0:
        raise ValueError(f"--moe_expert_capacity_factor must be > 0, got {build.moe_expert_capacity_factor}")
    if moe:
        resolve_grouped_gemm(build)  # refuses grouped GEMM without Transformer Engine
    if build.aux_loss_coef and parallel.pipeline_model_parallel_size > 1:
        raise ValueError("--aux_loss_coef with --pipeline_model_parallel_size > 1 is not supported: HF's load-balancing "
                         "loss pools the routing counts of every MoE layer, which one pipeline stage does not see")


def build_model(adapter: ModelAdapter, parallel: ParallelConfig, build: ModelBuildConfig | None = None) -> GPTModel:
    """This rank's model chunk. Weights are random until loaded (``models.weights``)."""
    build = build or ModelBuildConfig()
    parallel.validate_model(
        num_layers=adapter.num_layers,
        num_attention_heads=adapter.attention.num_heads,
        num_query_groups=adapter.attention.num_kv_heads,
        num_experts=adapter.num_experts,
        expert_ffn_size=adapter.expert_ffn_hidden_size,
    )
    adapter.check_parallel(tensor_model_parallel_size=parallel.tensor_model_parallel_size)
    check_moe_options(build, parallel, moe=bool(adapter.num_experts))
    check_router_options(build, adapter)
    if "layernorm" in (build.recompute_modules or ()) and detect_layer_spec(build.transformer_impl).impl == "local":
        # megatron-core 0.16.1's CheckpointWithoutOutput (layernorm recompute) calls TE-only names.
        raise ValueError("--recompute_modules layernorm needs the Transformer Engine layer spec; the local one "
                         "recomputes core_attn and mlp")
    config = transformer_config(adapter, parallel, build)
    padded_vocab = _padded_vocab_size(adapter, parallel, build)
    model_kwargs = adapter.gpt_model_kwargs()
    if build.value_head:
        # The value head replaces the output layer; nothing is tied to the embedding.
        model_kwargs["share_embeddings_and_output_weights"] = False
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(adapter.layer_spec_options(), config, build),
        vocab_size=padded_vocab,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        **model_kwargs,
    )
    model.true_vocab_size = adapter.vocab_size
    model.is_value_model = build.value_head
    model.value_head_prefix = build.value_head_prefix
    model.max_attention_span = adapter.max_attention_span  # checked per sample by the schedule
    if adapter.num_experts:
        # Experts in their own DDP buffers and optimizer at every EP size, as Megatron does for EP > 1 only:
        # the optimizer state of a checkpoint then has one structure whichever EP saved or loads it.
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                param.allreduce = False
    moe_layers = adapter.layer_spec_options().moe_layers
    model.router_stats = install_router_stats(  # HF's aux loss and the routing metrics (MoE only)
        model, aux_loss_coef=build.aux_loss_coef, sequence_parallel=parallel.sequence_parallel,
        num_moe_layers=sum(moe_layers) if moe_layers is not None else adapter.num_layers)
    model.routing_replay = install_routing_replay(model, sequence_parallel=parallel.sequence_parallel)
    if model.post_process:
        if build.value_head:
            model.output_layer = ValueHead(config, normalisation=build.value_normalisation)
        elif padded_vocab != adapter.vocab_size:
            model.output_layer.register_forward_hook(_mask_vocab_padding(adapter.vocab_size, padded_vocab))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if build.lora.enabled:
        apply_lora(model, adapter, build.lora, init_b_std=build.lora.init_b_std)  # after the value head: it stays trainable
    return model


def _padded_vocab_size(adapter: ModelAdapter, parallel: ParallelConfig, build: ModelBuildConfig) -> int:
    tp = parallel.tensor_model_parallel_size
    if build.padded_vocab_size is None:
        return adapter.padded_vocab_size(tp, build.make_vocab_size_divisible_by)
    if build.padded_vocab_size % tp or build.padded_vocab_size < adapter.vocab_size:
        raise ValueError(
            f"the checkpoint's padded vocabulary ({build.padded_vocab_size} rows) does not split over "
            f"--tensor_model_parallel_size {tp}"
        )
    return build.padded_vocab_size


def _mask_vocab_padding(vocab_size: int, padded_vocab_size: int):
    """Padded vocab rows must never win a softmax: log-probs and losses equal the unpadded model's."""

    def hook(module, inputs, output):
        logits, bias = output
        per_rank = padded_vocab_size // parallel_state.get_tensor_model_parallel_world_size()
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        if logits.shape[-1] != per_rank:  # gathered output (parallel_output=False)
            start, per_rank = 0, logits.shape[-1]
        first_pad = max(vocab_size - start, 0)
        if first_pad >= per_rank:
            return output
        # A finite minimum, not -inf: softmax gives exactly 0 and entropy terms stay finite.
        mask = torch.zeros(per_rank, dtype=torch.bool, device=logits.device)
        mask[first_pad:] = True
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min), bias

    return hook
