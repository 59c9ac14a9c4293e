"""Step time from FLOPs at an assumed kernel efficiency, plus the communication a layout adds.

Compute: 6 N per trained token (2 N forward, 4 N backward; N counts active parameters: a MoE
token meets top-k experts) plus causal attention, 6 L s a d per token; full recompute adds a
forward. The pipeline bubble stretches compute by (PP - 1) / (micro-batches + PP - 1).
Communication (not overlapped, as the engine runs it): TP all-reduces (or all-gather +
reduce-scatter under sequence parallel: the same bytes), context-parallel ring passes of K / V,
expert all-to-alls, pipeline sends, and the data-parallel gradient reduce-scatter + parameter
all-gather of the distributed optimizer. Ring collectives move 2 (n-1)/n of the buffer
(all-reduce) or (n-1)/n (reduce-scatter, all-gather) per rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from tools.plan.memory import Grid, Shape


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    gpu_tflops: float  # dense bf16 peak per GPU
    mfu: float  # assumed fraction of the peak the kernels reach
    intra_node_gbps: float  # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float  # GB/s per GPU across nodes (InfiniBand / RoCE)
    hbm_gbps: float  # GB/s of GPU memory, for decoding

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Work:
    """One optimizer step of one model, per data-parallel rank."""

    tokens_per_microbatch: int  # sequences x length
    num_microbatches: int
    seq_len: int
    bytes_per_value: int = 2
    recompute_full: bool = False
    forward_only: bool = False


def flops_per_token(active_params: int, shape: Shape, num_layers: int, seq_len: int, *, forward_only: bool,
                    recompute_full: bool) -> float:
    forward = 2 * active_params + 2 * num_layers * seq_len * shape.heads * shape.head_dim  # causal: half of 4 L s a d
    if forward_only:
        return forward
    return forward * (4 if recompute_full else 3)


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s of a group of ``span`` consecutive ranks: NVLink while it fits in a node."""
    return (cluster.intra_node_gbps if span <= cluster.gpus_per_node else cluster.inter_node_gbps) * 1e9


def step_seconds(work: Work, *, active_params: int, rank_params: int, expert_rank_params: int, shape: Shape,
                 num_layers: int, stage_layers: int, num_moe_layers: int, grid: Grid,
                 cluster: Cluster) -> dict[str, float]:
    """Seconds of each part of a step on the slowest rank (the first pipeline stage; of an uneven split, the
    stage with the most layers, ``stage_layers``, sets the pace of every stage)."""
    tokens = work.tokens_per_microbatch * work.num_microbatches  # per DP rank, whole model
    flops = tokens * flops_per_token(active_params, shape, num_layers, work.seq_len,
                                     forward_only=work.forward_only, recompute_full=work.recompute_full)
    model_ranks = grid.tp * grid.pp * grid.cp
    slowest = stage_layers * grid.pp / num_layers  # 1 for an even split
    compute = flops * slowest / (model_ranks * cluster.gpu_tflops * 1e12 * cluster.mfu)
    bubble = compute * (grid.pp - 1) / work.num_microbatches if grid.pp > 1 else 0.0
    passes = 1 if work.forward_only else (3 if work.recompute_full else 2)  # TP collectives: fwd, bwd (+ recompute)
    local_tokens = work.tokens_per_microbatch / grid.cp
    layers = stage_layers
    activation = local_tokens * shape.hidden * work.bytes_per_value
    tp = 0.0
    if grid.tp > 1:
        tp = (work.num_microbatches * layers * 2 * passes * 2 * (grid.tp - 1) / grid.tp * activation
              / _bandwidth(cluster, grid.tp))
    cp = 0.0
    if grid.cp > 1:
        kv = local_tokens * 2 * max(shape.kv_heads // grid.tp, 1) * shape.head_dim * work.bytes_per_value
        cp = work.num_microbatches * layers * (grid.cp - 1) * kv * (1 + 2 * (passes - 1)) / _bandwidth(
            cluster, grid.tp * grid.cp)
    ep = 0.0
    if grid.ep > 1 and num_moe_layers:
        routed = local_tokens * shape.top_k * shape.hidden * work.bytes_per_value * (grid.ep - 1) / grid.ep
        ep = work.num_microbatches * num_moe_layers * stage_layers / num_layers * 2 * passes * routed / _bandwidth(
            cluster, grid.tp * grid.ep)
    pp = 0.0
    if grid.pp > 1:
        pp = work.num_microbatches * 2 * activation / _bandwidth(cluster, grid.tp * grid.cp * grid.pp)
    dp = 0.0
    if not work.forward_only:
        dense = rank_params - expert_rank_params
        dp += _sharded_collectives(dense, grid.dp * grid.cp, cluster, span=model_ranks * grid.dp)
        dp += _sharded_collectives(expert_rank_params, grid.expert_dp, cluster, span=model_ranks * grid.dp)
    return {"compute": compute, "pipeline_bubble": bubble, "tp_comm": tp, "cp_comm": cp, "ep_comm": ep,
            "pp_comm": pp, "dp_comm": dp}


def _sharded_collectives(params: int, ranks: int, cluster: Cluster, *, span: int) -> float:
    """fp32 gradient reduce-scatter plus bf16 parameter all-gather over ``ranks``."""
    if ranks <= 1 or not params:
        return 0.0
    return params * (4 + 2) * (ranks - 1) / ranks / _bandwidth(cluster, span)


def decode_seconds(*, new_tokens: int, sequences_per_engine: int, concurrent: int, weight_bytes_per_gpu: float,
                   cluster: Cluster) -> float:
    """Memory-bound decoding: every step reads the engine's weights once per wave of sequences."""
    waves = -(-sequences_per_engine // max(concurrent, 1))
    return waves * new_tokens * weight_bytes_per_gpu / (cluster.hbm_gbps * 1e9 * 0.7)
