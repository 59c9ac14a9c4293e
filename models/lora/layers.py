"""LoRA on Megatron's parallel linears, sharded the way the base layer is.

An adapted linear keeps its class's behaviour and parameter names (its class is swapped for a
subclass made here, so ``linear_qkv.weight`` stays ``linear_qkv.weight`` for the weight map and
checkpoints) and gains ``lora.<hf module>.lora_A`` / ``lora_B``:

- column-parallel base (``linear_qkv``, ``linear_fc1``): A replicated over TP, B split on its
  output rows like the base weight; ``h = x A^T`` is the same on every TP rank, so its gradient
  is summed over TP before it reaches A (and, under sequence parallelism, the sequence-sharded
  ``h`` is gathered the way the base gathers its input);
- row-parallel base (``linear_proj``, ``linear_fc2``): A split on its input columns, B
  replicated; the partial ``x_shard A_shard^T`` of every rank is summed over TP (reduce-scattered
  along the sequence under sequence parallelism) before B, as the base output is.

Experts are local matrices (expert tensor parallel size 1): their adapters need no collective.
A fused base linear carries one (A, B) pair per targeted HF module; each pair's output is added
to that module's rows of the fused output (``rows``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.utils import get_pg_size

from models.lora.targets import COLUMN

LORA_MODULE = "lora"


class LoraPair(torch.nn.Module):
    """One HF module's adapter on this rank: ``lora_A`` [r, in_local], ``lora_B`` [out_local, r]."""

    def __init__(self, *, rank: int, in_features: int, out_features: int, rows: torch.Tensor | None,
                 dtype: torch.dtype, device):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        # Not persistent: the fused rows follow from the architecture and the TP size, not the checkpoint.
        self.register_buffer("rows", None if rows is None else rows.to(device), persistent=False)


class LoraLinearMixin:
    """Mixed in front of ``ColumnParallelLinear`` / ``RowParallelLinear`` (see :func:`lora_class`)."""

    lora_parallel: str  # targets.COLUMN or targets.ROW
    lora_scale: float
    lora_dropout: float
    lora_enabled: bool = True
    lora: torch.nn.ModuleDict

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return output, bias
        x = F.dropout(input_, self.lora_dropout, self.training) if self.lora_dropout else input_
        pairs = list(self.lora.values())
        if self.lora_parallel == COLUMN:
            return self._add_column(output, x, pairs), bias
        return output + self._row_delta(x, pairs[0]), bias

    # ----- column-parallel: A replicated, B split on output rows --------------------------
    def _tp_size(self) -> int:
        return 1 if self.tp_group is None else get_pg_size(self.tp_group)

    def _column_hidden(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self._tp_size() == 1:
            return x @ a.t()
        if self.sequence_parallel:
            # x is this rank's sequence chunk: A's gradient from it is partial over the TP group.
            a = copy_to_tensor_model_parallel_region(a, group=self.tp_group)
            return gather_from_sequence_parallel_region(x @ a.t(), group=self.tp_group)
        # h is replicated, but each rank's B shard sends back only part of its gradient.
        return copy_to_tensor_model_parallel_region(x @ a.t(), group=self.tp_group)

    def _add_column(self, output: torch.Tensor, x: torch.Tensor, pairs: list[LoraPair]) -> torch.Tensor:
        # One matmul (and one collective) for every pair of the fused linear.
        hidden = self._column_hidden(x, torch.cat([p.lora_A for p in pairs], dim=0))
        for pair, h in zip(pairs, hidden.split([p.lora_A.shape[0] for p in pairs], dim=-1)):
            delta = (h @ pair.lora_B.t()) * self.lora_scale
            output = output + delta if pair.rows is None else output.index_add(-1, pair.rows, delta.to(output.dtype))
        return output

    # ----- row-parallel: A split on input columns, B replicated -------------------------
    def _row_delta(self, x: torch.Tensor, pair: LoraPair) -> torch.Tensor:
        partial = x @ pair.lora_A.t()
        b = pair.lora_B
        if self._tp_size() > 1:
            if self.sequence_parallel:
                hidden = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
                # Each rank sees its sequence chunk only: B's gradient is summed over TP.
                b = copy_to_tensor_model_parallel_region(b, group=self.tp_group)
            else:
                hidden = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        else:
            hidden = partial
        return (hidden @ b.t()) * self.lora_scale

    # ----- weights --------------------------------------------------------------------------
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of W + scale B A (the base shard and the adapter shards line up)."""
        weight = self.base_weight().float()
        for pair in self.lora.values():
            delta = (pair.lora_B.float() @ pair.lora_A.float()) * self.lora_scale
            if pair.rows is None:
                weight = weight + delta
            else:
                weight = weight.index_add(0, pair.rows, delta)
        return weight.to(self._parameters["weight"].dtype)

    def base_weight(self) -> torch.Tensor:
        return self.weight.data

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base's entries plus the adapters', sharded like their base (the base class would
        mark them replicated)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}{LORA_MODULE}.")}
        lora_state = self.lora.state_dict(prefix="", keep_vars=True)
        split_name = "lora_B" if self.lora_parallel == COLUMN else "lora_A"
        axes = {name: (0 if split_name == "lora_B" else 1) for name in lora_state if name.endswith(split_name)}
        state.update(make_sharded_tensors_for_checkpoint(
            lora_state, f"{prefix}{LORA_MODULE}.", axes, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group")))
        return state


_CLASSES: dict[type, type] = {}


def lora_class(base: type) -> type:
    """The LoRA subclass of a Megatron linear class (one per base class)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Lora{base.__name__}", (LoraLinearMixin, base), {})
    return _CLASSES[base]


def is_lora_linear(module) -> bool:
    return isinstance(module, LoraLinearMixin)
