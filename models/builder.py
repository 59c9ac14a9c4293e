"""Build this rank's Megatron ``GPTModel`` chunk for an architecture adapter.

Parallelism is applied from outside: the adapter says what the model is, the builder places it
on the current TP/PP/EP grid (pre/post-process by pipeline stage, vocab padding, heads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from models.adapter import LayerSpecOptions, ModelAdapter
from models.heads import ValueHead
from models.layer_spec import TransformerImpl, block_spec, detect_layer_spec
from models.lora import LoraConfig, apply_lora
from models.moe_aux import install_router_stats
from parallel.config import ParallelConfig
from parallel.options import option


@dataclass(kw_only=True)
class ModelBuildConfig:
    """What the trainer asks of the model beyond its architecture."""

    bf16: bool | None = option(None, value_aliases={"fp32": False},
                               help="bf16 weights and compute (default: bf16 with CUDA, fp32 on CPU; --fp32 forces fp32)")
    gradient_checkpointing: bool = option(False, help="full activation recompute of every layer (the same as "
                                                      "--recompute_granularity full)")
    recompute_granularity: Literal["full", "selective"] | None = option(
        None, help="activation recompute (Megatron): full: a recomputed layer keeps only its input; selective: "
                   "the --recompute_modules parts of every layer")
    recompute_num_layers: int | None = option(
        None, help="full recompute of the first N layers of each pipeline stage only (Megatron's block method; "
                   "default: every layer)")
    recompute_modules: tuple[str, ...] | None = option(
        None, help="selective recompute: Megatron modules among core_attn, layernorm, mlp (default: core_attn)")
    aux_loss_coef: float = option(0.0, help="MoE: loss = LM loss + this x HF Mixtral's load-balancing aux_loss "
                                            "(OpenRLHF's meaning); 0: off")
    router_z_loss_coef: float = option(0.0, help="MoE: Megatron's router z-loss coefficient (ST-MoE, per layer); 0: off")
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = option(
        "alltoall", help="MoE: how tokens reach their experts' ranks (Megatron); allgather needs "
                         "--pipeline_model_parallel_size 1 (it cannot take variable sequence lengths)")
    moe_grouped_gemm: bool | None = option(
        None, value_aliases={"no_moe_grouped_gemm": False},
        help="MoE: one grouped GEMM over a rank's experts (Transformer Engine's TEGroupedMLP); default: on "
             "where the TE layer spec runs")
    moe_expert_capacity_factor: float | None = option(
        None, help="MoE: tokens an expert takes, as a multiple of an even share; the rest are dropped "
                   "(default: no limit, no dropping)")
    moe_token_drop_policy: Literal["probs", "position"] = option(
        "probs", help="MoE: with a capacity, drop the lowest-probability tokens (probs) or the last ones (position)")
    moe_pad_expert_input_to_capacity: bool = option(
        False, help="MoE: pad every expert's input to its capacity (static shapes; needs --moe_expert_capacity_factor)")
    ring_head_stride: int | None = option(None, help="KV heads per ring-attention pass under CP (default: all)")
    transformer_impl: TransformerImpl = option(
        "auto", help="layer implementation: transformer_engine (TE linears with fused norms), local "
                     "(megatron-core's own); auto: transformer_engine when TE imports and CUDA is there")
    value_head: bool = False  # critic / reward model: a scalar per token instead of logits
    value_normalisation: tuple[float, float] | None = None  # (mean, std) the value head's output is normalised by
    value_head_prefix: str = option("score", help="reward / critic head: its HF tensor is <prefix>.weight, read and "
                                                  "written (OpenRLHF's; AutoModelForSequenceClassification's is score)")
    lora: LoraConfig = field(default_factory=LoraConfig)
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int | None = None  # fixed by a checkpoint saved under another TP size
    overrides: dict = field(default_factory=dict)  # extra TransformerConfig fields

    def __post_init__(self) -> None:
        recompute_kwargs(self)  # refuses contradictory recompute flags when the job is parsed

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if resolve_bf16(self.bf16, cuda=torch.cuda.is_available()) else torch.float32


def resolve_bf16(bf16: bool | None, *, cuda: bool) -> bool:
    """Unset means the hardware's precision: fp32 on GPU would skip flash-attn and send GQA attention
    to the math kernel (full score matrices); bf16 on CPU is slower than fp32 and inexact for tests.
    Resolved where the model is built, so a CPU-only driver never decides for GPU ranks."""
    return cuda if bf16 is None else bf16


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
        )
    kwargs.update(recompute_kwargs(build))
    if build.router_z_loss_coef:
        kwargs["moe_z_loss_coeff"] = build.router_z_loss_coef
    kwargs.update(build.overrides)
    return TransformerConfig(**kwargs)


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")
#: A frozen model (reference, teacher, EMA copy) runs no backward: nothing to recompute.
NO_RECOMPUTE = dict(gradient_checkpointing=False, recompute_granularity=None, recompute_num_layers=None,
                    recompute_modules=None)


def recompute_kwargs(build: ModelBuildConfig) -> dict:
    """Megatron's recompute fields for ``--gradient_checkpointing`` / ``--recompute_*``, checked."""
    granularity = build.recompute_granularity
    if build.gradient_checkpointing and granularity == "selective":
        raise ValueError("--gradient_checkpointing is full recompute: drop it for --recompute_granularity selective")
    if build.gradient_checkpointing:
        granularity = "full"
    if build.recompute_num_layers is not None:
        if granularity != "full":
            raise ValueError("--recompute_num_layers needs --recompute_granularity full")
        if build.recompute_num_layers < 1:
            raise ValueError(f"--recompute_num_layers must be >= 1, got {build.recompute_num_layers}")
    if build.recompute_modules is not None:
        if granularity != "selective":
            raise ValueError("--recompute_modules needs --recompute_granularity selective")
        unknown = sorted(set(build.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ValueError(f"--recompute_modules: {', '.join(unknown)} not among {', '.join(RECOMPUTE_MODULES)}")
    if granularity == "full":
        if build.recompute_num_layers is None:  # every layer, one checkpoint each
            return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=build.recompute_num_layers)
    if granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(build.recompute_modules or ("core_attn",)))
    return {}


def resolve_grouped_gemm(build: ModelBuildConfig) -> bool:
    """``--moe_grouped_gemm``: unset means on exactly where TE's layer spec runs (TEGroupedMLP; the
    local spec's legacy GroupedMLP needs the separate grouped_gemm package and other weight names)."""
    te = detect_layer_spec(resolve_transformer_impl(build)).impl == "transformer_engine"
    if build.moe_grouped_gemm and not te:
        raise ValueError("--moe_grouped_gemm needs the Transformer Engine layer spec (TEGroupedMLP): install "
                         "transformer-engine on a CUDA machine, or leave it off")
    return te if build.moe_grouped_gemm is None else build.moe_grouped_gemm


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
        expert_ffn_size=adapter.hf_config.intermediate_size if adapter.num_experts else None,
    )
    check_moe_options(build, parallel, moe=bool(adapter.num_experts))
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
