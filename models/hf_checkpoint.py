"""Read and write HuggingFace safetensors checkpoints tensor by tensor (never the whole model).

The reader serves slices of single tensors (``safe_open(...).get_slice``), so a rank loads only
the rows/columns it owns. The writer streams tensors into size-bounded shard files and writes the
``model.safetensors.index.json`` that ``from_pretrained`` and vLLM expect.
"""
from __future__ import annotations

import copy
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
    "added_tokens.json", "tiktoken.model",
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


# The suffix of the per-block scale beside each FP8 weight (DeepSeek-V3's checkpoints, transformers'
# FineGrainedFP8): ``weight = fp8.float() * weight_scale_inv`` broadcast over ``weight_block_size`` blocks.
FP8_SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = ("F8_E4M3",)


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of an HF checkpoint directory ({} when it has none)."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def fp8_block_size(config: dict, *, where: str = "") -> tuple[int, int] | None:
    """The ``[rows, cols]`` blocks of a ``config.json``'s FP8 block-scaled ``quantization_config``
    (DeepSeek-V3's form: ``quant_method`` "fp8", ``fmt`` "e4m3", ``activation_scheme`` "dynamic",
    ``weight_block_size`` [128, 128]); None for an unquantised checkpoint. Every other form is refused,
    naming the key: its weights could not be dequantised exactly or its activations would be
    quantised differently from what the checkpoint was calibrated for."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    where = f"{where}: " if where else ""
    method = quant.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{where}config.json quantization_config.quant_method {method!r} is not supported "
                              "(only FP8 with block scales, quant_method 'fp8', dequantised while loading)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}config.json quantization_config.weight_block_size {block!r}: only FP8 "
                              "with per-block scales ([rows, cols], DeepSeek-V3's [128, 128]) is supported, "
                              "not per-tensor or per-channel scales")
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise CheckpointError(f"{where}config.json quantization_config.activation_scheme {scheme!r} is not "
                              "supported: static activation scales cannot be honoured by bf16/fp32 compute "
                              "(only 'dynamic', whose weights dequantise exactly)")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}config.json quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          *, row_start: int = 0, col_start: int = 0) -> torch.Tensor:
    """fp32 ``weight.float() * scale_inv`` per ``block``: ``weight`` is the slice of a 2-D FP8 tensor
    starting at ``(row_start, col_start)``; ``scale_inv`` holds the scales of the block rows / columns
    that slice touches (the first one being ``row_start // block[0]``, ``col_start // block[1]``).
    Last blocks may be ragged (dims that are not multiples of the block)."""
    rows, cols = weight.shape
    row_blocks = (torch.arange(row_start, row_start + rows) // block[0]) - row_start // block[0]
    col_blocks = (torch.arange(col_start, col_start + cols) // block[1]) - col_start // block[1]
    scales = scale_inv.float()[row_blocks][:, col_blocks]
    return weight.float() * scales


class HFCheckpointReader:
    """Random access to the tensors of a HF safetensors checkpoint directory.

    An FP8 block-scaled checkpoint (``fp8_block_size``) reads as fp32: each ``*.weight`` with a
    ``*.weight_scale_inv`` partner is dequantised slice by slice as it is read, and the scale tensors
    are not among ``keys()``: what downstream sees is the unquantised model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files = self._weight_map()
        self._handles: dict[str, object] = {}
        self.fp8_block = fp8_block_size(read_hf_config(self.path), where=str(self.path))
        self._scales = ({name: name + FP8_SCALE_SUFFIX for name in self._files
                         if name + FP8_SCALE_SUFFIX in self._files} if self.fp8_block else {})
        self._files_visible = list(self._files)
        if self.fp8_block:
            static = [n for n in self._files if n.endswith((".input_scale", ".activation_scale"))]
            if static:
                raise CheckpointError(f"{self.path}: {static[0]} is a static activation scale, which config.json "
                                      "quantization_config.activation_scheme 'dynamic' does not have")
            self._files_visible = [n for n in self._files if not n.endswith(FP8_SCALE_SUFFIX)]

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
        return list(self._files_visible)

    def __contains__(self, name: str) -> bool:
        return name in self._files and not (self.fp8_block and name.endswith(FP8_SCALE_SUFFIX))

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, *, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or ``[start, stop)`` along ``dim`` read from disk without the rest."""
        tensor_slice = self._handle(name).get_slice(name)
        shape = tensor_slice.get_shape()
        index = [slice(None)] * len(shape)
        if dim is not None:
            index[dim] = slice(start, stop)
        if name in self._scales:
            return self._dequantized(name, tensor_slice, index)
        if self.fp8_block and tensor_slice.get_dtype() in _FP8_DTYPES:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no {name + FP8_SCALE_SUFFIX!r} beside it")
        return tensor_slice[:] if dim is None else tensor_slice[tuple(index)]

    def _dequantized(self, name: str, tensor_slice, index: list[slice]) -> torch.Tensor:
        """The fp32 slice ``index`` of FP8 weight ``name``: only the scale blocks it touches are read."""
        shape = tensor_slice.get_shape()
        if len(shape) != 2 or tensor_slice.get_dtype() not in _FP8_DTYPES:
            raise CheckpointError(f"{self.path}: {name!r} has a {FP8_SCALE_SUFFIX} but is not a 2-D "
                                  f"float8_e4m3fn tensor ({tensor_slice.get_dtype()}, shape {list(shape)})")
        block = self.fp8_block
        scale_name = self._scales[name]
        scale_slice = self._handle(scale_name).get_slice(scale_name)
        expected = [-(-shape[0] // block[0]), -(-shape[1] // block[1])]
        if list(scale_slice.get_shape()) != expected:
            raise CheckpointError(f"{self.path}: {scale_name} has shape {list(scale_slice.get_shape())}, "
                                  f"{expected} expected for {name} {list(shape)} in blocks of {list(block)} "
                                  "(config.json quantization_config.weight_block_size)")
        bounds = [range(*index[d].indices(shape[d])) for d in range(2)]
        rows, cols = bounds
        weight = tensor_slice[tuple(index)]
        if not len(rows) or not len(cols):
            return weight.float()
        scale_index = tuple(slice(r.start // b, (r.stop - 1) // b + 1) for r, b in zip(bounds, block))
        return dequantize_fp8_blocks(weight, scale_slice[scale_index], block,
                                     row_start=rows.start, col_start=cols.start)

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


def without_quantization(hf_config):
    """A copy of an HF config without its ``quantization_config``: the config of the dequantised
    weights an FP8 checkpoint loads to (what exports and Megatron checkpoints' ``hf/`` hold)."""
    config = copy.deepcopy(hf_config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def remote_code_files(source: str | os.PathLike) -> list[str]:
    """The Python files the ``auto_map`` of ``config.json`` / ``tokenizer_config.json`` names (Moonlight's
    ``configuration_deepseek.py``, ``tokenization_moonshot.py``) that ``source`` holds. Copied as files and
    never imported here (transformers' own classes read those configs): an export keeps them so that it
    loads wherever its source did, with ``trust_remote_code`` too."""
    refs = []
    for config in ("config.json", "tokenizer_config.json"):
        file = Path(source) / config
        auto_map = json.loads(file.read_text()).get("auto_map", {}) if file.is_file() else {}
        for value in auto_map.values():
            refs += value if isinstance(value, list) else [value]
    modules = {ref.rsplit(".", 1)[0] for ref in refs if isinstance(ref, str) and "--" not in ref}
    return sorted(f"{m}.py" for m in modules if (Path(source) / f"{m}.py").is_file())


def copy_side_files(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Config, generation config and tokenizer files (and the remote-code files their ``auto_map`` names),
    so the output is a complete HF model. An FP8 ``quantization_config`` is left out of the copied
    config.json: what is written beside it (a Megatron checkpoint, an export) holds the dequantised weights."""
    for name in (*_SIDE_FILES, *remote_code_files(source)):
        src = Path(source) / name
        if src.exists():
            shutil.copy2(src, Path(destination) / name)
    config = read_hf_config(source)
    if fp8_block_size(config, where=str(source)):
        config.pop("quantization_config")
        (Path(destination) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


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
