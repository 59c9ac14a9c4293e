"""Weight sync between trainer ranks and vLLM engine actors over Ray: forming the sync groups,
running an update, checking every engine worker's report.

    transport = connect_transport(engines, backend="gloo")        # once; reused across syncs
    stats = sync_weights(engines, exporter_iterator, bucket_bytes=64 << 20, transport=transport)
    sync = ActorWeightSync(actor_group, engines, config, backend="gloo")  # the RL loop's: one push per rollout

The bytes travel through ``parallel.weight_transfer`` (buckets, gloo / NCCL / CUDA IPC
channels), which knows neither Ray nor the engines; the engine side of the protocol is
``engine.ray.vllm_engine.LLMEngineActor`` and ``engine.ray.vllm_worker_ext``.

Actor (Megatron, any TP/PP/EP) -> engines: the actor's ranks open their senders
(``engine.ray.weight_senders``: with gloo / NCCL every rank that owns HF tensors, one per
pipeline stage plus expert owners, has its own group to all engine workers; with CUDA IPC rank 0
sends for all). The driver hands every engine the senders' groups in one order to join
(``join_groups``) while the senders wait for them; each update the engines read the groups in
that order and verify the update is complete.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Literal

import ray

from engine.ray.calls import get_each
from parallel.options import option
from parallel.weight_transfer import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    NamedTensor,
    SyncStats,
    WeightTransport,
    make_transport,
    stream_weights,
)


class WeightSyncError(RuntimeError):
    """A weight update did not complete on every engine worker (names the tensors at fault)."""


@dataclass(kw_only=True)
class WeightSyncConfig:
    """How the actor's weights reach the engines before every rollout."""

    backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = option(
        "auto", flag="vllm_sync_backend",
        help="transport: gloo (CPU, any box), nccl (GPU), cuda_ipc (engines on the actor's GPUs); auto: cuda_ipc "
             "under --colocate_all_models on GPU, nccl on GPU, gloo on CPU")
    bucket_mb: int = option(64, flag="vllm_sync_bucket_mb", help="bucket size; no rank ever holds the whole model")

    def __post_init__(self) -> None:
        if self.bucket_mb < 1:
            raise ValueError(f"--vllm_sync_bucket_mb must be >= 1, got {self.bucket_mb}")


def resolve_sync_backend(requested: str, *, cuda: bool, colocated: bool) -> str:
    """The transport for ``--vllm_sync_backend requested`` with engines on GPUs (``cuda``) that are, or
    not, the actor's own (``colocated``: --colocate_all_models). gloo on GPU would stage every
    bucket through host memory and TCP (minutes per sync at 70B): it is never the GPU default."""
    if requested == "auto":
        return ("cuda_ipc" if colocated else "nccl") if cuda else "gloo"
    if requested != "gloo" and not cuda:
        raise ValueError(f"--vllm_sync_backend {requested} needs GPU engines; gloo is the CPU transport")
    if requested == "nccl" and colocated:
        # NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected").
        raise ValueError("--vllm_sync_backend nccl cannot reach engines on the actor's own GPUs "
                         "(--colocate_all_models): use cuda_ipc (the default there)")
    if requested == "cuda_ipc" and not colocated:
        raise ValueError("--vllm_sync_backend cuda_ipc needs the engines on the actor's GPUs "
                         "(--colocate_all_models); use nccl otherwise")
    return requested


# ----- forming a group with the engines -------------------------------------------------------
def _engine_names(engines: list) -> list[str]:
    return [f"engine {i}" for i in range(len(engines))]


def sender_host() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@dataclass
class EngineGroup:
    """A connected transport and the engines whose workers joined it."""

    transport: WeightTransport
    engines: tuple

    @property
    def group_id(self) -> str:
        return self.transport.group_id

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Leave the group on this side and on every engine that joined it."""
        self.transport.close()
        refs = [engine.close_weight_receiver.remote(self.group_id) for engine in self.engines]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        self.engines = ()


def engine_worker_counts(engines: list, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """How many workers (sync ranks) each engine has."""
    return get_each([e.num_weight_sync_workers.remote() for e in engines], names=_engine_names(engines),
                    timeout_s=timeout_s, what="group setup", error=WeightSyncError)


def join_groups(engines: list, specs: list[dict], worker_counts: list[int]) -> list:
    """Every engine joins every group of ``specs``, in that order, in one call per engine; engine
    e's worker w is rank ``1 + sum(worker_counts[:e]) + w`` of each group (rank 0: the sender).

    One ordered list for all engines is what keeps several senders (one per pipeline stage or
    expert owner) from deadlocking: an engine joins one group at a time, and Ray orders an engine's
    calls by arrival only, so groups requested by each sender on its own can reach engine 0 as
    (A, B) and engine 1 as (B, A), each then waiting in a group the other never enters. Returns
    the calls' references; the senders must ``connect`` while they run."""
    refs, offset = [], 1
    for engine, count in zip(engines, worker_counts):
        refs.append(engine.init_weight_receivers.remote(specs, offset))
        offset += count
    return refs


def wait_joined(refs: list, engines: list, *, timeout_s: float) -> None:
    get_each(refs, names=_engine_names(engines), timeout_s=timeout_s, what="group setup", error=WeightSyncError)


def connect_transport(engines: list, *, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S,
                      host: str | None = None) -> EngineGroup:
    """Form the sync group: this process is rank 0, engine e's worker w is rank offset(e) + w."""
    counts = engine_worker_counts(engines, timeout_s=timeout_s)
    transport = make_transport(backend, world_size=1 + sum(counts), host=host or sender_host(), timeout_s=timeout_s)
    joining = join_groups(engines, [transport.receiver_spec()], counts)
    transport.connect()  # the workers are joining concurrently through the calls above
    wait_joined(joining, engines, timeout_s=timeout_s)
    return EngineGroup(transport, tuple(engines))


# ----- what the engine workers report -----------------------------------------------------------
def _format_names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def report_problems(report: dict) -> list[str]:
    """What went wrong on one worker during an update; empty for a complete update.

    A worker report holds ``missing`` / ``unexpected`` / ``mismatched`` / ``duplicated`` name
    lists, ``errors`` (loader failures) and ``aborted``; see ``engine.ray.vllm_worker_ext``.
    """
    problems = ["the sender aborted the update"] if report["aborted"] else []
    problems += list(report["errors"])
    for key in ("missing", "unexpected", "mismatched", "duplicated"):
        if report[key]:
            problems.append(f"{len(report[key])} {key} tensor(s): {_format_names(report[key])}")
    return problems


def check_reports(reports: list[list[dict]]) -> None:
    """Raise ``WeightSyncError`` unless every worker of every engine loaded exactly what it expected."""
    problems = []
    for engine_index, engine_reports in enumerate(reports):
        for report in engine_reports:
            where = (f"engine {engine_index} worker {report['rank']} "
                     f"(tp rank {report['tp_rank']}/{report['tp_size']})")
            problems += [f"{where}: {problem}" for problem in report_problems(report)]
    if problems:
        raise WeightSyncError("weight sync incomplete; the engines refuse to generate until a full sync:\n  "
                              + "\n  ".join(problems))


# ----- one update from this process -------------------------------------------------------------
def sync_weights(engines: list, named_tensors: Iterable[NamedTensor], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 transport: EngineGroup | None = None, backend: str = "gloo",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> SyncStats:
    """Push every ``(hf_name, full_tensor)`` of ``named_tensors`` into every engine, in place.

    ``transport`` is a group from ``connect_transport`` (reuse it across syncs); without one, a
    ``backend`` group is formed for this call and closed after it. Raises ``WeightSyncError``
    naming the tensors when any worker did not receive exactly the model's tensors; if the
    iterator raises, the engines are told the update aborted and the error propagates.
    """
    if transport is not None and tuple(engines) != transport.engines:
        # Workers outside the call would never take their part of the broadcasts: a hang.
        raise ValueError("sync_weights: engines must be exactly the engines the transport was connected to")
    own = transport is None
    group = transport or connect_transport(engines, backend=backend, timeout_s=timeout_s)
    names = _engine_names(engines)
    try:
        refs = [engine.receive_weights.remote(group.group_id) for engine in engines]
        try:
            stats = stream_weights(group.transport, named_tensors, bucket_bytes=bucket_bytes)
        except BaseException as err:
            _wait_for_abort(refs, names, timeout_s, cause=err)
            raise
        reports = get_each(refs, names=names, timeout_s=timeout_s, what="weight sync", error=WeightSyncError)
        check_reports(reports)
        return replace(stats, worker_load_seconds=max(r["load_seconds"] for rs in reports for r in rs))
    finally:
        if own:
            group.close()


def _wait_for_abort(refs: list, names: list[str], timeout_s: float, *, cause: BaseException) -> None:
    """The workers were told the update aborted; let them finalise (and mark themselves stale)."""
    try:
        get_each(refs, names=names, timeout_s=timeout_s, what="an aborted weight sync", error=WeightSyncError)
    except Exception as err:  # the transport itself may be what failed: keep the first error
        cause.add_note(f"while aborting the weight sync: {err!r}")


# ----- the RL loop's sync: the actor's ranks -> every engine -------------------------------------
class ActorWeightSync:
    """One complete update of every engine from a Megatron role's current weights, per ``push``."""

    def __init__(self, actor_group, engines: list, config: WeightSyncConfig, *, backend: str,
                 timeout_s: float = 600.0):
        """``backend``: ``config.backend`` resolved for where the engines run (``resolve_sync_backend``)."""
        self.actor = actor_group
        self.engines = engines
        self.bucket_bytes = config.bucket_mb << 20
        self.timeout_s = timeout_s
        counts = engine_worker_counts(engines, timeout_s=timeout_s)
        specs = actor_group.open_weight_sync(1 + sum(counts), backend)
        joining = join_groups(engines, specs, counts)
        actor_group.connect_weight_sync()  # each sender's group completes as the engines reach it
        wait_joined(joining, engines, timeout_s=timeout_s)
        self.group_ids = [spec["group_id"] for spec in specs]  # the order every engine joined them in

    def push(self) -> dict:
        receiving = [engine.receive_weights.remote(self.group_ids) for engine in self.engines]
        sent = self.actor.send_weights(self.bucket_bytes)
        reports = get_each(receiving, names=_engine_names(self.engines), timeout_s=self.timeout_s,
                           what="receiving weights", error=WeightSyncError)
        check_reports(reports)
        stats = [s for s in sent if s]
        return {
            "sync/bytes": float(sum(s.num_bytes for s in stats)),
            "sync/send_seconds": max((s.seconds for s in stats), default=0.0),
        }
