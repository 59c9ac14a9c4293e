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
* ``cuda_ipc`` -- colocated engines: the bucket stays in GPU memory and each receiver maps, through
  a CUDA IPC handle, the copy on the GPU it runs on (control messages over gloo). Handles travel
  keyed by GPU uuid: one sender offers its own GPU's; a trainer world spanning several GPUs
  (``SharedIpcBuckets``) offers one per GPU, every rank holding the bucket on its own GPU
  (``StageFanOut`` brings other pipeline stages' buckets over), as OpenRLHF does.

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


def ipc_handle_of(buffer: torch.Tensor) -> tuple:
    """The CUDA IPC handle (``rebuild_cuda_tensor``'s arguments) of ``buffer``, once its data is written."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.current_stream(buffer.device).synchronize()  # IPC readers do not follow our stream order
    _, handle = reduce_tensor(buffer)
    return handle


class CudaIpcTransport(GlooTransport):
    """Colocated GPU transport: each receiver maps the bucket on its own GPU through a CUDA IPC handle.

    The bucket never leaves GPU memory; the gloo group only carries headers (with the handles,
    keyed by GPU uuid) and a barrier that keeps the buckets alive until every receiver has copied
    its one out. ``send_bucket`` offers this process's GPU only (the receivers must share it);
    ``send_handles`` sends the handles a whole trainer world gathered (``SharedIpcBuckets``).
    """

    backend = "cuda_ipc"

    def __init__(self, *, world_size: int, host: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(world_size=world_size, host=host, timeout_s=timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device())

    def send_bucket(self, bucket: list[NamedTensor]) -> None:
        entries, buffer = pack_bucket(bucket, self.device)
        self.send_handles(entries, buffer.numel(), {_device_uuid(self.device): ipc_handle_of(buffer)})

    def send_handles(self, entries: list[TensorEntry], nbytes: int, handles: dict[str, tuple]) -> None:
        """One bucket, already on every GPU in ``handles`` (GPU uuid -> IPC handle of its copy)."""
        self.channel.broadcast_object({"kind": "bucket", "entries": entries, "nbytes": nbytes,
                                       "ipc_handles": handles})
        self.channel.barrier()  # every receiver holds its own copy: the offered buffers may be freed


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
            self.device_uuid = _device_uuid(device)  # picks this GPU's copy of every bucket
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
            return self._copy_from_ipc(select_ipc_handle(header["ipc_handles"], self.device_uuid, rank=self.rank))
        # A fresh buffer per bucket: the model loader may keep views of it until a layer is complete.
        buffer = torch.empty(header["nbytes"], dtype=torch.uint8, device=self.device)
        self.channel.broadcast_tensor(buffer)
        return buffer

    def _copy_from_ipc(self, handle: tuple) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(handle)
        # The handle is of this very GPU, but the offering process may number it differently
        # (its own CUDA_VISIBLE_DEVICES): the index is ours (OpenRLHF's update_weight_cuda_ipc does the same).
        args[6] = self.device.index
        local = rebuild_cuda_tensor(*args).to(self.device, copy=True)
        torch.cuda.synchronize(self.device)
        self.channel.barrier()
        return local


def select_ipc_handle(handles: dict[str, tuple], device_uuid: str, *, rank: int) -> tuple:
    """The handle of the bucket's copy on this worker's GPU (``device_uuid``); a worker on a GPU that
    no sending rank offered cannot map the bucket at all (CUDA IPC does not cross devices here)."""
    handle = handles.get(device_uuid)
    if handle is None:
        raise RuntimeError(
            f"--vllm_sync_backend cuda_ipc: engine worker (sync rank {rank}) runs on GPU {device_uuid}, where no "
            f"trainer rank offered the weights (offered: {', '.join(sorted(handles)) or 'none'}); cuda_ipc needs "
            "every engine worker on an actor rank's GPU (--colocate_all_models), use nccl otherwise")
    return handle


def merge_ipc_offers(offers: list[dict[str, tuple]]) -> dict[str, tuple]:
    """One handle per GPU uuid from every rank's ``{uuid: handle}``; the first rank on a GPU wins
    (its copy is as good as any other's, and one handle per GPU is all a worker maps)."""
    handles: dict[str, tuple] = {}
    for offer in offers:
        for device_uuid, handle in offer.items():
            handles.setdefault(device_uuid, handle)
    return handles


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


# ---------------------------------------------------------------------------------------------
# cuda_ipc from a trainer world spanning several GPUs (one engine worker per GPU, colocated).
#
# A worker can map only a bucket that lies on its own GPU, so every trainer rank holds each
# bucket on its GPU and offers a handle of it (OpenRLHF's per-GPU handles; slime broadcasts
# across pipeline stages for the same reason). Every rank runs the same sequence of collectives:
# stage after stage, bucket after bucket.


@dataclass(frozen=True)
class StageRoute:
    """How one pipeline stage's buckets reach the ranks of the other stages."""

    stage: int
    src: int  # the stage's first rank sends
    members: tuple[int, ...]  # ``src`` and every rank of the other stages, ascending


def stage_routes(stage_of_rank: list[int]) -> list[StageRoute]:
    """One route per pipeline stage, stages in ascending order (``stage_of_rank[r]``: rank r's stage)."""
    routes = []
    for stage in sorted(set(stage_of_rank)):
        own = [rank for rank, s in enumerate(stage_of_rank) if s == stage]
        others = [rank for rank, s in enumerate(stage_of_rank) if s != stage]
        routes.append(StageRoute(stage, own[0], tuple(sorted([own[0], *others]))))
    return routes


class StageFanOut:
    """Every bucket of every pipeline stage on every rank, stage after stage (collective over the world).

    The ranks of a stage each build the stage's buckets themselves from ``own_stage_tensors`` (all
    of them yield the same tensors: TP peers after their all-gather, DP / CP replicas from the same
    weights), so the stage's own collectives (TP all-gathers) run undisturbed and in step; the
    stage's first rank sends the buckets to the ranks of the other stages, which have nothing else
    to do meanwhile. Construct on every rank at once (it creates process groups)."""

    def __init__(self, stage_of_rank: list[int], *, rank: int, device: torch.device,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.device = rank, device
        self.stage = stage_of_rank[rank]
        self.routes = stage_routes(stage_of_rank)
        self._groups: dict[int, tuple] = {}  # stage -> (object group, tensor group)
        for route in self.routes:
            if len(route.members) == 1:
                continue  # a single stage: nobody to send to
            # new_group is collective over the whole world, members or not, in the same order.
            objects = dist.new_group(list(route.members), backend="gloo", timeout=_timeout(timeout_s))
            tensors = objects if device.type != "cuda" else dist.new_group(
                list(route.members), backend="nccl", timeout=_timeout(timeout_s))
            self._groups[route.stage] = (objects, tensors)

    def buckets(self, own_stage_tensors: Iterable[NamedTensor], bucket_bytes: int
                ) -> Iterator[tuple[list[TensorEntry], torch.Tensor]]:
        """``(entries, packed buffer on this rank's device)`` of every bucket of every stage.
        ``own_stage_tensors`` is consumed during this rank's stage's turn only."""
        for route in self.routes:
            if route.stage == self.stage:
                yield from self._build(route, own_stage_tensors, bucket_bytes)
            else:
                yield from self._receive(route)

    def _build(self, route: StageRoute, named_tensors, bucket_bytes: int):
        sending = self.rank == route.src and route.stage in self._groups
        try:
            for bucket in iter_buckets(named_tensors, bucket_bytes):
                entries, buffer = pack_bucket(bucket, self.device)
                if sending:
                    self._broadcast_object(route, {"kind": "bucket", "entries": entries, "nbytes": buffer.numel()})
                    dist.broadcast(buffer, src=route.src, group=self._groups[route.stage][1])
                yield entries, buffer
        except BaseException:
            if sending:
                self._broadcast_object(route, _end_header(aborted=True, num_tensors=-1))
            raise
        if sending:
            self._broadcast_object(route, _end_header(aborted=False, num_tensors=0))

    def _receive(self, route: StageRoute):
        while True:
            header = self._broadcast_object(route)
            if header["kind"] == "end":
                if header["aborted"]:
                    raise RuntimeError(f"pipeline stage {route.stage} (rank {route.src}) aborted its weight export")
                return
            buffer = torch.empty(header["nbytes"], dtype=torch.uint8, device=self.device)
            dist.broadcast(buffer, src=route.src, group=self._groups[route.stage][1])
            yield header["entries"], buffer

    def _broadcast_object(self, route: StageRoute, obj: Any = None) -> Any:
        holder = [obj]
        dist.broadcast_object_list(holder, src=route.src, group=self._groups[route.stage][0])
        return holder[0]


class SharedIpcBuckets:
    """Sends buckets that every rank of a trainer world holds on its own GPU: each rank offers a CUDA
    IPC handle of its copy, rank ``root`` (the owner of ``transport``) sends them keyed by GPU uuid
    and each engine worker maps the one of its GPU. Collective over ``group`` (every rank)."""

    def __init__(self, *, rank: int, device: torch.device, group, transport: CudaIpcTransport | None, root: int = 0):
        if (rank == root) != (transport is not None):
            raise ValueError("exactly the root rank of SharedIpcBuckets holds the transport")
        self.rank, self.device, self.group, self.transport, self.root = rank, device, group, transport, root

    def share(self, entries: list[TensorEntry], buffer: torch.Tensor) -> None:
        offer = {_device_uuid(self.device): ipc_handle_of(buffer)}
        offers = [None] * dist.get_world_size(self.group) if self.rank == self.root else None
        dist.gather_object(offer, offers, dst=self.root, group=self.group)
        if self.transport is not None:
            self.transport.send_handles(entries, buffer.numel(), merge_ipc_offers(offers))
        dist.barrier(group=self.group)  # the root heard every worker's copy done: the buffers may go

    def end(self, *, aborted: bool, num_tensors: int) -> None:
        if self.transport is not None:
            self.transport.send_end(aborted=aborted, num_tensors=num_tensors)


def stream_shared_ipc(fan_out: StageFanOut, shared: SharedIpcBuckets, own_stage_tensors: Iterable[NamedTensor], *,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """``stream_weights`` for a trainer world: every stage's buckets, from every rank's own GPU."""
    start = time.perf_counter()
    num_tensors = num_bytes = num_buckets = 0
    try:
        for entries, buffer in fan_out.buckets(own_stage_tensors, bucket_bytes):
            shared.share(entries, buffer)
            num_buckets += 1
            num_tensors += len(entries)
            num_bytes += sum(e.nbytes for e in entries)
    except BaseException:
        shared.end(aborted=True, num_tensors=-1)
        raise
    shared.end(aborted=False, num_tensors=num_tensors)
    return SyncStats(num_tensors, num_bytes, num_buckets, time.perf_counter() - start)
