"""Full-size check of an architecture's HF <-> Megatron weight map, without the weights.

Every rank of a TP x PP x EP layout (built on the meta device) loads its shards through the
weight map's own ``Split.load`` from a reader that knows the HF tensors' shapes only (the HF
model built on the meta device) and records the slices asked for. The map is right when every
HF tensor is read, every shard has its parameter's shape, and the slices of the TP ranks tile
each split tensor exactly (no element twice, none missed).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from models.registry import get_adapter
from models.weights import named_weights
from parallel.config import ParallelConfig
from tools.plan import meta
from tools.plan.configs import load_hf_config


class ShapeReader:
    """The reader interface of ``models.hf_checkpoint.HFCheckpointReader`` over shapes only."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes
        self.reads: dict[str, list[tuple]] = defaultdict(list)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> torch.Size:
        return self.shapes[name]

    def read(self, name: str, dim: int | None = None, start: int | None = None, stop: int | None = None):
        shape = list(self.shapes[name])
        if dim is not None:
            shape[dim] = stop - start
        self.reads[name].append((dim, start, stop))
        return torch.empty(shape, device="meta", dtype=torch.bfloat16)


def hf_shapes(hf_config) -> dict[str, torch.Size]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    adapter = get_adapter(hf_config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        shapes.update(_on_disk(adapter, name, tensor.shape))
    return shapes


def _on_disk(adapter, name: str, shape: torch.Size) -> dict[str, torch.Size]:
    """transformers 5 fuses a MoE layer's experts in memory (``mlp.experts.gate_up_proj``) and converts
    on load / save; checkpoints (and the weight map) keep one tensor per expert, named as the adapter's
    router and expert specs say (Mixtral's ``block_sparse_moe.experts.{e}.w1``, Qwen's ``mlp.experts.{e}.gate_proj``)."""
    prefix, _, tail = name.partition(".mlp.")
    if not adapter.num_experts or tail not in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        return {name: shape}
    layer = int(prefix.rsplit(".", 1)[-1])
    experts = {spec.megatron: spec.hf for spec in adapter.expert_specs()}
    if tail == "gate.weight":
        router = next(spec.hf[0] for spec in adapter.mlp_specs() if spec.megatron == "mlp.router.weight")
        return {router.format(layer=layer): shape}
    if tail == "experts.gate_up_proj":
        num, rows, cols = shape
        return {t.format(layer=layer, expert=e): torch.Size((rows // 2, cols))
                for e in range(num) for t in experts["linear_fc1.weight"]}
    return {experts["linear_fc2.weight"][0].format(layer=layer, expert=e): torch.Size(shape[1:]) for e in range(shape[0])}


def check_weight_map(model: str, *, tp: int, pp: int, ep: int = 1, first: int | None = None,
                     last: int | None = None) -> dict:
    """``first`` / ``last``: an uneven pipeline split (``--decoder_first/last_pipeline_num_layers``)."""
    adapter = get_adapter(load_hf_config(model))
    moe = bool(adapter.num_experts)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
                              expert_model_parallel_size=ep, expert_tensor_parallel_size=1 if moe else None)
    shapes = hf_shapes(adapter.hf_config)
    reader = ShapeReader(shapes)
    problems: list[str] = []
    offsets = parallel.stage_layer_offsets(adapter.num_layers)
    with meta.fake_world(parallel), torch.device("meta"):
        for stage in range(pp):
            chunk = meta.build_stage(adapter, parallel, stage, meta.meta_build_config())
            for name, param in named_weights(chunk):
                expert = ".mlp.experts." in name
                size = 1 if expert else tp  # expert TP 1 here
                for ep_rank in range(ep if expert else 1):
                    spec, index = adapter.resolve(name, layer_offset=offsets[stage],
                                                  expert_offset=ep_rank * (adapter.num_experts or 0) // ep)
                    names = [t.format(**index) for t in spec.hf]
                    for rank in range(size):
                        shard = spec.split.load(reader, names, param.shape, rank=rank, size=size, adapter=adapter)
                        if shard.shape != param.shape:
                            problems.append(f"{name} (TP rank {rank}): {tuple(shard.shape)} != {tuple(param.shape)}")
    problems += [f"{n}: never read" for n in shapes if n not in reader.reads]
    problems += _tiling_problems(reader, shapes, tp)
    return {"problems": problems, "tensors": len(reader.reads), "hf_tensors": len(shapes)}


def _tiling_problems(reader: ShapeReader, shapes: dict, tp: int) -> list[str]:
    problems = []
    for name, reads in reader.reads.items():
        split = [r for r in reads if r[0] is not None]
        if not split:
            continue  # read whole: replicated (norms, router) or one expert per rank
        dims = {d for d, _, _ in split}
        if len(dims) != 1 or len(split) != len(reads):
            problems.append(f"{name}: read along dims {sorted(dims)} and whole")
            continue
        dim = dims.pop()
        covered = sorted((start, stop) for _, start, stop in split if stop > start)
        edge, full = 0, shapes[name][dim]
        for start, stop in covered:
            if start != edge:
                problems.append(f"{name}: dim {dim} {'overlap' if start < edge else 'gap'} at {min(start, edge)}")
                break
            edge = stop
        if edge != full:
            problems.append(f"{name}: dim {dim} covered up to {edge} of {full}")
    return problems
