"""Background checkpoint writes (``--async_save``): the sharded checkpoint of ``models.mcore_checkpoint``
in three parts, so that training goes on while the files are written.

1. ``begin_save_sharded`` (collective, on the training thread): megatron-core plans the save (its
   collectives run here), every tensor this rank writes is copied (the snapshot: training may
   change the originals from now on), and the small files (RNG, meta, common state) are written,
   all into the staging directory of ``models.hf_checkpoint.open_staging``.
2. ``PendingSave.write`` (this rank alone, no collective: it runs on a background thread while
   the training thread communicates): the snapshot's files are written, fsynced and checksummed.
3. ``PendingSave.finish`` (collective, on the training thread, once every rank's write is done):
   megatron-core's metadata, the manifest, then the rename that makes the checkpoint visible.

A crash, kill or write error before the rename leaves only a staging directory: the previous
checkpoint stays the newest one a resume finds. The bytes written are the synchronous save's:
the same plan, the same ``_write_item`` calls; only the process that runs them differs.

megatron-core 0.16.1 (``strategies/filesystem_async.py``) runs the writes in processes it forks
per bucket; forking a rank whose other thread is mid-computation can deadlock the child (locks
held by that thread), so the background thread calls the per-bucket writer itself.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from models.durable_io import file_checksum
from models.hf_checkpoint import CheckpointError, open_staging, publish_staging
from models.manifest import write_manifest
from models.mcore_checkpoint import _save_strategy as save_strategy
from models.mcore_checkpoint import write_small_files


@dataclass
class PendingSave:
    """One checkpoint between its snapshot and its publication."""

    directory: Path
    staging: Path
    request: AsyncRequest
    buckets: list  # megatron-core's write buckets, tensors replaced by their snapshot copies
    snapshot_s: float  # the training thread's share of the save so far
    write_s: float = 0.0
    checksums: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None

    def write(self) -> None:
        """This rank's files (background thread); an error is kept for ``finish`` to report."""
        started = time.perf_counter()
        try:
            self._write_buckets()
        except BaseException as exc:  # noqa: BLE001 (reported collectively by finish)
            self.error = exc
        self.write_s = time.perf_counter() - started

    def _write_buckets(self) -> None:
        if not self.buckets:
            return
        transform_list = self.request.async_fn.args[0]
        results_queue = self.request.async_fn_args[2]
        # megatron_patches wraps the writer for forked children (parent-death signal); in-thread,
        # the plain writer.
        write_one = getattr(FileSystemWriterAsync.write_preloaded_data, "__wrapped__",
                            FileSystemWriterAsync.write_preloaded_data)
        local: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        for index, bucket in enumerate(self.buckets):
            count.put(index)
            write_one(transform_list, local_proc_idx=index, write_bucket=bucket, results_queue=local,
                      count_queue=count, use_fsync=True)
        results = {}
        while not local.empty():
            index, written = local.get_nowait()
            if isinstance(written, BaseException):
                raise written
            results[index] = written
        for file_name, storage_key, _ in self.buckets:
            self.checksums[storage_key] = file_checksum(file_name)
        results_queue.put(results)  # where megatron-core's finalize takes the write results from

    def finish(self) -> None:
        """Collective: publish the checkpoint once every rank's ``write`` returned; a failed write on
        any rank is an error on every rank (nothing published)."""
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, f"{type(self.error).__name__}: {self.error}" if self.error else None)
        failed = [(rank, error) for rank, error in enumerate(errors) if error]
        if failed:
            rank, cause = failed[0]
            raise CheckpointError(f"the background write of {self.directory} failed on rank {rank} ({cause}); it "
                                  f"stays in {self.staging.name} and the previous checkpoint remains the newest")
        for finalize in self.request.finalize_fns:
            finalize()
        write_manifest(self.staging, checksums=True, group=dist.group.WORLD, known=self.checksums)
        publish_staging(self.staging, self.directory)


def begin_save_sharded(sharded_state_dict: dict, directory, **small_files) -> PendingSave:
    """Collective: plan the save of ``sharded_state_dict`` to ``directory`` and snapshot it
    (``small_files``: the keywords of ``models.mcore_checkpoint.write_small_files``)."""
    started = time.perf_counter()
    staging = open_staging(directory)
    request = dist_checkpointing.save(sharded_state_dict, str(staging), sharded_strategy=save_strategy(),
                                      async_sharded_save=True)
    buckets = _snapshot(request.async_fn_args[1] if request.async_fn is not None else [])
    write_small_files(staging, **small_files)
    return PendingSave(Path(directory), staging, request, buckets, snapshot_s=time.perf_counter() - started)


def _snapshot(buckets: list) -> list:
    """The write buckets with a host copy of every tensor (the originals keep training)."""
    return [(file_name, storage_key, (bytes_data, [(item, tensor.detach().to("cpu", copy=True))
                                                   for item, tensor in tensor_data]))
            for file_name, storage_key, (bytes_data, tensor_data) in buckets]
