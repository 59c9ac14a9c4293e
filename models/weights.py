"""Move weights between HF checkpoints and a running Megatron model of any TP/PP/EP layout.

Loading: every rank reads from the safetensors files only the slices it owns, one parameter at
a time, so memory is bounded by the largest tensor, not the model. Exporting: a streamed,
per-parameter iterator of HF-named full tensors (TP shards gathered over the TP group, each PP
stage and EP rank yielding its own layers / experts) -- the iterator that HF saving and the
vLLM weight sync consume.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from models.adapter import AttentionShape, ModelAdapter, Split, WeightSpec
from models.heads import is_value_model
from models.hf_checkpoint import (
    CheckpointError,
    HFCheckpointReader,
    HFShardWriter,
    copy_side_files,
    finalize_hf_directory,
)
from parallel.resharding import all_gather_shards, merge_fused_shards, shard_range


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _tp_placement(name: str) -> tuple[int, int, object]:
    """(rank, size, group) of the tensor-parallel group that shards this parameter."""
    if _is_expert(name):
        return (
            ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group(),
        )
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
    )


def _offsets(model, adapter: ModelAdapter) -> dict:
    experts_per_rank = (adapter.num_experts or 0) // ps.get_expert_model_parallel_world_size()
    return {
        "layer_offset": get_transformer_layer_offset(model.config),
        "expert_offset": ps.get_expert_model_parallel_rank() * experts_per_rank,
    }


def _resolve(model, adapter: ModelAdapter, name: str, offsets: dict) -> tuple[WeightSpec, dict]:
    if name == "output_layer.weight" and is_value_model(model):
        name = "value_head.weight"  # the ValueHead sits where the LM output layer would
    return adapter.resolve(name, **offsets)


def _hf_names(spec: WeightSpec, index: dict) -> list[str]:
    return [template.format(**index) for template in spec.hf]


# ----- HF -> Megatron -------------------------------------------------------------------------
def _read_rows(reader, name, start, stop):
    return reader.read(name, dim=0, start=start, stop=stop)


def _read_qkv(reader, names, attn: AttentionShape, rank: int, size: int) -> torch.Tensor:
    """Rows of this rank's query groups, laid out per group as Megatron does: [q heads; k; v]."""
    q_name, k_name, v_name = names
    groups = attn.num_kv_heads // size
    first = rank * groups
    q_rows = attn.heads_per_group * attn.head_dim
    q = _read_rows(reader, q_name, first * q_rows, (first + groups) * q_rows)
    k = _read_rows(reader, k_name, first * attn.head_dim, (first + groups) * attn.head_dim)
    v = _read_rows(reader, v_name, first * attn.head_dim, (first + groups) * attn.head_dim)
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, q_rows, *tail), k.reshape(groups, attn.head_dim, *tail), v.reshape(groups, attn.head_dim, *tail)],
        dim=1,
    )
    return fused.reshape(-1, *tail)


def _read_vocab(reader, name, local_rows: int, rank: int, vocab_size: int) -> torch.Tensor:
    start = rank * local_rows
    stop = min(start + local_rows, vocab_size)
    rows = _read_rows(reader, name, start, stop) if stop > start else None
    hidden = reader.shape(name)[1]
    out = torch.zeros(local_rows, hidden, dtype=rows.dtype if rows is not None else torch.float32)
    if rows is not None:
        out[: stop - start] = rows
    return out


def read_shard(reader, spec: WeightSpec, names: list[str], local_shape, *, rank, size, adapter) -> torch.Tensor:
    """This rank's shard of one Megatron parameter, read slice-wise from the HF checkpoint."""
    split = spec.split
    if split is Split.REPLICATED:
        return reader.read(names[0])
    if split is Split.VOCAB:
        return _read_vocab(reader, names[0], local_shape[0], rank, adapter.vocab_size)
    if split is Split.QKV:
        return _read_qkv(reader, names, adapter.attention, rank, size)
    if split is Split.ROW:
        start, stop = shard_range(reader.shape(names[0])[1], rank, size)
        return reader.read(names[0], dim=1, start=start, stop=stop)
    parts = []
    for name in names:  # COLUMN, GATE_UP
        start, stop = shard_range(reader.shape(name)[0], rank, size)
        parts.append(_read_rows(reader, name, start, stop))
    return torch.cat(parts, dim=0)


def load_hf_weights(model, adapter: ModelAdapter, hf_path: str | os.PathLike, *, progress: bool = False) -> None:
    """Fill ``model`` (this rank's chunk) from an HF checkpoint directory.

    A value head absent from the checkpoint (a critic initialised from a causal LM) keeps its
    random initialisation; every other missing tensor or shape mismatch is an error.
    """
    reader = HFCheckpointReader(hf_path)
    offsets = _offsets(model, adapter)
    params = list(model.named_parameters())
    if progress:
        from tqdm import tqdm

        params = tqdm(params, desc="load HF weights", unit="tensor")
    try:
        for name, param in params:
            spec, index = _resolve(model, adapter, name, offsets)
            names = _hf_names(spec, index)
            if spec.megatron == "value_head.weight" and names[0] not in reader:
                continue
            rank, size, _ = _tp_placement(name)
            local = read_shard(reader, spec, names, param.shape, rank=rank, size=size, adapter=adapter)
            if local.shape != param.shape:
                raise CheckpointError(
                    f"{names} in {hf_path} gives shape {tuple(local.shape)} for Megatron parameter "
                    f"{name} of shape {tuple(param.shape)} (config and weights disagree?)"
                )
            with torch.no_grad():
                param.copy_(local)
    finally:
        reader.close()


# ----- Megatron -> HF -------------------------------------------------------------------------
def _split_qkv(full: torch.Tensor, attn: AttentionShape) -> list[torch.Tensor]:
    tail = full.shape[1:]
    grouped = full.reshape(attn.num_kv_heads, (attn.heads_per_group + 2) * attn.head_dim, *tail)
    q_rows = attn.heads_per_group * attn.head_dim
    q, k, v = grouped.split([q_rows, attn.head_dim, attn.head_dim], dim=1)
    return [t.reshape(-1, *tail) for t in (q, k, v)]


def merge_shards(spec: WeightSpec, shards: list[torch.Tensor], adapter: ModelAdapter) -> list[torch.Tensor]:
    """HF tensors (in ``spec.hf`` order) from every TP rank's shard of one Megatron parameter."""
    split = spec.split
    if split is Split.REPLICATED:
        return [shards[0]]
    if split is Split.ROW:
        return [torch.cat(shards, dim=1)]
    if split is Split.VOCAB:
        return [torch.cat(shards, dim=0)[: adapter.vocab_size]]
    if split is Split.QKV:
        return _split_qkv(torch.cat(shards, dim=0), adapter.attention)
    if split is Split.GATE_UP:
        return list(merge_fused_shards(shards, dim=0, num_parts=2).chunk(2, dim=0))
    return [torch.cat(shards, dim=0)]


def _is_owner(name: str) -> bool:
    """One rank per distinct tensor yields it (DP / CP / TP replicas stay silent)."""
    if _is_expert(name):
        return ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0
    return ps.get_data_parallel_rank(with_context_parallel=True) == 0 and ps.get_tensor_model_parallel_rank() == 0


def iter_hf_weights(
    model,
    adapter: ModelAdapter,
    *,
    dtype: torch.dtype | None = None,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.data,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the tensors this rank owns, one parameter at a time.

    Collective over each TP group: every rank of the model must consume the iterator, in step.
    ``tensor_of`` selects what to export
    (``lambda p: p.main_grad`` exports gradients).
    """
    offsets = _offsets(model, adapter)
    for name, param in model.named_parameters():
        spec, index = _resolve(model, adapter, name, offsets)
        if spec.megatron == "output_layer.weight" and adapter.tie_word_embeddings:
            continue  # the first stage exports the embedding HF ties to it
        _, _, group = _tp_placement(name)
        local = tensor_of(param)
        shards = [local] if spec.split is Split.REPLICATED else all_gather_shards(local, group)
        if not _is_owner(name):
            continue
        for hf_name, tensor in zip(_hf_names(spec, index), merge_shards(spec, shards, adapter)):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _hf_config_for_export(adapter: ModelAdapter, value_head: bool):
    config = copy.deepcopy(adapter.hf_config)
    if value_head:
        config.architectures = [adapter.hf_causal_lm_class.replace("ForCausalLM", "ForSequenceClassification")]
        config.num_labels = 1
    else:
        config.architectures = [adapter.hf_causal_lm_class]
    return config


def save_hf_checkpoint(
    model,
    adapter: ModelAdapter,
    save_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 << 30,
    progress: bool = False,
    extra_files: dict[str, str] | None = None,
    config_updates: dict | None = None,
) -> None:
    """Write an HF checkpoint directory (safetensors shards + index + config + tokenizer).

    ``config_updates`` are extra ``config.json`` fields (a reward model's ``mean`` / ``std``).

    Collective over the whole world. Each owning rank streams its tensors into its own shard
    files; rank 0 renames them, writes the index, and moves the finished directory into place
    (a crash leaves no half-written ``save_dir``).
    """
    save_dir = Path(save_dir)
    staging = save_dir.with_name(save_dir.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    writer = HFShardWriter(staging, prefix=f"rank{rank:05d}", max_shard_bytes=max_shard_bytes)
    tensors = iter_hf_weights(model, adapter, dtype=adapter.export_dtype())
    if progress and rank == 0:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="export HF weights", unit="tensor")
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.flush()
    maps: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(maps, writer.weight_map)
    if rank == 0:
        weight_map = {name: file for m in maps for name, file in m.items()}
        finalize_hf_directory(staging, weight_map)
        if source_dir is not None:
            copy_side_files(source_dir, staging)
        value_head = any(name == "score.weight" for name in weight_map)
        hf_config = _hf_config_for_export(adapter, value_head)
        for key, value in (config_updates or {}).items():
            setattr(hf_config, key, value)
        hf_config.save_pretrained(staging)
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
        if save_dir.exists():
            shutil.rmtree(save_dir)
        os.replace(staging, save_dir)
    dist.barrier()
