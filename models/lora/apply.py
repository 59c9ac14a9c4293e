"""Put adapters on a built Megatron model, freeze its base, and switch the adapters off and on.

Initialisation does not depend on the layout: every pair's full A (PEFT's Kaiming-uniform) and B
(zeros) are drawn from a generator seeded by the pair's HF module name, then sliced for this
rank, so TP=1 and TP=2 start from the same adapter and train the same loss curve.
"""
from __future__ import annotations

import re
import zlib
from contextlib import contextmanager
from typing import Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank, get_pg_size

from models.adapter import ModelAdapter
from models.lora.config import LoraConfig
from models.lora.layers import LORA_MODULE, LoraPair, is_lora_linear, lora_class
from models.lora.targets import COLUMN, LinearTargets, fused_rows, resolve_targets
from parallel.resharding import shard_range

_LINEAR = re.compile(r"^decoder\.layers\.(\d+)\.(?:mlp\.experts\.local_experts\.(\d+)\.)?(.+)$")
_LORA_PARAM = re.compile(rf"(^|\.){LORA_MODULE}\.[^.]+\.lora_[AB]$")


def parse_linear_name(name: str) -> tuple[str, int | None, int] | None:
    """``(linear relative name, local expert or None, local layer)`` of a decoder linear's module name."""
    match = _LINEAR.match(name)
    if match is None:
        return None
    expert = match.group(2)
    return match.group(3), None if expert is None else int(expert), int(match.group(1))


def is_lora_name(name: str) -> bool:
    """Whether a parameter name is an adapter's (``...linear_qkv.lora.q_proj.lora_A``)."""
    return _LORA_PARAM.search(name) is not None


def has_lora(model) -> bool:
    return any(is_lora_linear(m) for m in model.modules())


def apply_lora(model, adapter: ModelAdapter, config: LoraConfig, *, seed: int = 0,
               init_b_std: float = 0.0) -> None:
    """Adapt the targeted linears of this rank's chunk and freeze everything else except a value head.
    ``init_b_std`` > 0 draws B at random too (tests: an adapter that changes the output)."""
    targets = resolve_targets(adapter, config.target_modules)
    layer_offset = get_transformer_layer_offset(model.config)
    experts_per_rank = (adapter.num_experts or 0) // max(ps.get_expert_model_parallel_world_size(), 1)
    expert_offset = ps.get_expert_model_parallel_rank() * experts_per_rank
    for name, module in list(model.named_modules()):
        parsed = parse_linear_name(name)
        if parsed is None or (parsed[0], parsed[1] is not None) not in targets:
            continue
        linear, expert, layer = parsed
        index = {"layer": layer + layer_offset, "expert": None if expert is None else expert + expert_offset}
        _adapt(module, targets[(linear, expert is not None)], adapter, config, index, seed=seed, init_b_std=init_b_std)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name) or _is_value_head(model, name))


def _is_value_head(model, name: str) -> bool:
    return bool(getattr(model, "is_value_model", False)) and name == "output_layer.weight"


def _adapt(module, targets: LinearTargets, adapter: ModelAdapter, config: LoraConfig, index: dict, *,
           seed: int, init_b_std: float) -> None:
    if type(module).__name__.startswith("TE"):
        raise ValueError("LoRA adapts megatron-core's local linears, not Transformer Engine's: "
                         "--transformer_impl local")
    tp_size = 1 if module.tp_group is None else get_pg_size(module.tp_group)
    tp_rank = 0 if module.tp_group is None else get_pg_rank(module.tp_group)
    if getattr(module, "is_expert", False) and tp_size > 1:
        raise ValueError("LoRA on MoE experts needs --expert_tensor_parallel_size 1 "
                         f"(got {tp_size}): the experts are then whole matrices on their ranks")
    if config.lora_dropout and tp_size > 1:
        raise ValueError(f"--lora_dropout {config.lora_dropout} with tensor parallelism is not supported: the "
                         "dropout mask of a TP-sharded input cannot equal one process's; use --lora_dropout 0")
    weight = module.weight
    module.__class__ = lora_class(type(module))
    module.lora_parallel = targets.parallel
    module.lora_scale = config.scale
    module.lora_dropout = config.lora_dropout
    module.lora_enabled = True
    pairs = torch.nn.ModuleDict()
    for i, hf_module in enumerate(targets.hf_modules):
        if not targets.targeted[i]:
            continue
        hf_name = hf_module.format(**{k: v for k, v in index.items() if v is not None})
        pairs[targets.leaf(i)] = _new_pair(weight, targets, i, adapter, config.lora_rank, tp_size=tp_size,
                                           tp_rank=tp_rank, seed=_pair_seed(seed, hf_name), init_b_std=init_b_std)
    module.add_module(LORA_MODULE, pairs)


def _pair_seed(seed: int, hf_name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(hf_name.encode())) % (2**63)


def _new_pair(weight, targets: LinearTargets, i: int, adapter: ModelAdapter, rank: int, *, tp_size: int,
              tp_rank: int, seed: int, init_b_std: float) -> LoraPair:
    out_local, in_local = weight.shape
    if targets.parallel == COLUMN:
        rows = fused_rows(targets, i, adapter, tp_size=tp_size, local_out=out_local)
        out_local = out_local if rows is None else len(rows)
        full_in, full_out = in_local, out_local * tp_size
    else:
        rows, full_in, full_out = None, in_local * tp_size, out_local
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / full_in**0.5  # PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]
    a = torch.empty(rank, full_in).uniform_(-bound, bound, generator=generator)
    b = torch.randn(full_out, rank, generator=generator) * init_b_std if init_b_std else torch.zeros(full_out, rank)
    if targets.parallel == COLUMN:
        b = b[slice(*shard_range(full_out, tp_rank, tp_size))]
    else:
        a = a[:, slice(*shard_range(full_in, tp_rank, tp_size))]
    pair = LoraPair(rank=rank, in_features=a.shape[1], out_features=b.shape[0], rows=rows, dtype=weight.dtype,
                    device=weight.device)
    with torch.no_grad():
        pair.lora_A.copy_(a)
        pair.lora_B.copy_(b)
    return pair


def lora_linears(model) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if is_lora_linear(module):
            yield name, module


@contextmanager
def adapters_disabled(model):
    """The base model inside the block (a DPO / KTO reference without a second copy of the weights)."""
    modules = [module for _, module in lora_linears(model)]
    for module in modules:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.lora_enabled = True


def merged_tensor_of(model):
    """A ``tensor_of`` for ``models.weights.iter_hf_weights``: adapted weights merged (W + scale B A,
    shard by shard), NF4 weights dequantised, every other tensor as it is."""
    from models.lora.quant import Nf4WeightMixin

    # Keyed by the registered parameter (an NF4 layer's ``weight`` is made anew on every read).
    owners = {id(module._parameters["weight"]): module for module in model.modules()
              if is_lora_linear(module) or isinstance(module, Nf4WeightMixin)}

    def tensor_of(param: torch.nn.Parameter) -> torch.Tensor:
        owner = owners.get(id(param))
        if owner is None:
            return param.data
        return owner.merged_weight() if is_lora_linear(owner) else owner.base_weight()

    return tensor_of
