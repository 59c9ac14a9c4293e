"""Move weights between HF checkpoints and a running Megatron model of any TP/PP/EP layout.

Loading: every rank reads from the safetensors files only the slices it owns, one parameter at
a time, so memory is bounded by the largest tensor, not the model. Exporting: a streamed,
per-parameter iterator of HF-named full tensors (TP shards gathered over the TP group, each PP
stage and EP rank yielding its own layers / experts) -- the iterator that HF saving and the
vLLM weight sync consume.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from models.adapter import ModelAdapter, WeightSpec
from models.heads import is_value_model
from models.hf_checkpoint import (
    CheckpointError,
    HFCheckpointReader,
    HFShardWriter,
    copy_side_files,
    finalize_hf_directory,
    passthrough_tensors,
    staged_directory,
    without_quantization,
)
from models.lora.apply import is_lora_name
from parallel.resharding import all_gather_shards


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


def _model_hf_names(model, spec: WeightSpec, index: dict) -> list[str]:
    """The HF names of one parameter of ``model``: a value head is ``<value_head_prefix>.weight``
    (``score`` unless the model was built with another prefix: OpenRLHF's --value_head_prefix)."""
    if spec.megatron == "value_head.weight":
        return [f"{value_head_prefix(model)}.weight"]
    return _hf_names(spec, index)


def value_head_prefix(model) -> str:
    return getattr(model, "value_head_prefix", "score")


def named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers: every tensor a checkpoint of ``model`` holds. A buffer
    the weight map does not know (a router's ``expert_bias``) fails loudly instead of being skipped."""
    # Adapters are not tensors of the base model (models.lora.export writes them).
    yield from ((name, p) for name, p in model.named_parameters() if not is_lora_name(name))
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


# ----- HF -> Megatron -------------------------------------------------------------------------
def load_hf_weights(model, adapter: ModelAdapter, hf_path: str | os.PathLike, *, progress: bool = False,
                    new_value_head: bool = False) -> None:
    """Fill ``model`` (this rank's chunk) from an HF checkpoint directory.

    ``new_value_head``: the checkpoint is a causal LM and the value head starts fresh (a critic or
    reward model about to be trained). Otherwise a value head the checkpoint lacks is an error, as
    is every other missing tensor or shape mismatch.
    """
    reader = HFCheckpointReader(hf_path)
    offsets = _offsets(model, adapter)
    params = list(named_weights(model))
    if progress:
        from tqdm import tqdm

        params = tqdm(params, desc="load HF weights", unit="tensor")
    try:
        for name, param in params:
            spec, index = _resolve(model, adapter, name, offsets)
            names = _model_hf_names(model, spec, index)
            if spec.megatron == "value_head.weight" and names[0] not in reader:
                if new_value_head:
                    continue  # keeps its seeded initialisation
                raise CheckpointError(
                    f"{hf_path} has no value head {names[0]!r} (a reward model / critic checkpoint's head; "
                    f"saved under another name? --value_head_prefix names it, now {value_head_prefix(model)!r})")
            rank, size, _ = _tp_placement(name)
            local = spec.split.load(reader, names, param.shape, rank=rank, size=size, adapter=adapter)
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
def owns_weights(model) -> bool:
    """Whether this rank yields any HF tensor from ``iter_hf_weights`` (one rank per distinct tensor does)."""
    return any(is_owner(name) for name, _ in named_weights(model))


def is_owner(name: str) -> bool:
    """Whether this rank yields the tensor of parameter ``name``: one rank per distinct tensor does
    (DP / CP / TP replicas stay silent)."""
    if _is_expert(name):
        return ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0
    return ps.get_data_parallel_rank(with_context_parallel=True) == 0 and ps.get_tensor_model_parallel_rank() == 0


def iter_hf_weights(
    model,
    adapter: ModelAdapter,
    *,
    dtype: torch.dtype | None = None,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.data,
    every_rank: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the tensors this rank owns, one parameter at a time.

    Collective over each TP group: every rank of the model must consume the iterator, in step.
    ``tensor_of`` selects what to export
    (``lambda p: p.main_grad`` exports gradients). ``every_rank``: every rank of a pipeline stage
    yields all of the stage's tensors (TP / DP / CP replicas too), for senders that need the
    tensors on every GPU; experts are then refused under expert parallelism (a rank holds only
    its own).
    """
    if every_rank and ps.get_expert_model_parallel_world_size() > 1:
        raise ValueError("every rank cannot yield every expert under expert parallelism "
                         f"(EP={ps.get_expert_model_parallel_world_size()}): each holds only its own")
    offsets = _offsets(model, adapter)
    for name, param in named_weights(model):
        spec, index = _resolve(model, adapter, name, offsets)
        if spec.megatron == "output_layer.weight" and adapter.tie_word_embeddings:
            continue  # the first stage exports the embedding HF ties to it
        _, _, group = _tp_placement(name)
        local = tensor_of(param)
        shards = all_gather_shards(local, group) if spec.split.gathered else [local]
        if not (every_rank or is_owner(name)):
            continue
        for hf_name, tensor in zip(_model_hf_names(model, spec, index), spec.split.export(shards, adapter)):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _hf_config_for_export(adapter: ModelAdapter, value_head: bool):
    config = without_quantization(adapter.hf_config)  # the weights are written dequantised
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
    rank = dist.get_rank()
    quantized = getattr(adapter.hf_config, "quantization_config", None)
    if quantized is not None and not isinstance(quantized, dict):
        quantized = quantized.to_dict()
    if quantized and rank == 0:
        print(f"note: {save_dir}: written in {str(adapter.export_dtype()).removeprefix('torch.')} without the "
              f"source's config.json quantization_config ({quantized.get('quant_method')} "
              f"{quantized.get('weight_block_size')}): the FP8 weights were dequantised on loading", flush=True)
    with staged_directory(save_dir) as staging:
        writer = HFShardWriter(staging, prefix=f"rank{rank:05d}", max_shard_bytes=max_shard_bytes)
        tensors = iter_hf_weights(model, adapter, dtype=adapter.export_dtype())
        if progress and rank == 0:
            from tqdm import tqdm

            tensors = tqdm(tensors, desc="export HF weights", unit="tensor")
        for name, tensor in tensors:
            writer.add(name, tensor)
        if rank == 0 and source_dir is not None:  # tensors the model does not hold (DeepSeek's MTP layers)
            for name, tensor in passthrough_tensors(source_dir, adapter.is_passthrough).items():
                writer.add(name, tensor)
        writer.flush()
        maps: list[dict] = [None] * dist.get_world_size()
        dist.all_gather_object(maps, writer.weight_map)
        if rank == 0:
            weight_map = {name: file for m in maps for name, file in m.items()}
            finalize_hf_directory(staging, weight_map)
            if source_dir is not None:
                copy_side_files(source_dir, staging)
            hf_config = _hf_config_for_export(adapter, is_value_model(model))
            for key, value in (config_updates or {}).items():
                setattr(hf_config, key, value)
            hf_config.save_pretrained(staging)
            for file_name, text in (extra_files or {}).items():
                (staging / file_name).write_text(text)
