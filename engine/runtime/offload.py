"""A trainable model's state parked in host memory while colocated vLLM engines use the GPU
(``--megatron_enable_sleep``).

Three parts, each a set of tensor storages:

- ``weights``: the parameters (under Megatron DDP with the distributed optimizer, views of one
  contiguous buffer per dtype);
- ``grads``: DDP's gradient buffers (``param.main_grad`` are views of them); freed without a copy:
  every train step zeroes them first, so they come back as zeros;
- ``optimizer``: the inner optimizer's state (Adam moments) and the distributed optimizer's fp32
  main parameters, where they are not views of the weights; an EMA of the weights with them.

Parking works on storages (copy out, ``resize_(0)``; ``resize_`` back, copy in), not by reassigning
``.data``: every tensor viewing a storage (DDP's buckets, ``main_grad``, the optimizer's shards of an
fp32 model) stays the same object and sees the restored bytes. megatron-core 0.16.1 has offload
helpers of its own, but its optimizer's ``offload_to_cpu`` reassigns ``p.data`` (an fp32 model's
main parameters would stop aliasing its weights) and its buffer offload pins host memory, which a
CPU build of torch refuses. A tensor of a parked storage must not be touched: it reads freed memory.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

PARTS = ("weights", "grads", "optimizer")


@dataclass
class _Parked:
    storage: torch.UntypedStorage
    nbytes: int
    host: torch.Tensor | None  # None: freed without a copy, restored as zeros


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _copy_to_host(storage: torch.UntypedStorage, host: torch.Tensor | None) -> torch.Tensor:
    """The storage's bytes in ``host`` (reused when the size fits: pinned allocations are slow)."""
    source = _bytes_view(storage)
    cuda = storage.device.type == "cuda"
    if host is None or host.numel() != source.numel():
        host = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=cuda)  # pinned: asynchronous copies
    return host.copy_(source, non_blocking=cuda)


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, torch.UntypedStorage]:
    """Distinct storages of ``tensors``, keyed by the storage object itself (stable across resizes)."""
    found: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        found.setdefault(storage._cdata, storage)
    return found


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    for megatron_optimizer in _optimizers(optimizer):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            yield from (p for p in group["params"] if isinstance(p, torch.Tensor))
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _grad_tensors(ddp_model) -> Iterator[torch.Tensor]:
    for buffer in [*ddp_model.buffers, *ddp_model.expert_parallel_buffers]:
        yield buffer.grad_data


class TrainingStateOffloader:
    """Moves the parts of one trainable model (Megatron DDP + optimizer) to host memory and back."""

    def __init__(self, model, ddp_model, optimizer, *, extra=None):
        """``extra``: a model parked with the optimizer state (an EMA: needed by neither forward nor sync)."""
        self.model, self.ddp_model, self.optimizer, self.extra = model, ddp_model, optimizer, extra
        self.parked: dict[str, list[_Parked]] = {}
        self._host: dict[int, torch.Tensor] = {}  # storage key -> its host copy, kept for the next park

    def _part_storages(self, part: str) -> dict[int, torch.UntypedStorage]:
        weights = _storages(self.model.parameters())
        if part == "weights":
            return weights
        grads = _storages(_grad_tensors(self.ddp_model))
        if part == "grads":
            return {k: s for k, s in grads.items() if k not in weights}
        # Created lazily by the first step; an fp32 model's main params are views of its weights.
        extra = list(self.extra.parameters()) if self.extra is not None else []
        return {k: s for k, s in _storages([*_optimizer_tensors(self.optimizer), *extra]).items()
                if k not in weights and k not in grads}

    def offload(self, parts: Iterable[str] = PARTS) -> dict[str, int]:
        """Park ``parts`` not parked yet; bytes freed on the device per part."""
        moved = {}
        cuda = False
        for part in parts:
            if part not in PARTS:
                raise ValueError(f"unknown training-state part {part!r} (one of {', '.join(PARTS)})")
            if part in self.parked:
                continue
            parked = []
            for key, storage in self._part_storages(part).items():
                nbytes = storage.nbytes()
                if nbytes == 0:
                    continue
                cuda |= storage.device.type == "cuda"
                host = None
                if part != "grads":
                    host = self._host[key] = _copy_to_host(storage, self._host.get(key))
                parked.append(_Parked(storage, nbytes, host))
            if cuda:
                torch.cuda.synchronize()  # the copies out are done before the memory goes
            for entry in parked:
                entry.storage.resize_(0)
            self.parked[part] = parked
            moved[part] = sum(entry.nbytes for entry in parked)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()  # back to the driver: vLLM allocates outside torch's cache
        return moved

    def onload(self, parts: Iterable[str] = PARTS) -> dict[str, int]:
        """Bring ``parts`` back (those parked); bytes restored on the device per part."""
        moved = {}
        for part in parts:
            parked = self.parked.pop(part, None)
            if parked is None:
                continue
            for entry in parked:
                entry.storage.resize_(entry.nbytes)
                view = _bytes_view(entry.storage)
                if entry.host is None:
                    view.zero_()
                else:
                    view.copy_(entry.host, non_blocking=True)
            moved[part] = sum(entry.nbytes for entry in parked)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copies may be freed once this returns
        return moved

