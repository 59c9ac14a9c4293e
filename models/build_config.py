"""What the trainer asks of the model beyond its architecture (``--bf16``, recompute, MoE options,
the value head, LoRA), declared apart from the builder so that a job's parser imports neither
torch nor megatron-core."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.lora.config import LoraConfig
from parallel.options import option

TransformerImpl = Literal["auto", "local", "transformer_engine"]


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
    moe_router_bias_update_rate: float = option(
        0.0, help="MoE with a router expert bias (DeepSeek-V3's e_score_correction_bias): after every step each "
                  "expert's bias moves by this rate toward balance, +rate below the mean load and -rate above "
                  "(Megatron's aux-loss-free balancing); 0: the bias stays as loaded. Off by default: in RL a "
                  "moving router is one more difference between the trained and the rollout policy")
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
    def params_dtype(self):
        """torch.bfloat16 or torch.float32 (``resolve_bf16`` on this machine)."""
        import torch

        return torch.bfloat16 if resolve_bf16(self.bf16, cuda=torch.cuda.is_available()) else torch.float32


def resolve_bf16(bf16: bool | None, *, cuda: bool) -> bool:
    """Unset means the hardware's precision: fp32 on GPU would skip flash-attn and send GQA attention
    to the math kernel (full score matrices); bf16 on CPU is slower than fp32 and inexact for tests.
    Resolved where the model is built, so a CPU-only driver never decides for GPU ranks."""
    return cuda if bf16 is None else bf16


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
