"""The real Megatron model of a layout, built on the meta device: shapes without memory.

The planner's weight, gradient and optimizer figures come from counting the parameters of the
model ``models.builder.build_model`` builds for a rank, so they cannot drift from what a run
allocates. Megatron's process groups are created in a *fake* world (torch's ``fake`` backend:
groups of any size, no peers, no communication), which is all model construction needs.

One build per (TP, EP, expert TP) at PP=1 gives every layer's count; a pipeline stage's count is
then the sum of its layers plus the embedding (first stage) and final norm + output layer (last
stage). ``build_stage`` builds a given stage for real, which the tests hold the sums against.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from models.adapter import ModelAdapter
from models.builder import ModelBuildConfig, build_model
from parallel import cpu_backend, megatron_patches
from parallel.config import ParallelConfig
from parallel.initialize import create_model_parallel_groups


@contextmanager
def fake_world(parallel: ParallelConfig, *, world_size: int | None = None, stage: int = 0):
    """Megatron's process groups of ``parallel`` over a world of fake ranks; this process is the
    first rank of pipeline stage ``stage`` (Megatron's rank order puts PP outermost). A build of
    another stage works too (``build_stage``) except where Megatron asks the group itself (a last
    stage's copy of tied embeddings)."""
    # torch's own test backend: process groups of any size without peers (torch 2.x, stable since 2.1).
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner builds models in a fake process group: run it in a process "
                           "without torch.distributed initialised")
    world = world_size or parallel.minimum_world_size()
    if not torch.cuda.is_available():
        cpu_backend.activate()  # Megatron's MoE dispatcher asks for CUDA streams at construction
    megatron_patches.apply()
    rank = stage * world // parallel.pipeline_model_parallel_size
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        create_model_parallel_groups(parallel, gloo_groups=False)
        yield world
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def meta_build_config(*, bf16: bool = True, value_head: bool = False) -> ModelBuildConfig:
    """The build of a GPU run (bf16 unless told, local layer spec: TE's fused norms hold the same
    parameters), with no initialisation: nothing is allocated or written."""
    return ModelBuildConfig(bf16=bf16, value_head=value_head, transformer_impl="local",
                            overrides=dict(perform_initialization=False, use_cpu_initialization=True))


def build_stage(adapter: ModelAdapter, parallel: ParallelConfig, stage: int, build: ModelBuildConfig):
    """Pipeline stage ``stage``'s model chunk on rank 0 of every other group, on the meta device.
    Call inside :func:`fake_world`."""
    ps.set_pipeline_model_parallel_rank(stage)
    try:
        with torch.device("meta"):
            return build_model(adapter, parallel, build)
    finally:
        ps.set_pipeline_model_parallel_rank(None)


@dataclass(frozen=True)
class LayerParams:
    dense: int  # attention, norms, router, shared parts: sharded over DP x CP by the optimizer
    expert: int  # the layer's local experts: sharded over expert data parallel


@dataclass(frozen=True)
class RankParams:
    """Parameters one rank of a (TP, EP, expert TP) grid holds, piece by piece (PP=1 build)."""

    embedding: int
    layers: tuple[LayerParams, ...]  # per global layer
    final_norm: int
    output: int  # LM output layer shard, or the value head (0 when tied to the embedding at PP=1)
    tied_output: int  # the embedding shard a last stage holds for a tied output layer under PP > 1
    param_bytes: int  # bytes per parameter of the build


@dataclass(frozen=True)
class StageParams:
    """Parameters of one rank of a pipeline stage."""

    stage: int
    num_layers: int
    embedding: int
    layers: LayerParams
    head: int  # final norm + output layer / value head (last stage)

    @property
    def dense(self) -> int:
        return self.embedding + self.layers.dense + self.head

    @property
    def expert(self) -> int:
        return self.layers.expert

    @property
    def total(self) -> int:
        return self.dense + self.expert


_COUNTS: dict[tuple, "RankParams"] = {}  # one build per architecture and (TP, EP, expert TP)


def rank_params(adapter: ModelAdapter, parallel: ParallelConfig, *, bf16: bool = True,
                value_head: bool = False) -> RankParams:
    """Count one rank's parameters for the TP / EP / expert TP of ``parallel`` (PP and CP do not
    change a layer's shards)."""
    tp, ep, etp = (parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size,
                   parallel.expert_tensor_parallel)
    key = (adapter.hf_config.to_json_string(use_diff=False), tp, ep, etp, bf16, value_head)
    if key not in _COUNTS:
        _COUNTS[key] = _count_rank(adapter, tp, ep, etp, bf16=bf16, value_head=value_head)
    return _COUNTS[key]


def _count_rank(adapter: ModelAdapter, tp: int, ep: int, etp: int, *, bf16: bool, value_head: bool) -> RankParams:
    flat = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp if adapter.num_experts else None)
    with fake_world(flat):
        model = build_stage(adapter, flat, 0, meta_build_config(bf16=bf16, value_head=value_head))
        counts = _count_by_piece(model, adapter.num_layers)
        param_bytes = next(model.parameters()).element_size()
    tied = counts["embedding"] if adapter.tie_word_embeddings and not value_head else 0
    return RankParams(embedding=counts["embedding"], layers=tuple(counts["layers"]), final_norm=counts["final_norm"],
                      output=counts["output"], tied_output=tied, param_bytes=param_bytes)


def _count_by_piece(model, num_layers: int) -> dict:
    dense, expert = [0] * num_layers, [0] * num_layers
    pieces = {"embedding": 0, "final_norm": 0, "output": 0}
    for name, param in model.named_parameters():
        n = param.numel()
        if name.startswith("decoder.layers."):
            layer = int(name.split(".")[2])
            (expert if ".mlp.experts." in name else dense)[layer] += n
        elif name.startswith("embedding."):
            pieces["embedding"] += n
        elif name.startswith("decoder.final_layernorm"):
            pieces["final_norm"] += n
        elif name.startswith("output_layer."):
            pieces["output"] += n
        else:
            raise ValueError(f"the planner does not know where parameter {name} belongs")
    pieces["layers"] = [LayerParams(d, e) for d, e in zip(dense, expert)]
    return pieces


def stage_params(counts: RankParams, stage_num_layers: list[int]) -> list[StageParams]:
    """Each pipeline stage's rank: its layers (``ParallelConfig.stage_num_layers``: the split the builder
    makes, even or uneven), the embedding on the first stage, the final norm and output layer on the last."""
    pp = len(stage_num_layers)
    stages, start = [], 0
    for stage, num_layers in enumerate(stage_num_layers):
        mine = counts.layers[start:start + num_layers]
        start += num_layers
        layers = LayerParams(sum(x.dense for x in mine), sum(x.expert for x in mine))
        last = stage == pp - 1
        head = counts.final_norm + counts.output + (counts.tied_output if pp > 1 else 0) if last else 0
        stages.append(StageParams(stage=stage, num_layers=num_layers, embedding=counts.embedding if stage == 0 else 0,
                                  layers=layers, head=head))
    return stages


def count_stage_build(model) -> tuple[int, int]:
    """(dense, expert) parameters of a built model chunk, for holding :func:`stage_params` against."""
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return sum(p.numel() for p in model.parameters()) - expert, expert

