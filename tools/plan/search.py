"""Every layout of the cluster that the model splits evenly over, ranked by estimated step time.

Searched: TP (dividing a node's GPUs and the heads and KV heads), PP (dividing the layers, or those the
uneven split given by ``--decoder_first/last_pipeline_num_layers`` adds up for), CP
(1, 2, 4, 8), EP (dividing the experts), recompute none / full; sequence parallel whenever TP > 1.
A layout fixed on the command line is kept; what is left unset is searched.
"""
from __future__ import annotations

from dataclasses import replace

from models.adapter import ModelAdapter
from parallel.config import ParallelConfig
from tools.plan.plan import Layout, Plan, layout_of, make_plan
from tools.plan.spec import ClusterSpec, LayoutSpec, ModelSpec, RolloutSpec


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _pipeline_sizes(num_layers: int, spec: LayoutSpec, world: int) -> list[int]:
    first, last = spec.decoder_first_pipeline_num_layers, spec.decoder_last_pipeline_num_layers
    if first is None and last is None:
        return _divisors(num_layers, world)
    sizes = []
    for pp in range(2, min(num_layers, world) + 1):
        try:
            ParallelConfig(pipeline_model_parallel_size=pp, decoder_first_pipeline_num_layers=first,
                           decoder_last_pipeline_num_layers=last).stage_num_layers(num_layers)
        except ValueError:
            continue
        sizes.append(pp)
    return sizes


def candidate_layouts(adapter: ModelAdapter, spec: LayoutSpec, cluster: ClusterSpec) -> list[Layout]:
    world = cluster.nodes * cluster.gpus_per_node
    moe = bool(adapter.num_experts)
    tps = [spec.tensor_model_parallel_size] if spec.tensor_model_parallel_size else [
        t for t in _divisors(cluster.gpus_per_node, cluster.gpus_per_node)
        if adapter.attention.num_heads % t == 0 and adapter.attention.num_kv_heads % t == 0]
    pps = [spec.pipeline_model_parallel_size] if spec.pipeline_model_parallel_size else _pipeline_sizes(
        adapter.num_layers, spec, world)
    cps = [spec.context_parallel_size] if spec.context_parallel_size else [c for c in (1, 2, 4, 8) if c <= world]
    eps = [spec.expert_model_parallel_size] if spec.expert_model_parallel_size else (
        _divisors(adapter.num_experts, world) if moe else [1])
    recomputes = [spec.recompute_granularity] if spec.recompute_granularity else ["none", "full"]
    base = layout_of(spec, moe)
    layouts = []
    for tp in tps:
        for pp in pps:
            for cp in cps:
                if world % (tp * pp * cp):
                    continue
                for ep in eps:
                    etp = spec.expert_tensor_parallel_size or (1 if ep > 1 else tp)
                    for recompute in recomputes:
                        layouts.append(replace(base, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp if moe else tp,
                                               recompute=recompute, sequence_parallel=tp > 1 if
                                               spec.sequence_parallel is None else spec.sequence_parallel))
    return layouts


def search(model: ModelSpec, cluster: ClusterSpec, spec: LayoutSpec, rollout: RolloutSpec, adapter: ModelAdapter,
           reward_adapter=None) -> tuple[list[Plan], int]:
    """(plans that fit, fastest first; number of layouts tried)."""
    layouts = candidate_layouts(adapter, spec, cluster)
    fitting = []
    for layout in layouts:
        plan = make_plan(model, cluster, layout, spec, rollout, adapter, reward_adapter)
        if plan.fits:
            fitting.append(plan)
    fitting.sort(key=lambda p: (p.step_seconds, p.peak_bytes))
    return fitting, len(layouts)


def is_complete(spec: LayoutSpec, adapter: ModelAdapter) -> bool:
    """Whether the command line fixes a whole layout (then it is checked, not searched)."""
    fixed = [spec.tensor_model_parallel_size, spec.pipeline_model_parallel_size, spec.context_parallel_size,
             spec.recompute_granularity]
    if adapter.num_experts:
        fixed.append(spec.expert_model_parallel_size)
    return all(v is not None for v in fixed)
