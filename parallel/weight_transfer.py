"""Stream HF-named full tensors from one trainer rank to every worker of every inference engine.

Architecture-free: this module knows tensors, names, bytes and process groups, never a model.

Sender side (``engine.ray.weight_sync`` forms the group with the engines and checks their reports)::

    transport = make_transport("gloo", world_size=1 + num_workers, host=host)
    ... every worker calls open_receiver(transport.receiver_spec(), rank=...) while ...
    transport.connect()
    stats = stream_weights(transport, exporter_iterator, bucket_bytes=64 << 20)

The iterator contract: ``named_tensors`` yields ``(hf_name, full_tensor)`` pairs, each tensor
complete (not a TP shard), any dtype, any device, in any order (layer by layer keeps the
receivers' buffering bounded: a receiver can process a layer once all of its tensors arrived).
It is consumed lazily, one bucket at a time: at most one bucket of tensors (plus its packed
copy) is alive on the sender. A tensor larger than ``bucket_bytes`` travels alone.

Wire protocol (identical for every backend): for each bucket the sender broadcasts a header
(names, dtypes, shapes, byte offsets) and then one flat byte buffer; a final header with
``kind="end"`` closes the update (``aborted=True`` when the sender's iterator raised).

Backends (``--vllm_sync_backend``):

* ``gloo``     -- CPU tensors over a gloo process group (TCP). The CPU path; works on any box.
* ``nccl``     -- GPU tensors over NCCL (vLLM's ``PyNcclCommunicator`` on a
  ``StatelessProcessGroup``); the trainer rank and the engines are on different GPUs.
* ``cuda_ipc`` -- colocated engines: the bucket stays in the sender's GPU memory and receivers
  map it through a CUDA IPC handle (control messages over gloo). Needs every receiver to see
  the sender's GPU.

Every group is created on its own TCP store, so it touches neither the trainer's nor vLLM's
default ``torch.distributed`` group. This module knows neither Ray nor the engines.
"""
from __future__ import annotations

import datetime
import pickle
import socket
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl", "cuda_ipc")
DEFAULT_BUCKET_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 600.0
# Byte offsets inside a packed bucket are aligned so that every tensor view is aligned for its
# dtype (``Tensor.view(dtype)`` requires it) and starts on a cache line.
_ALIGN = 64

NamedTensor = tuple[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Bucketing and packing (pure tensor code).


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``bucket_bytes`` packed bytes, lazily.

    The input is pulled only as far as the current bucket needs, so a streaming exporter is never
    materialised. A single tensor larger than ``bucket_bytes`` forms a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"--vllm_sync_bucket_mb must be positive, got {bucket_bytes} bytes")
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = _aligned(tensor_nbytes(tensor))
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a packed bucket."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_bucket(bucket: list[NamedTensor], device: torch.device) -> tuple[list[TensorEntry], torch.Tensor]:
    """Lay a bucket out as one flat uint8 buffer on ``device`` (one collective per bucket)."""
    entries, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor_nbytes(tensor)
        entries.append(TensorEntry(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset += _aligned(nbytes)
    only = bucket[0][1] if len(bucket) == 1 else None
    if only is not None and only.device == device and only.is_contiguous():
        return entries, _as_bytes(only)  # a lone tensor is sent as it is: no packing copy
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    for entry, (_, tensor) in zip(entries, bucket):
        buffer[entry.offset : entry.offset + entry.nbytes].copy_(_as_bytes(tensor))
    return entries, buffer


def unpack_bucket(entries: list[TensorEntry], buffer: torch.Tensor) -> list[NamedTensor]:
    """Views of the tensors inside ``buffer`` (no copy; they keep ``buffer`` alive)."""
    return [
        (e.name, buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)) for e in entries
    ]


def _end_header(*, aborted: bool, num_tensors: int) -> dict:
    return {"kind": "end", "aborted": aborted, "num_tensors": num_tensors}


# ---------------------------------------------------------------------------------------------
# Channels: a private group over which rank 0 (the sender) broadcasts to every receiver.


def _timeout(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout_s)


class _Channel:
    """A private group in which rank 0 (the sender) broadcasts to every other rank."""

    rank: int
    device: torch.device

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank, as length + pickled bytes over the group itself (the group
        is private to one trainer job, the same trust domain as Ray's own pickling)."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            self.broadcast_tensor(torch.tensor([payload.numel()], dtype=torch.int64, device=self.device))
            self.broadcast_tensor(payload.to(self.device))
            return obj
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast_tensor(length)
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self.broadcast_tensor(payload)
        return pickle.loads(payload.cpu().numpy().tobytes())


class _GlooChannel(_Channel):
    """A standalone gloo group on its own TCP store (not registered as a torch default group)."""

    def __init__(self, store: dist.Store, *, rank: int, world_size: int, timeout_s: float):
        self.rank, self.device = rank, torch.device("cpu")
        prefixed = dist.PrefixStore("weight_sync", store)
        self.group = dist.ProcessGroupGloo(prefixed, rank, world_size, _timeout(timeout_s))

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def barrier(self) -> None:
        self.group.allreduce([torch.zeros(1)]).wait()


class _NcclChannel(_Channel):
    """vLLM's NCCL communicator on a ``StatelessProcessGroup`` (its own TCP store)."""

    def __init__(self, *, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, listen_socket: socket.socket | None = None):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.rank, self.device = rank, device
        self.group = StatelessProcessGroup.create(
            host=host, port=port, rank=rank, world_size=world_size,
            store_timeout=int(timeout_s), listen_socket=listen_socket,
        )
        self.comm = PyNcclCommunicator(self.group, device=device)

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        self.comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream(self.device))

    def barrier(self) -> None:
        self.group.barrier()


def _device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


# ---------------------------------------------------------------------------------------------
# Sender side.


class WeightTransport(ABC):
    """Sender side of one backend: rank 0 of a group whose other ranks are engine workers."""

    backend: str
    device: torch.device
    group_id: str  # names this group on the workers, which may belong to several

    @abstractmethod
    def receiver_spec(self) -> dict:
        """JSON-able description a worker needs to join (handed to ``open_receiver``)."""

    @abstractmethod
    def connect(self) -> None:
        """Join the group; blocks until every worker joined (collective with ``open_receiver``)."""

    @abstractmethod
    def send_bucket(self, bucket: list[NamedTensor]) -> None:
        """Deliver one bucket to every worker."""

    @abstractmethod
    def send_end(self, *, aborted: bool, num_tensors: int) -> None:
        """Close the current update on every worker."""

    def close(self) -> None:
        """Leave the group on this side."""
        self.channel = None


class _BroadcastTransport(WeightTransport):
    """Header, then the packed bucket, broadcast over ``self.channel`` (gloo or NCCL)."""

    channel: _Channel | None

    def send_bucket(self, bucket: list[NamedTensor]) -> None:
        entries, buffer = pack_bucket(bucket, self.device)
        self.channel.broadcast_object({"kind": "bucket", "entries": entries, "nbytes": buffer.numel()})
        self.channel.broadcast_tensor(buffer)

    def send_end(self, *, aborted: bool, num_tensors: int) -> None:
        self.channel.broadcast_object(_end_header(aborted=aborted, num_tensors=num_tensors))


class GlooTransport(_BroadcastTransport):
    """CPU transport: a gloo group over TCP between this process and every engine worker."""

    backend = "gloo"

    def __init__(self, *, world_size: int, host: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.device = torch.device("cpu")
        self.world_size, self.host, self.timeout_s = world_size, host, timeout_s
        self.group_id = uuid.uuid4().hex
        # Port 0: the store picks a free port, so concurrent jobs on one node never collide.
        self.store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=_timeout(timeout_s),
                                   wait_for_workers=False)

    def receiver_spec(self) -> dict:
        return {"backend": self.backend, "group_id": self.group_id, "host": self.host, "port": self.store.port,
                "world_size": self.world_size, "timeout_s": self.timeout_s}

    def connect(self) -> None:
        self.channel = _GlooChannel(self.store, rank=0, world_size=self.world_size, timeout_s=self.timeout_s)


class NcclTransport(_BroadcastTransport):
    """GPU transport: NCCL broadcast from the trainer rank's GPU to every engine worker's GPU."""

    backend = "nccl"

    def __init__(self, *, world_size: int, host: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.world_size, self.host, self.timeout_s = world_size, host, timeout_s
        self.group_id = uuid.uuid4().hex
        self.listen_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listen_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listen_socket.bind((host, 0))
        self.listen_socket.listen()

    def receiver_spec(self) -> dict:
        return {"backend": self.backend, "group_id": self.group_id, "host": self.host,
                "port": self.listen_socket.getsockname()[1],
                "world_size": self.world_size, "timeout_s": self.timeout_s}

    def connect(self) -> None:
        spec = self.receiver_spec()
        self.channel = _NcclChannel(host=self.host, port=spec["port"], rank=0, world_size=self.world_size,
                                    device=self.device, timeout_s=self.timeout_s, listen_socket=self.listen_socket)


class CudaIpcTransport(GlooTransport):
    """Colocated GPU transport: receivers map the sender's bucket through a CUDA IPC handle.

    The bucket never leaves the GPU it was packed on; the gloo group only carries headers and a
    barrier that keeps the bucket alive until every receiver has copied it out.
    """

    backend = "cuda_ipc"

    def __init__(self, *, world_size: int, host: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(world_size=world_size, host=host, timeout_s=timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device())

    def receiver_spec(self) -> dict:
        return {**super().receiver_spec(), "sender_device_uuid": _device_uuid(self.device)}

    def send_bucket(self, bucket: list[NamedTensor]) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        entries, buffer = pack_bucket(bucket, self.device)
        torch.cuda.current_stream().synchronize()  # IPC readers do not follow our stream order
        _, handle = reduce_tensor(buffer)
        self.channel.broadcast_object({"kind": "bucket", "entries": entries, "nbytes": buffer.numel(),
                                       "ipc_handle": handle})
        self.channel.barrier()  # every receiver holds its own copy: ``buffer`` may be freed


_TRANSPORTS: dict[str, type[WeightTransport]] = {
    "gloo": GlooTransport, "nccl": NcclTransport, "cuda_ipc": CudaIpcTransport,
}


def make_transport(backend: str, *, world_size: int, host: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> WeightTransport:
    """The sender half of ``backend`` (see the module docstring), not yet connected."""
    if backend not in _TRANSPORTS:
        raise ValueError(f"--vllm_sync_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "gloo" and not torch.cuda.is_available():
        raise ValueError(f"--vllm_sync_backend {backend} needs a GPU on the sending rank; use gloo on CPU")
    return _TRANSPORTS[backend](world_size=world_size, host=host, timeout_s=timeout_s)


# ---------------------------------------------------------------------------------------------
# Receiver side (runs inside each engine worker).


class WeightReceiver:
    """Worker half of a transport: yields the buckets of one update until the end marker."""

    def __init__(self, spec: dict, *, rank: int, device: torch.device):
        self.backend, self.group_id = spec["backend"], spec["group_id"]
        self.rank = rank
        self.device = torch.device("cpu") if self.backend == "gloo" else device
        self.last_end: dict | None = None
        if self.backend == "nccl":
            self.channel = _NcclChannel(host=spec["host"], port=spec["port"], rank=rank,
                                        world_size=spec["world_size"], device=device, timeout_s=spec["timeout_s"])
            return
        if self.backend == "cuda_ipc":
            self.ipc_device = _matching_device(spec["sender_device_uuid"], rank)
        store = dist.TCPStore(spec["host"], spec["port"], spec["world_size"], is_master=False,
                              timeout=_timeout(spec["timeout_s"]))
        self.channel = _GlooChannel(store, rank=rank, world_size=spec["world_size"], timeout_s=spec["timeout_s"])

    def buckets(self) -> Iterator[list[NamedTensor]]:
        """The buckets of the current update; afterwards ``last_end`` holds the end header."""
        while True:
            header = self.channel.broadcast_object()
            if header["kind"] == "end":
                self.last_end = header
                return
            yield unpack_bucket(header["entries"], self._receive_buffer(header))

    def _receive_buffer(self, header: dict) -> torch.Tensor:
        if self.backend == "cuda_ipc":
            return self._copy_from_ipc(header["ipc_handle"])
        # A fresh buffer per bucket: the model loader may keep views of it until a layer is complete.
        buffer = torch.empty(header["nbytes"], dtype=torch.uint8, device=self.device)
        self.channel.broadcast_tensor(buffer)
        return buffer

    def _copy_from_ipc(self, handle: tuple) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(handle)
        args[6] = self.ipc_device.index  # the sender's device index means nothing in this process
        local = rebuild_cuda_tensor(*args).to(self.device, copy=True)
        torch.cuda.synchronize(self.device)
        self.channel.barrier()
        return local


def _matching_device(uuid: str, rank: int) -> torch.device:
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        if _device_uuid(device) == uuid:
            return device
    raise RuntimeError(
        f"--vllm_sync_backend cuda_ipc: engine worker (sync rank {rank}) cannot see the sender's GPU "
        f"{uuid}; cuda_ipc needs colocated engines, use nccl otherwise"
    )


def open_receiver(spec: dict, *, rank: int, device: torch.device) -> WeightReceiver:
    """Join the group described by ``spec`` (blocks until the sender and every worker joined)."""
    return WeightReceiver(spec, rank=rank, device=device)


# ---------------------------------------------------------------------------------------------
# Streaming from the sender.


@dataclass(frozen=True)
class SyncStats:
    """What one ``sync_weights`` moved and how long it took."""

    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float  # sending, on this process
    worker_load_seconds: float = 0.0  # the slowest worker's time inside the engine's loader


def _stream(transport: WeightTransport, named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> SyncStats:
    start = time.perf_counter()
    num_tensors = num_bytes = num_buckets = 0
    for bucket in iter_buckets(named_tensors, bucket_bytes):
        transport.send_bucket(bucket)
        num_buckets += 1
        num_tensors += len(bucket)
        num_bytes += sum(tensor_nbytes(t) for _, t in bucket)
    return SyncStats(num_tensors, num_bytes, num_buckets, time.perf_counter() - start)


def stream_weights(transport: WeightTransport, named_tensors: Iterable[NamedTensor], *,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """Sender half only: stream into a connected group and close the update with an end marker.

    The receivers' side (and the check that every worker got exactly its tensors) is the
    caller's: ``engine.ray.weight_sync``.
    """
    try:
        stats = _stream(transport, named_tensors, bucket_bytes)
    except BaseException:
        transport.send_end(aborted=True, num_tensors=-1)
        raise
    transport.send_end(aborted=False, num_tensors=stats.num_tensors)
    return stats
