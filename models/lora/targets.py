"""Which HF modules a LoRA targets, and where each lands in Megatron's fused parallel linears.

Derived from the architecture's weight map (``models.adapter``), not re-declared: a linear
``WeightSpec`` names its HF tensors (``...self_attn.q_proj.weight``); the module of each is a LoRA
target, called by its last name component (``q_proj``). A fused Megatron linear (``linear_qkv``:
q, k, v per query group; ``linear_fc1``: [gate; up] per TP rank) carries one adapter pair per
targeted HF module, whose B output is added to that module's rows of the fused output only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.adapter import ModelAdapter, WeightSpec
from models.lora.config import ALL_LINEAR
from models.splits import Split

#: Megatron linears that can carry adapters: (name relative to a layer or an expert, kind of parallel split).
COLUMN, ROW = "column", "row"
_LINEARS = {
    "self_attention.linear_qkv": COLUMN,
    "self_attention.linear_proj": ROW,
    "mlp.linear_fc1": COLUMN,
    "mlp.linear_fc2": ROW,
    "mlp.shared_experts.linear_fc1": COLUMN,  # an MoE layer's shared expert (Qwen2-MoE, DeepSeek)
    "mlp.shared_experts.linear_fc2": ROW,
    # multi-head latent attention (DeepSeek): each projection its own column-parallel linear
    "self_attention.linear_q_proj": COLUMN,
    "self_attention.linear_q_down_proj": COLUMN,
    "self_attention.linear_q_up_proj": COLUMN,
    "self_attention.linear_kv_down_proj": COLUMN,
    "self_attention.linear_kv_up_proj": COLUMN,
}
_EXPERT_LINEARS = {"linear_fc1": COLUMN, "linear_fc2": ROW}


@dataclass(frozen=True)
class LinearTargets:
    """The adapters of one Megatron linear: its split kind and HF module templates (``{layer}``, ``{expert}``)."""

    megatron: str  # relative name: ``self_attention.linear_qkv`` or ``linear_fc1`` (inside an expert)
    parallel: str  # COLUMN (B split on its output rows) or ROW (A split on its input columns)
    split: Split
    hf_modules: tuple[str, ...]  # every HF module fused into this linear, in the weight map's order
    targeted: tuple[bool, ...]  # which of them get an adapter

    def leaf(self, index: int) -> str:
        return self.hf_modules[index].rsplit(".", 1)[-1]


def _module_templates(spec: WeightSpec) -> tuple[str, ...]:
    return tuple(name.removesuffix(".weight") for name in spec.hf)


def _linear_specs(adapter: ModelAdapter) -> list[tuple[WeightSpec, str, bool]]:
    found = [(spec, _LINEARS[spec.megatron.removesuffix(".weight")], False)
             for spec in adapter.layer_specs() if spec.megatron.removesuffix(".weight") in _LINEARS
             and spec.megatron.endswith(".weight")]
    experts = [(spec, _EXPERT_LINEARS[spec.megatron.removesuffix(".weight")], True)
               for spec in adapter.expert_specs() if spec.megatron.removesuffix(".weight") in _EXPERT_LINEARS]
    if adapter.lora_expert_names_mean_experts_only:
        # PEFT (0.21, on transformers 5's fused experts) turns these names into the experts' target_parameters
        # and drops them from target_modules: a dense or shared-expert MLP of the same names is not adapted.
        # The same meaning here, so that the exported adapter loads into PEFT and gives our logits.
        expert_leaves = {t.rsplit(".", 1)[-1] for spec, _, _ in experts for t in _module_templates(spec)}
        found = [(spec, kind, e) for spec, kind, e in found
                 if not expert_leaves & {t.rsplit(".", 1)[-1] for t in _module_templates(spec)}]
    return found + experts


def available_targets(adapter: ModelAdapter) -> list[str]:
    """The names ``--target_modules`` accepts for this architecture, in weight-map order."""
    names: list[str] = []
    for spec, _, _ in _linear_specs(adapter):
        names += [t.rsplit(".", 1)[-1] for t in _module_templates(spec) if t.rsplit(".", 1)[-1] not in names]
    return names


def resolve_targets(adapter: ModelAdapter, target_modules: tuple[str, ...]) -> dict[tuple[str, bool], LinearTargets]:
    """``{(megatron linear, is_expert): LinearTargets}`` of the linears with at least one targeted module."""
    valid = available_targets(adapter)
    wanted = set(valid) if ALL_LINEAR in target_modules else set(target_modules)
    unknown = sorted(wanted - set(valid))
    routers = sorted(set(unknown) & router_names(adapter))
    if routers:
        # Left frozen as in PEFT (transformers 5's routers are plain nn.Modules, not the nn.Linear it adapts:
        # an export could not load) and Megatron-Bridge (its targets are linear_*, the router is not one).
        raise ValueError(f"--target_modules {' '.join(routers)}: the MoE router gets no adapter (it stays frozen "
                         f"under LoRA); choose from {' '.join(valid)} or {ALL_LINEAR}")
    if unknown:
        raise ValueError(f"--target_modules {' '.join(unknown)}: not a linear module of this "
                         f"{adapter.model_types[0]} model; choose from {' '.join(valid)} or {ALL_LINEAR}")
    found = {}
    for spec, parallel, is_expert in _linear_specs(adapter):
        modules = _module_templates(spec)
        targeted = tuple(m.rsplit(".", 1)[-1] in wanted for m in modules)
        if any(targeted) and getattr(spec.split, "row_order", None) is not None:
            # Megatron holds these rows permuted (DeepSeek's rotary rows with rope_interleave false).
            raise ValueError(f"--target_modules {' '.join(m.rsplit('.', 1)[-1] for m in modules)}: LoRA on a "
                             f"projection whose rows Megatron permutes ({spec.split!r}) is not supported")
        if any(targeted):
            name = spec.megatron.removesuffix(".weight")
            found[(name, is_expert)] = LinearTargets(name, parallel, spec.split, modules, targeted)
    return found


def fused_rows(targets: LinearTargets, index: int, adapter: ModelAdapter, *, tp_size: int,
               local_out: int) -> torch.Tensor | None:
    """Rows of this TP rank's fused output that HF module ``index`` produces (None: all of them).

    ``linear_qkv`` holds, per local query group, its q heads, then its k head, then its v head;
    ``linear_fc1`` holds this rank's gate shard, then its up shard."""
    if len(targets.hf_modules) == 1:
        return None
    if targets.split is Split.QKV:
        attn = adapter.attention
        groups = attn.num_kv_heads // tp_size
        q_rows = attn.heads_per_group * attn.head_dim
        stride = q_rows + 2 * attn.head_dim
        start, size = [(0, q_rows), (q_rows, attn.head_dim), (q_rows + attn.head_dim, attn.head_dim)][index]
        return torch.cat([torch.arange(g * stride + start, g * stride + start + size) for g in range(groups)])
    if targets.split is Split.GATE_UP:
        half = local_out // 2
        return torch.arange(index * half, (index + 1) * half)
    raise ValueError(f"LoRA cannot place {targets.hf_modules} fused as {targets.split}")


def router_names(adapter: ModelAdapter) -> set[str]:
    """HF module names (last component) of an MoE model's routers (``gate``); empty for a dense model."""
    return {t.rsplit(".", 1)[-1] for spec in adapter.layer_specs() if spec.megatron == "mlp.router.weight"
            for t in _module_templates(spec)}


def describe_targets(adapter: ModelAdapter, target_modules: tuple[str, ...]) -> str:
    """What LoRA adapts on this model, and on an MoE model what it leaves frozen (printed at start:
    the same names mean different modules on different MoE architectures, as they do in PEFT)."""
    groups: dict[str, list[str]] = {}
    for (name, is_expert), targets in resolve_targets(adapter, target_modules).items():
        group = ("routed experts (a pair per expert)" if is_expert else "shared experts" if "shared_experts" in name
                 else "attention" if name.startswith("self_attention") else "MLPs")
        groups.setdefault(group, []).extend(targets.leaf(i) for i, t in enumerate(targets.targeted) if t)
    text = "LoRA adapters on " + "; ".join(f"{group}: {' '.join(leaves)}" for group, leaves in groups.items())
    if not adapter.num_experts:
        return text
    frozen = ["the routers"]
    pattern = adapter.moe_layer_pattern
    if not all(pattern) and "MLPs" not in groups:
        dense = [str(i) for i, moe in enumerate(pattern) if not moe]
        frozen.append(f"the dense MLP{'s' * (len(dense) > 1)} of layer{'s' * (len(dense) > 1)} {', '.join(dense)}")
    if adapter.shared_expert_intermediate_size and "shared experts" not in groups:
        frozen.append("the shared experts")
    return f"{text}; frozen: {', '.join(frozen)}"
