"""A trainer rank's side of the actor -> engines weight sync (the driver's is ``engine.ray.weight_sync``).

Every rank of the role opens a sender for the same backend at once (``open_sender``: collective
over the role's world), the driver hands the engines the ``spec`` of every rank that returns one,
the ranks ``connect`` while the engines join, and each ``send`` is one update.

- ``OwnerSender`` (gloo, nccl): every rank that owns HF tensors (TP rank 0 of each pipeline stage
  and each expert owner, DP / CP rank 0) sends its own over its own group; the other ranks
  iterate the exporter in step (its TP all-gathers are collective) and send nothing.
- ``SharedIpcSender`` (cuda_ipc, ``--colocate_all_models``): the engines' workers sit on the
  role's GPUs and can map only memory of their own GPU, so every rank holds each bucket on its
  GPU (``parallel.weight_transfer.StageFanOut``) and rank 0 sends one IPC handle per GPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.ray.weight_sync import sender_host
from parallel.weight_transfer import (
    DEFAULT_TIMEOUT_S,
    SharedIpcBuckets,
    StageFanOut,
    SyncStats,
    make_transport,
    stream_shared_ipc,
    stream_weights,
)


class _Sender:
    """What the driver sees of a rank's sender: the group spec (None: this rank sends nothing)."""

    transport = None

    @property
    def spec(self) -> dict | None:
        return self.transport.receiver_spec() if self.transport is not None else None

    def connect(self) -> None:
        if self.transport is not None:
            self.transport.connect()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class OwnerSender(_Sender):
    """gloo / nccl: this rank sends what it owns over its own group, if it owns anything."""

    def __init__(self, model, adapter, *, world_size: int, backend: str, timeout_s: float):
        from models.weights import owns_weights

        self.model, self.adapter = model, adapter
        self.transport = (make_transport(backend, world_size=world_size, host=sender_host(), timeout_s=timeout_s)
                          if owns_weights(model) else None)

    def send(self, bucket_bytes: int) -> SyncStats | None:
        from models.lora import merged_tensor_of
        from models.weights import iter_hf_weights

        # A LoRA actor sends W + scale B A, merged shard by shard (the engines serve the merged model).
        tensors = iter_hf_weights(self.model, self.adapter, dtype=self.adapter.export_dtype(),
                                  tensor_of=merged_tensor_of(self.model))
        if self.transport is None:
            for _ in tensors:
                pass
            return None
        return stream_weights(self.transport, tensors, bucket_bytes=bucket_bytes)


class SharedIpcSender(_Sender):
    """cuda_ipc: every rank holds each bucket on its GPU; rank 0 sends one handle per GPU."""

    def __init__(self, model, adapter, *, world_size: int, timeout_s: float):
        from megatron.core import parallel_state as ps

        self.model, self.adapter = model, adapter
        if ps.get_expert_model_parallel_world_size() > 1:
            raise ValueError("--vllm_sync_backend cuda_ipc does not support an actor with "
                             "--actor_expert_model_parallel_size > 1 yet (each rank holds only its experts); "
                             "use --vllm_sync_backend nccl without --colocate_all_models")
        rank, device = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
        objects = dist.new_group(backend="gloo")  # handles and stage numbers are Python objects
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, ps.get_pipeline_model_parallel_rank(), group=objects)
        self.fan_out = StageFanOut(stages, rank=rank, device=device, timeout_s=timeout_s)
        self.transport = (make_transport("cuda_ipc", world_size=world_size, host=sender_host(), timeout_s=timeout_s)
                          if rank == 0 else None)
        self.shared = SharedIpcBuckets(rank=rank, device=device, group=objects, transport=self.transport)

    def send(self, bucket_bytes: int) -> SyncStats | None:
        from models.lora import merged_tensor_of
        from models.weights import iter_hf_weights

        tensors = iter_hf_weights(self.model, self.adapter, dtype=self.adapter.export_dtype(), every_rank=True,
                                  tensor_of=merged_tensor_of(self.model))
        stats = stream_shared_ipc(self.fan_out, self.shared, tensors, bucket_bytes=bucket_bytes)
        return stats if self.transport is not None else None


def open_sender(model, adapter, *, world_size: int, backend: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """This rank's sender into a group of ``world_size`` (1 + every engine worker). Collective over
    the role's world (every rank calls it together)."""
    if backend != "gloo" and not torch.cuda.is_available():
        raise ValueError(f"--vllm_sync_backend {backend} needs the actor on GPUs; use gloo on CPU")
    if backend == "cuda_ipc":
        return SharedIpcSender(model, adapter, world_size=world_size, timeout_s=timeout_s)
    return OwnerSender(model, adapter, world_size=world_size, backend=backend, timeout_s=timeout_s)
