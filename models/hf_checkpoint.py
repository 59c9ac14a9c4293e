"""Read and write HuggingFace safetensors checkpoints tensor by tensor (never the whole model).

The reader serves slices of single tensors (``safe_open(...).get_slice``), so a rank loads only
the rows/columns it owns. The writer streams tensors into size-bounded shard files and writes the
``model.safetensors.index.json`` that ``from_pretrained`` and vLLM expect.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from models.durable_io import fsync_directory, fsync_tree
from models.staging import remove_stale_staging, staging_path
from parallel.process_identity import ProcessIdentity

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# {hf_name: shape} of the HF checkpoint a Megatron checkpoint came from, kept in its hf/ directory:
# what a weight sync into vLLM engines started without weights must carry.
TENSOR_SHAPES_NAME = "tensor_shapes.json"
# HF tensors the Megatron model does not hold but an export must give back unchanged (DeepSeek's MTP
# layers, ``ModelAdapter.is_passthrough``), kept in a Megatron checkpoint's hf/ directory.
PASSTHROUGH_NAME = "passthrough.safetensors"
# Files copied next to exported weights so the directory is a complete HF model.
_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json",
)


class CheckpointError(RuntimeError):
    pass


@contextmanager
def staged_directory(directory: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Collective: every rank writes into a staging directory inside the block, named for this
    job (``models.staging``: two jobs never share one); when all are done, rank 0 moves it into
    place (replacing an older ``directory``). A crash or an error leaves the staging directory,
    never a half-written ``directory``. ``durable``: every file and directory is fsynced before
    the rename and the parent after it, so a power loss cannot publish files without their data."""
    staging = open_staging(directory)
    yield staging
    publish_staging(staging, directory, durable=durable)


def open_staging(directory: str | os.PathLike) -> Path:
    """Collective: the staging directory of ``directory`` (created empty, a dead job's removed)."""
    directory = Path(directory)
    rank = dist.get_rank()
    identity = [ProcessIdentity.current() if rank == 0 else None]
    dist.broadcast_object_list(identity, src=0)  # rank 0 names the staging directory for every rank
    staging = staging_path(directory, identity[0])
    if rank == 0:
        remove_stale_staging(directory, identity[0])
        staging.mkdir(parents=True)
    dist.barrier()
    return staging


def publish_staging(staging: Path, directory: str | os.PathLike, *, durable: bool = True) -> None:
    """Collective, once every rank has written its files: rank 0 renames ``staging`` to ``directory``."""
    directory = Path(directory)
    dist.barrier()
    if dist.get_rank() == 0:
        if durable:
            fsync_tree(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
        if durable:
            fsync_directory(directory.parent)
    dist.barrier()


class HFCheckpointReader:
    """Random access to the tensors of a HF safetensors checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                return json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        single = self.path / SINGLE_NAME
        if single.exists():
            with self._open(single) as f:
                return {name: SINGLE_NAME for name in f.keys()}
        raise CheckpointError(
            f"no {SINGLE_NAME} or {INDEX_NAME} in {self.path}: only safetensors HF checkpoints are supported"
        )

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {exc} (truncated or corrupt?)") from exc

    def _handle(self, name: str):
        if name not in self._files:
            raise CheckpointError(f"tensor {name!r} is missing from {self.path}")
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.path / file).__enter__()
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, *, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or ``[start, stop)`` along ``dim`` read from disk without the rest."""
        tensor_slice = self._handle(name).get_slice(name)
        if dim is None:
            return tensor_slice[:]
        index = [slice(None)] * len(tensor_slice.get_shape())
        index[dim] = slice(start, stop)
        return tensor_slice[tuple(index)]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


class HFShardWriter:
    """Streams tensors into ``prefix-XXXXX.safetensors`` files of at most ``max_shard_bytes``."""

    def __init__(self, directory: str | os.PathLike, *, prefix: str = "model", max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        file = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(self._buffer, str(self.directory / file), metadata={"format": "pt"})
        self.files.append(file)
        self.weight_map.update({name: file for name in self._buffer})
        self._buffer, self._buffer_bytes = {}, 0


def finalize_hf_directory(directory: str | os.PathLike, weight_map: dict[str, str]) -> None:
    """Rename shard files to HF's ``model-0000i-of-0000N`` scheme and write the index."""
    directory = Path(directory)
    files = sorted(set(weight_map.values()))
    renames = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renames.items():
        os.replace(directory / old, directory / new)
    total = sum((directory / f).stat().st_size for f in renames.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: renames[f] for name, f in sorted(weight_map.items())},
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


def copy_side_files(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Config, generation config and tokenizer files, so the output is a complete HF model."""
    for name in _SIDE_FILES:
        src = Path(source) / name
        if src.exists():
            shutil.copy2(src, Path(destination) / name)


def passthrough_tensors(source: str | os.PathLike, is_passthrough) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` an architecture carries unchanged (``is_passthrough(hf_name)``): from an
    HF checkpoint's safetensors, or the ``passthrough.safetensors`` a Megatron checkpoint's hf/ keeps."""
    source = Path(source)
    if (source / PASSTHROUGH_NAME).exists():
        with safe_open(str(source / PASSTHROUGH_NAME), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    if not ((source / INDEX_NAME).exists() or (source / SINGLE_NAME).exists()):
        return {}
    reader = HFCheckpointReader(source)
    try:
        return {name: reader.read(name) for name in reader.keys() if is_passthrough(name)}
    finally:
        reader.close()


def write_passthrough(source: str | os.PathLike, destination: str | os.PathLike, is_passthrough) -> None:
    """Keep ``source``'s carried tensors in a Megatron checkpoint's hf/ directory ``destination``."""
    tensors = passthrough_tensors(source, is_passthrough)
    if tensors:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(Path(destination) / PASSTHROUGH_NAME))


def hf_tensor_shapes(directory: str | os.PathLike) -> dict[str, list[int]] | None:
    """``{name: shape}`` of an HF checkpoint's tensors (safetensors headers only), or the
    ``tensor_shapes.json`` a Megatron checkpoint's ``hf/`` directory keeps of them; None when
    ``directory`` has neither."""
    directory = Path(directory)
    if (directory / TENSOR_SHAPES_NAME).exists():
        return json.loads((directory / TENSOR_SHAPES_NAME).read_text())
    if not ((directory / INDEX_NAME).exists() or (directory / SINGLE_NAME).exists()):
        return None
    reader = HFCheckpointReader(directory)
    try:
        return {name: reader.shape(name) for name in reader.keys()}
    finally:
        reader.close()
