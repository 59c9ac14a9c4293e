"""Measured memory of a training step on this machine, to hold the planner's predictions against.

CPU builds of torch keep no allocator statistics, so activations are measured where they live:
every tensor autograd saves for backward passes through :class:`SavedActivationMeter`, which
counts its storage once (a storage saved by several ops, or a view of one, is one allocation) and
uncounts it when autograd lets go of it. The peak over a step is the activation memory the
planner predicts; parameters saved by the linears are weights, not activations, and are skipped.
"""
from __future__ import annotations

from collections import Counter

import torch


class _Held:
    """What autograd keeps in place of a saved tensor; its death releases the storage's count."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedActivationMeter:
    """``with SavedActivationMeter(model.parameters()) as meter: step()``; then ``meter.peak_bytes``."""

    def __init__(self, parameters=()):
        self._skip = {p.untyped_storage().data_ptr() for p in parameters}
        self._refs: Counter = Counter()
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or tensor.device.type == "meta":
            return tensor
        if self._refs[key] == 0:
            self._sizes[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] += 1
        return _Held(tensor, self, key)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live_bytes -= self._sizes.pop(key)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Adam moments plus fp32 main copies that are not the model's own parameters (Megatron's
    distributed optimizer keeps shards of both; with fp32 weights the main params are views)."""
    tensors = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", part)
        tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
        model_storages = {p.untyped_storage().data_ptr() for p in _model_params(part)}
        tensors += [p for group in inner.param_groups for p in group["params"]
                    if p.untyped_storage().data_ptr() not in model_storages]
    return tensor_bytes(tensors)


def _model_params(optimizer):
    for group in getattr(optimizer, "model_float16_groups", []) + getattr(optimizer, "model_fp32_groups", []):
        yield from group
    for buffer in getattr(optimizer, "buffers", []):
        yield buffer.param_data if buffer.param_data is not None else buffer.grad_data


def measure_training_step(engine, microbatches: list[dict], loss_fn) -> dict[str, int]:
    """One optimizer step of ``engine`` (a ``TrainingEngine``), measured per category in bytes:
    weights, gradient buffers, optimizer state (after the step) and peak saved activations."""
    model = engine.model
    with SavedActivationMeter(model.parameters()) as meter:
        engine.train_step(microbatches, loss_fn)
    ddp = engine.ddp_model
    grad_buffers = [b.grad_data for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers)]
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": tensor_bytes(grad_buffers),
        "optimizer": optimizer_state_bytes(engine.optimizer),
        "activations": meter.peak_bytes,
    }
