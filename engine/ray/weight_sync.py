"""Weight sync between trainer ranks and vLLM engine actors over Ray: forming the sync groups,
running an update, checking every engine worker's report.

    transport = connect_transport(engines, backend="gloo")        # once; reused across syncs
    stats = sync_weights(engines, exporter_iterator, bucket_bytes=64 << 20, transport=transport)
    sync = ActorWeightSync(actor_group, engines, config, backend="gloo")  # the RL loop's: one push per rollout

The bytes travel through ``parallel.weight_transfer`` (buckets, gloo / NCCL / CUDA IPC
channels), which knows neither Ray nor the engines; the engines are reached through the
weight-receiver calls of ``engine.ray.engine_pool.EnginePool`` (``engines`` below is a pool, or a
list of Ray engine-actor handles); vLLM's side is ``engine.ray.vllm_worker_ext``.

Actor (Megatron, any TP/PP/EP) -> engines: the actor's ranks open their senders
(``engine.ray.weight_senders``: with gloo / NCCL every rank that owns HF tensors, one per
pipeline stage plus expert owners, has its own group to all engine workers; with CUDA IPC rank 0
sends for all). The driver hands every engine the senders' groups in one order to join
(``join_groups``) while the senders wait for them; each update the engines read the groups in
that order and verify the update is complete.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import ray

from engine.ray.engine_pool import EnginePool, WeightSyncError, as_pool

__all__ = ["ActorWeightSync", "EngineGroup", "WeightSyncConfig", "WeightSyncError", "connect_transport",
           "resolve_sync_backend", "sync_weights"]
from engine.ray.config import WeightSyncConfig  # noqa: F401  (declared apart: the parsers import no torch)
from parallel.weight_transfer import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    NamedTensor,
    SyncStats,
    WeightTransport,
    make_transport,
    stream_weights,
)


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
def sender_host() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@dataclass
class EngineGroup:
    """A connected transport and the engines whose workers joined it."""

    transport: WeightTransport
    pool: EnginePool | None

    @property
    def group_id(self) -> str:
        return self.transport.group_id

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Leave the group on this side and on every engine that joined it."""
        self.transport.close()
        if self.pool is not None:
            self.pool.close_weight_receiver(self.group_id, timeout_s=timeout_s)
        self.pool = None


def connect_transport(engines, *, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S,
                      host: str | None = None) -> EngineGroup:
    """Form the sync group: this process is rank 0, engine e's worker w is rank offset(e) + w."""
    pool = as_pool(engines)
    counts = pool.weight_sync_worker_counts(timeout_s=timeout_s)
    transport = make_transport(backend, world_size=1 + sum(counts), host=host or sender_host(), timeout_s=timeout_s)
    joining = pool.join_weight_groups([transport.receiver_spec()], counts, timeout_s=timeout_s)
    transport.connect()  # the workers are joining concurrently through the calls above
    joining.result()
    return EngineGroup(transport, pool)


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
def _same_engines(a, b) -> bool:
    return list(getattr(a, "handles", [a])) == list(getattr(b, "handles", [b]))


def sync_weights(engines, named_tensors: Iterable[NamedTensor], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 transport: EngineGroup | None = None, backend: str = "gloo",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> SyncStats:
    """Push every ``(hf_name, full_tensor)`` of ``named_tensors`` into every engine, in place.

    ``transport`` is a group from ``connect_transport`` (reuse it across syncs); without one, a
    ``backend`` group is formed for this call and closed after it. Raises ``WeightSyncError``
    naming the tensors when any worker did not receive exactly the model's tensors; if the
    iterator raises, the engines are told the update aborted and the error propagates.
    """
    pool = as_pool(engines)
    if transport is not None and not _same_engines(pool, transport.pool):
        # Workers outside the call would never take their part of the broadcasts: a hang.
        raise ValueError("sync_weights: engines must be exactly the engines the transport was connected to")
    own = transport is None
    group = transport or connect_transport(pool, backend=backend, timeout_s=timeout_s)
    try:
        receiving = pool.receive_weights([group.group_id], timeout_s=timeout_s)
        try:
            stats = stream_weights(group.transport, named_tensors, bucket_bytes=bucket_bytes)
        except BaseException as err:
            _wait_for_abort(receiving, cause=err)
            raise
        reports = receiving.result()
        check_reports(reports)
        return replace(stats, worker_load_seconds=max(r["load_seconds"] for rs in reports for r in rs))
    finally:
        if own:
            group.close()


def _wait_for_abort(receiving, *, cause: BaseException) -> None:
    """The workers were told the update aborted; let them finalise (and mark themselves stale)."""
    try:
        receiving.result()
    except Exception as err:  # the transport itself may be what failed: keep the first error
        cause.add_note(f"while aborting the weight sync: {err!r}")


# ----- the RL loop's sync: the actor's ranks -> every engine -------------------------------------
class ActorWeightSync:
    """One complete update of every engine from a Megatron role's current weights, per ``push``."""

    def __init__(self, actor_group, engines, config: WeightSyncConfig, *, backend: str,
                 timeout_s: float = 600.0):
        """``engines``: an ``EnginePool`` (or Ray engine-actor handles); ``backend``: ``config.backend``
        resolved for where the engines run (``resolve_sync_backend``)."""
        self.actor = actor_group
        self.pool = as_pool(engines)
        self.bucket_bytes = config.bucket_mb << 20
        self.timeout_s, self.backend = timeout_s, backend
        self.group_ids: list[str] = []
        self._open()

    def _open(self) -> None:
        counts = self.pool.weight_sync_worker_counts(timeout_s=self.timeout_s)
        specs = self.actor.open_weight_sync(1 + sum(counts), self.backend)  # a rank's old sender closes first
        joining = self.pool.join_weight_groups(specs, counts, timeout_s=self.timeout_s)
        self.actor.connect_weight_sync()  # each sender's group completes as the engines reach it
        joining.result()
        self.group_ids = [spec["group_id"] for spec in specs]  # the order every engine joined them in

    def reopen(self) -> None:
        """Every sync group formed anew, every engine joining in the driver's order: after an engine
        was replaced (its workers were ranks of the old groups, the new ones are in none). The
        engines that stayed leave the old groups; the next ``push`` reaches every engine."""
        for group_id in self.group_ids:
            self.pool.close_weight_receiver(group_id, timeout_s=self.timeout_s)
        self._open()

    def push(self) -> dict:
        receiving = self.pool.receive_weights(self.group_ids, timeout_s=self.timeout_s)
        try:
            sent = self.actor.send_weights(self.bucket_bytes)
        except Exception as err:
            # An engine that died leaves the senders with a closed connection: name the engine.
            explained = self.pool.explain(err, what="the weight sync")
            if explained is err:
                raise
            raise explained from err
        reports = receiving.result()
        check_reports(reports)
        stats = [s for s in sent if s]
        return {
            "sync/bytes": float(sum(s.num_bytes for s in stats)),
            "sync/send_seconds": max((s.seconds for s in stats), default=0.0),
        }
