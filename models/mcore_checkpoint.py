"""The sharded Megatron checkpoint format: what converters write and trainers save / resume from.

A checkpoint directory holds:

- megatron-core ``dist_checkpointing`` files of the model's sharded state dict (optionally the
  optimizer's and more, added by the trainer): reloadable under a different TP / PP / EP layout;
- ``hf/``: the HF config and tokenizer files the model came from (so it can be rebuilt and
  exported without the original directory), and ``tensor_shapes.json``, the names and shapes of
  that HF checkpoint's tensors (vLLM engines started from ``hf/`` check weight syncs against it);
- ``meta.json``: format version, architecture and the padded vocabulary size (a training
  checkpoint adds its step and the parallel layout it was written at);
- ``manifest.json``, written last: every file with its size and CRC-32 (``models.manifest``). A
  directory without a manifest or whose files disagree with it (a crash, a truncated copy, a
  corrupt byte) is not a checkpoint.

Directories are written under a staging name unique to the job, fsynced, and renamed into place
when complete (``models.hf_checkpoint.staged_directory``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling

from models.adapter import ModelAdapter
from models.heads import is_value_model
from models.hf_checkpoint import (
    TENSOR_SHAPES_NAME,
    CheckpointError,
    copy_side_files,
    hf_tensor_shapes,
    staged_directory,
    without_quantization,
    write_passthrough,
)
from models.manifest import verify_checkpoint_files, write_manifest

FORMAT_VERSION = 1
META = "meta.json"
HF_DIR = "hf"
COMMON_STATE = "common_state.pt"
RANK_STATE_DIR = "rank_state"


def _save_strategy():
    # thread_count=1: a synchronous single writer per rank (the async multi-process writer is not
    # needed for correctness and costs a process pool per save).
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def verify_checkpoint(directory: str | os.PathLike, *, checksums: bool = True, group=None) -> dict:
    """Raise CheckpointError naming the problem unless ``directory`` is a complete checkpoint; its
    meta.json. ``checksums``: also compare every file's CRC-32 (reads the whole checkpoint; with a
    ``group``, collective: the ranks share the reading and agree on the verdict)."""
    verify_checkpoint_files(directory, checksums=checksums, group=group)
    return json.loads((Path(directory) / META).read_text())


def read_meta(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / META).read_text())


def save_sharded(
    sharded_state_dict: dict,
    directory: str | os.PathLike,
    *,
    adapter: ModelAdapter,
    hf_source_dir: str | os.PathLike | None,
    padded_vocab_size: int,
    extra_meta: dict | None = None,
    common_state: dict | None = None,
    rank_state: dict | None = None,
    durable: bool = True,
) -> None:
    """Collectively save a sharded state dict as a complete, atomically placed checkpoint.

    ``common_state`` (rank 0's, e.g. scheduler and data position) goes to ``common_state.pt``;
    ``rank_state`` (e.g. RNG states) to ``rank_state/<rank>.pt`` for every rank. ``durable``
    (off only to measure its cost): files fsynced and checksummed before the rename.
    """
    with staged_directory(directory, durable=durable) as staging:
        dist_checkpointing.save(sharded_state_dict, str(staging), sharded_strategy=_save_strategy())
        write_small_files(staging, adapter=adapter, hf_source_dir=hf_source_dir, padded_vocab_size=padded_vocab_size,
                          extra_meta=extra_meta, common_state=common_state, rank_state=rank_state)
        dist.barrier()
        write_manifest(staging, checksums=durable, group=dist.group.WORLD)


def write_small_files(staging: Path, *, adapter, hf_source_dir, padded_vocab_size: int, extra_meta: dict | None = None,
                      common_state: dict | None = None, rank_state: dict | None = None) -> None:
    """Every rank's ``rank_state``; rank 0's meta.json, common state and ``hf/`` side files."""
    rank = dist.get_rank()
    if rank_state is not None:
        (staging / RANK_STATE_DIR).mkdir(exist_ok=True)
        torch.save(rank_state, staging / RANK_STATE_DIR / f"{rank}.pt")
    if rank == 0:
        _write_side_files(staging, adapter, hf_source_dir=hf_source_dir, padded_vocab_size=padded_vocab_size,
                          extra_meta=extra_meta, common_state=common_state)


def _write_side_files(staging: Path, adapter, *, hf_source_dir, padded_vocab_size: int, extra_meta: dict | None,
                      common_state: dict | None) -> None:
    hf_dir = staging / HF_DIR
    hf_dir.mkdir()
    hf_config = without_quantization(adapter.hf_config)  # FP8 weights were dequantised on loading
    if getattr(adapter.hf_config, "quantization_config", None) is not None:
        print(f"note: the checkpoint has the FP8 weights kept dequantised; its {HF_DIR}/config.json has no "
              "quantization_config", flush=True)
    hf_config.save_pretrained(hf_dir)
    if hf_source_dir is not None:
        copy_side_files(hf_source_dir, hf_dir)
        hf_config.save_pretrained(hf_dir)  # the config we built from wins
        shapes = hf_tensor_shapes(hf_source_dir)  # of an HF source, or carried on from a Megatron one's hf/
        if shapes is not None:
            (hf_dir / TENSOR_SHAPES_NAME).write_text(json.dumps(shapes))
        write_passthrough(hf_source_dir, hf_dir, adapter.is_passthrough)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": adapter.hf_config.model_type,
        "padded_vocab_size": padded_vocab_size,
        **(extra_meta or {}),
    }
    (staging / META).write_text(json.dumps(meta, indent=1))
    if common_state is not None:
        torch.save(common_state, staging / COMMON_STATE)


EXTRA_STATE_SUFFIX = "_extra_state"


def load_sharded(sharded_state_dict: dict, directory: str | os.PathLike) -> dict:
    """Verify and load a checkpoint into the given sharded state dict layout (any TP/PP/EP, either
    layer spec). Requested entries the checkpoint lacks are an error naming them, except module
    extra states: Transformer Engine's norms carry one (fp8 metadata) that the local spec's norms
    do not write, so a TE model keeps its own when it loads a checkpoint of the local spec.
    Sizes are checked here; contents (checksums) where the checkpoint is chosen (a resume's
    ``latest_valid_checkpoint``, a converter's check), not again by every rank."""
    verify_checkpoint(directory, checksums=False)
    extra_states = dict(_extra_state_entries(sharded_state_dict))
    state, _, absent = dist_checkpointing.load(sharded_state_dict, str(directory),
                                               strict=StrictHandling.RETURN_UNEXPECTED)
    missing = sorted(key for key in absent if not key.endswith(EXTRA_STATE_SUFFIX))
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} has no {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} entries the model needs; written for another architecture?)"
        )
    for path, sharded in extra_states.items():
        if sharded.key in absent:
            _set_path(state, path, sharded.data)
    return state


def _extra_state_entries(tree, path: tuple = ()):
    """(path, ShardedObject) of every module extra state in a nested sharded state dict."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _extra_state_entries(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _extra_state_entries(value, (*path, index))
    elif isinstance(tree, ShardedObject) and tree.key.endswith(EXTRA_STATE_SUFFIX):
        yield path, tree


def _set_path(tree, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {}) if isinstance(tree, dict) else tree[key]
    tree[path[-1]] = value


def load_common_state(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / COMMON_STATE
    return torch.load(path, weights_only=False) if path.exists() else None


def load_rank_state(directory: str | os.PathLike) -> dict | None:
    """This rank's saved state, or None when the checkpoint came from a smaller world."""
    path = Path(directory) / RANK_STATE_DIR / f"{dist.get_rank()}.pt"
    return torch.load(path, weights_only=False) if path.exists() else None


def save_model(model, directory, *, adapter: ModelAdapter, hf_source_dir=None) -> None:
    save_sharded(
        {"model": model.sharded_state_dict()},
        directory,
        adapter=adapter,
        hf_source_dir=hf_source_dir,
        padded_vocab_size=model.vocab_size,
        extra_meta={"value_head": is_value_model(model)},
    )


def load_model(model, directory) -> None:
    state = load_sharded({"model": model.sharded_state_dict()}, directory)
    model.load_state_dict(state["model"], strict=True)
