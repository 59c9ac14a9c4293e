"""PEFT adapter directories from a LoRA-trained Megatron model, and the merged weights.

``iter_lora_weights`` yields PEFT's names (``base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight``), every TP shard gathered and q/k/v, gate/up un-fused (each HF module has its own
pair already); ``save_peft_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained`` loads onto the HF base model (an adapter is MBs: rank 0
collects every owner's tensors and writes one file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from models.adapter import ModelAdapter
from models.heads import is_value_model
from models.hf_checkpoint import copy_side_files, staged_directory
from models.lora.apply import lora_linears, parse_linear_name
from models.lora.config import LoraConfig
from models.lora.targets import COLUMN, resolve_targets
from models.weights import is_owner, value_head_prefix
from parallel.resharding import all_gather_shards

PEFT_PREFIX = "base_model.model."
CONFIG_UPDATES = "base_config_updates.json"


def iter_lora_weights(model, adapter: ModelAdapter, config: LoraConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``(peft_name, full tensor)`` of the adapters this rank owns. Collective over each TP group."""
    targets = resolve_targets(adapter, config.target_modules)
    layer_offset = get_transformer_layer_offset(model.config)
    experts_per_rank = (adapter.num_experts or 0) // ps.get_expert_model_parallel_world_size()
    for name, module in lora_linears(model):
        relative, expert, layer = parse_linear_name(name)
        linear = targets[(relative, expert is not None)]
        index = {"layer": layer + layer_offset}
        if expert is not None:
            index["expert"] = expert + ps.get_expert_model_parallel_rank() * experts_per_rank
        owner = is_owner(f"{name}.weight")
        for i, hf_module in enumerate(linear.hf_modules):
            if not linear.targeted[i]:
                continue
            pair = module.lora[linear.leaf(i)]
            a, b = _gathered(pair, module, column=linear.parallel == COLUMN)
            if owner:
                base = PEFT_PREFIX + hf_module.format(**index)
                yield f"{base}.lora_A.weight", a
                yield f"{base}.lora_B.weight", b


def _gathered(pair, module, *, column: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = pair.lora_A.detach(), pair.lora_B.detach()
    if module.tp_group is None or dist.get_world_size(module.tp_group) == 1:
        return a, b
    if column:
        return a, torch.cat(all_gather_shards(b, module.tp_group), dim=0)
    return torch.cat(all_gather_shards(a, module.tp_group), dim=1), b


def _value_head(model) -> dict[str, torch.Tensor]:
    """An RM / critic head, saved as PEFT's ``modules_to_save`` (``score``)."""
    if not (is_value_model(model) and getattr(model, "post_process", False) and is_owner("output_layer.weight")):
        return {}
    return {f"{PEFT_PREFIX}{value_head_prefix(model)}.weight": model.output_layer.weight.detach()}


def peft_config(adapter: ModelAdapter, config: LoraConfig, *, value_head: bool, base_model: str | None = None,
                value_prefix: str = "score"):
    """The ``peft.LoraConfig`` of an exported adapter: the resolved module list, never a shorthand, so
    PEFT adapts exactly what was trained."""
    from peft import LoraConfig as PeftLoraConfig

    modules = sorted({linear.leaf(i) for linear in resolve_targets(adapter, config.target_modules).values()
                      for i, on in enumerate(linear.targeted) if on})
    return PeftLoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=modules,
        bias="none", task_type="SEQ_CLS" if value_head else "CAUSAL_LM", base_model_name_or_path=base_model,
        modules_to_save=[value_prefix] if value_head else None)


def save_peft_adapter(model, adapter: ModelAdapter, config: LoraConfig, save_dir: str | os.PathLike, *,
                      base_model: str | None = None, source_dir=None, config_updates: dict | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Write a PEFT adapter directory (collective over the world; rank 0 writes). ``config_updates``
    (a reward model's ``mean`` / ``std``) go to ``base_config_updates.json``, which ``lora_combiner`` writes
    into the merged model's ``config.json``."""
    from safetensors.torch import save_file

    dtype = dtype or adapter.export_dtype()
    local = {name: t.to(dtype).cpu().contiguous() for name, t in iter_lora_weights(model, adapter, config)}
    local.update({name: t.to(dtype).cpu().contiguous() for name, t in _value_head(model).items()})
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    with staged_directory(save_dir) as staging:
        if dist.get_rank() == 0:
            tensors = {name: tensor for part in gathered for name, tensor in part.items()}
            save_file(tensors, str(Path(staging) / "adapter_model.safetensors"), metadata={"format": "pt"})
            peft_config(adapter, config, value_head=is_value_model(model), base_model=base_model,
                        value_prefix=value_head_prefix(model)).save_pretrained(str(staging))
            if source_dir is not None:
                copy_side_files(source_dir, staging)  # the tokenizer, as OpenRLHF saves it beside the adapter
                if config_updates:
                    (Path(staging) / CONFIG_UPDATES).write_text(json.dumps(config_updates, indent=1))
                for model_file in ("config.json", "generation_config.json"):  # the base model's, not the adapter's
                    (Path(staging) / model_file).unlink(missing_ok=True)
