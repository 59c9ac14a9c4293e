"""Bytes per rank of one model role: weights, gradients, optimizer shards, activations, logits.

Weights / gradients / optimizer come from the meta-device parameter count (``tools.plan.meta``)
and the engine's fixed choices (``engine.runtime.optimizer``): Megatron DDP reduces gradients into
an fp32 buffer (``grad_reduce_in_fp32``), and the distributed optimizer shards Adam's two moments
(plus fp32 main weights when the model is bf16) over data x context parallel ranks, the experts'
over expert data parallel ranks.

Activations are the tensors autograd saves, counted per token for the layers this engine builds
(local layer spec, ``models.norms.LocalNorm``, our core attention = SDPA / flash-attn saving q, k,
v, out and the log-sum-exp, SwiGLU). Each term names what saves it; ``tools.plan.measure`` holds
the sum against the saved tensors of a real step (tests/test_plan_measured.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.adapter import ModelAdapter
from tools.plan.meta import StageParams

Recompute = Literal["none", "full", "selective"]
FP32 = 4


@dataclass(frozen=True)
class Shape:
    """What the activation count needs of an architecture."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    padded_vocab: int
    num_experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0  # one routed expert's hidden size

    @classmethod
    def of(cls, adapter: ModelAdapter, tp: int) -> "Shape":
        c, attn = adapter.hf_config, adapter.attention
        return cls(hidden=c.hidden_size, ffn=c.intermediate_size, heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                   head_dim=attn.head_dim, padded_vocab=adapter.padded_vocab_size(tp),
                   num_experts=adapter.num_experts or 0, top_k=getattr(c, "num_experts_per_tok", 0) or 0,
                   expert_ffn=adapter.expert_ffn_hidden_size or 0)


@dataclass(frozen=True)
class Grid:
    """A rank's slot: the sizes the per-rank count divides by."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def expert_dp(self) -> int:
        return self.tp * self.cp * self.dp // (self.etp * self.ep)


@dataclass(frozen=True)
class Activations:
    """How a step runs: tokens per micro-batch per rank, and what is recomputed."""

    micro_batch: int  # sequences per micro-batch (DPO / RM pairs count twice)
    seq_len: int  # tokens per sequence (before context parallel splits it)
    num_microbatches: int  # per optimizer step per data-parallel rank
    bytes_per_value: int  # 2 for bf16, 4 for fp32
    recompute: Recompute = "none"
    recompute_num_layers: int | None = None  # full: layers per stage recomputed (None: all)
    recompute_modules: tuple[str, ...] = ("core_attn",)  # selective: Megatron's module names


def layer_floats_per_token(shape: Shape, grid: Grid, *, moe: bool, recompute_modules: tuple[str, ...] = ()) -> float:
    """Values one layer saves per token (of the rank's sequence shard) for backward."""
    t, h, d = grid.tp, shape.hidden, shape.head_dim
    residual = h / t if grid.sequence_parallel else h  # sequence parallel splits the residual stream
    # LocalNorm saves its input, the 1/rms and x/rms; the linear after it saves the norm output.
    norm = 3 * residual + residual / h
    if "layernorm" in recompute_modules:
        norm = residual  # only the input is kept; the rest is recomputed in backward
    heads, groups = shape.heads / t, shape.kv_heads / t
    # q and k after rotary, the fused qkv output (v is a view of it), the attention output, and
    # the log-sum-exp (fp32, counted at the activation width: under bf16 2 bytes short per head).
    attention = (heads + groups + (heads + 2 * groups) + heads) * d
    lse = heads
    if "core_attn" in recompute_modules:
        lse = 0.0
    if moe:
        experts_ffn = shape.expert_ffn or shape.ffn  # expert TP shards the expert's hidden size
        # Per routed copy of a token: the permuted input and the dispatcher's two reorderings, then
        # the expert's SwiGLU; plus the router's probabilities. Routing is assumed balanced.
        mlp = shape.top_k * (3 * h + 5 * experts_ffn / grid.etp) + shape.num_experts
    else:
        # SwiGLU: fc1's output (gate | up), the gate's SiLU input and output, and fc2's input.
        mlp = 5 * shape.ffn / t
        if "mlp" in recompute_modules:
            mlp = 0.0
    return 2 * norm + attention + lse + mlp


def rotary_floats_per_token(shape: Shape, micro_batch: int) -> float:
    """cos / sin tables of q and k: per position, shared by the micro-batch's sequences."""
    return 4 * shape.head_dim / micro_batch


def head_floats_per_token(shape: Shape, grid: Grid, *, value_head: bool) -> float:
    """Final norm (input, 1/rms, x/rms, output) and the fp32 logits the cross-entropy keeps."""
    h = shape.hidden / grid.tp if grid.sequence_parallel else shape.hidden
    logits = 1 if value_head else shape.padded_vocab / grid.tp
    return 3 * h + h / shape.hidden + logits


def in_flight_microbatches(grid: Grid, stage: int, num_microbatches: int) -> int:
    """1F1B: stage k holds the activations of (PP - k) micro-batches at its peak."""
    return min(grid.pp - stage, num_microbatches)


def activation_bytes(stage: StageParams, shape: Shape, grid: Grid, run: Activations, *,
                     moe_layers: int, last: bool, value_head: bool) -> tuple[int, int]:
    """(activations, logits) bytes at this stage's peak."""
    tokens = run.micro_batch * run.seq_len / grid.cp
    b = run.bytes_per_value
    modules = run.recompute_modules if run.recompute == "selective" else ()
    dense_layers = stage.num_layers - moe_layers
    per_layer = {moe: layer_floats_per_token(shape, grid, moe=moe, recompute_modules=modules) for moe in (False, True)}
    full = per_layer[False] * dense_layers + per_layer[True] * moe_layers
    full += rotary_floats_per_token(shape, run.micro_batch)
    head = head_floats_per_token(shape, grid, value_head=value_head) if last else 0.0
    in_flight = in_flight_microbatches(grid, stage.stage, run.num_microbatches)
    if run.recompute == "full":
        recomputed = stage.num_layers if run.recompute_num_layers is None else min(run.recompute_num_layers,
                                                                                   stage.num_layers)
        kept = full * (stage.num_layers - recomputed) / max(stage.num_layers, 1)
        residual = shape.hidden / grid.tp if grid.sequence_parallel else shape.hidden
        stored = (kept + residual * recomputed) * in_flight  # a recomputed layer keeps only its input
        # Backward recomputes one layer at a time (its input is already stored); the logits are
        # gone by then, so the peak is the larger of the forward's end and one layer's recompute.
        one_layer = max(per_layer.values()) - residual + rotary_floats_per_token(shape, run.micro_batch) \
            if recomputed else 0.0
        total = stored + max(one_layer, head)
    else:
        # A selectively recomputed MLP comes back for one layer at a time in backward, after the logits went.
        recomputed_mlp = 5 * shape.ffn / grid.tp if "mlp" in modules and dense_layers else 0.0
        total = full * in_flight + max(head, recomputed_mlp)
    return int((total - head) * tokens * b), int(head * tokens * FP32)


@dataclass(frozen=True)
class RoleState:
    """What of a role lives on the device: a trained model, or a frozen one (reference, reward)."""

    trainable: bool
    bf16: bool = True
    adam_offload: bool = False  # optimizer state in host memory (Megatron's optimizer CPU offload)


def state_bytes(stage: StageParams, grid: Grid, state: RoleState, param_bytes: int) -> dict[str, int]:
    """Weights, gradient buffer and optimizer shards of one rank of ``stage``."""
    weights = stage.total * param_bytes
    if not state.trainable:
        return {"weights": weights, "grads": 0, "optimizer": 0, "optimizer_host": 0}
    grads = stage.total * FP32  # DDP's fp32 main-grad buffer covers every local parameter
    per_param = 2 * FP32 + (FP32 if state.bf16 else 0)  # Adam m, v (+ fp32 main weights under bf16)
    optimizer = int(stage.dense * per_param / (grid.dp * grid.cp) + stage.expert * per_param / grid.expert_dp)
    on_device = 0 if state.adam_offload else optimizer
    return {"weights": weights, "grads": grads, "optimizer": on_device, "optimizer_host": optimizer - on_device}
