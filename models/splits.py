"""How one Megatron parameter relates to its HF tensor(s) and how tensor parallelism shards it.

Each kind of split is a small strategy with both directions: ``load`` reads this rank's shard
slice-wise from the HF checkpoint, ``export`` turns every TP rank's shard back into the HF
tensors. An architecture with a new kind of tensor (a per-head norm, a fused projection) adds a
strategy here and names it in its weight map; nothing else switches on the kind.
"""
from __future__ import annotations

from typing import Protocol

import torch

from parallel.resharding import merge_fused_shards, shard_range


class ModelAdapter(Protocol):
    """What a split reads of the architecture (``models.adapter.ModelAdapter`` offers it)."""

    vocab_size: int


def _rows(reader, name: str, start: int, stop: int) -> torch.Tensor:
    return reader.read(name, dim=0, start=start, stop=stop)


class Split:
    """A kind of split; the instances below (``Split.QKV`` ...) are what weight maps name."""

    #: whether ``export`` needs every TP rank's shard (False: each rank holds the whole tensor)
    gathered: bool = True
    name: str = ""

    def load(self, reader, names: list[str], local_shape, *, rank: int, size: int,
             adapter: ModelAdapter) -> torch.Tensor:
        """This TP rank's shard (``local_shape``) from the HF tensors ``names``."""
        raise NotImplementedError

    def export(self, shards: list[torch.Tensor], adapter: ModelAdapter) -> list[torch.Tensor]:
        """The HF tensors, in the weight map's order, from every TP rank's shard."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Split.{self.name}"


class ReplicatedSplit(Split):
    """Norms, the MoE router, the value head: the same tensor on every TP rank."""

    gathered, name = False, "REPLICATED"

    def load(self, reader, names, local_shape, *, rank, size, adapter):
        return reader.read(names[0])

    def export(self, shards, adapter):
        return [shards[0]]


class RowSplit(Split):
    """Row-parallel linears (``linear_proj``, ``linear_fc2``): split on dim 1 (input features)."""

    name = "ROW"

    def load(self, reader, names, local_shape, *, rank, size, adapter):
        start, stop = shard_range(reader.shape(names[0])[1], rank, size)
        return reader.read(names[0], dim=1, start=start, stop=stop)

    def export(self, shards, adapter):
        return [torch.cat(shards, dim=1)]


class VocabSplit(Split):
    """Embeddings / output layer: dim 0, padded to a multiple of TP x divisor; padding dropped on export."""

    name = "VOCAB"

    def load(self, reader, names, local_shape, *, rank, size, adapter):
        local_rows = local_shape[0]
        start = rank * local_rows
        stop = min(start + local_rows, adapter.vocab_size)
        rows = _rows(reader, names[0], start, stop) if stop > start else None
        out = torch.zeros(local_rows, reader.shape(names[0])[1],
                          dtype=rows.dtype if rows is not None else torch.float32)
        if rows is not None:
            out[: stop - start] = rows
        return out

    def export(self, shards, adapter):
        return [torch.cat(shards, dim=0)[: adapter.vocab_size]]


class QKVSplit(Split):
    """[q; k; v] regrouped per query group (its q heads, then its k and v head); TP splits whole groups."""

    name = "QKV"

    def load(self, reader, names, local_shape, *, rank, size, adapter):
        attn = adapter.attention
        groups = attn.num_kv_heads // size
        first = rank * groups
        q_rows = attn.heads_per_group * attn.head_dim
        q_name, k_name, v_name = names
        q = _rows(reader, q_name, first * q_rows, (first + groups) * q_rows)
        k = _rows(reader, k_name, first * attn.head_dim, (first + groups) * attn.head_dim)
        v = _rows(reader, v_name, first * attn.head_dim, (first + groups) * attn.head_dim)
        tail = q.shape[1:]
        fused = torch.cat([q.reshape(groups, q_rows, *tail), k.reshape(groups, attn.head_dim, *tail),
                           v.reshape(groups, attn.head_dim, *tail)], dim=1)
        return fused.reshape(-1, *tail)

    def export(self, shards, adapter):
        attn = adapter.attention
        full = torch.cat(shards, dim=0)
        tail = full.shape[1:]
        grouped = full.reshape(attn.num_kv_heads, (attn.heads_per_group + 2) * attn.head_dim, *tail)
        q_rows = attn.heads_per_group * attn.head_dim
        parts = grouped.split([q_rows, attn.head_dim, attn.head_dim], dim=1)
        return [t.reshape(-1, *tail) for t in parts]


class GateUpSplit(Split):
    """[gate; up] fused on dim 0, each split over TP and re-fused per rank (not a contiguous slice)."""

    name = "GATE_UP"

    def load(self, reader, names, local_shape, *, rank, size, adapter):
        parts = []
        for name in names:
            start, stop = shard_range(reader.shape(name)[0], rank, size)
            parts.append(_rows(reader, name, start, stop))
        return torch.cat(parts, dim=0)

    def export(self, shards, adapter):
        return list(merge_fused_shards(shards, dim=0, num_parts=2).chunk(2, dim=0))


class ColumnSplit(Split):
    """A column-parallel linear of its own (no fused parts: multi-head latent attention's projections):
    contiguous dim-0 slices. ``row_order(num_rows)``, if given, is the permutation taking the HF rows
    to Megatron's order (``megatron = hf[row_order]``), undone on export."""

    name = "COLUMN"

    def __init__(self, row_order=None, name: str = "COLUMN"):
        self.row_order, self.name = row_order, name

    def load(self, reader, names, local_shape, *, rank, size, adapter):
        rows = reader.shape(names[0])[0]
        start, stop = shard_range(rows, rank, size)
        if self.row_order is None:
            return _rows(reader, names[0], start, stop)
        return reader.read(names[0])[self.row_order(rows)[start:stop]]

    def export(self, shards, adapter):
        full = torch.cat(shards, dim=0)
        if self.row_order is not None:
            full = full[torch.argsort(self.row_order(full.shape[0]))]
        return [full]


Split.REPLICATED = ReplicatedSplit()
Split.ROW = RowSplit()
Split.VOCAB = VocabSplit()
Split.QKV = QKVSplit()
Split.GATE_UP = GateUpSplit()
Split.COLUMN = ColumnSplit()
