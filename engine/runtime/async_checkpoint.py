"""``--async_save``: a training checkpoint written by a background thread while training goes on.

The training thread takes the snapshot (``models.mcore_async_save.begin_save_sharded``) and returns
to training; a thread writes the files; at the start of each later train step the ranks agree (one
all-reduce, only while a write is in flight) whether every rank's write is done, and if so publish
the checkpoint together (metadata, manifest, rename; then the oldest checkpoints are rotated out).
At most one checkpoint is in flight: the next save, the run's last one and a preemption's wait for
it. What the writer cost is logged with the step that published it: ``checkpoint/snapshot_s`` and
``checkpoint/publish_s`` (the training thread's share) against ``checkpoint/write_s`` (the thread's).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from models.mcore_async_save import PendingSave


class BackgroundWriter:
    """One engine's checkpoint in flight (at most one)."""

    def __init__(self):
        self._pending: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._published: Callable[[], None] | None = None
        self._metrics: dict[str, float] = {}

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def start(self, pending: PendingSave, *, published: Callable[[], None]) -> None:
        """Write ``pending`` in the background; ``published`` runs (collectively) after its rename."""
        assert self._pending is None, "one checkpoint in flight at a time: wait() first"
        self._pending, self._published = pending, published
        # A daemon: a process that ends mid-write leaves the staging directory, never a half checkpoint.
        self._thread = threading.Thread(target=pending.write, name=f"checkpoint-writer {pending.directory.name}",
                                        daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Collective (only while a checkpoint is in flight, which every rank knows alike): publish it
        when every rank's write is done."""
        if self._pending is None:
            return
        done = torch.tensor([float(not self._thread.is_alive())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self._finish()

    def wait(self) -> None:
        """Collective: the checkpoint in flight written and published (nothing when none is)."""
        if self._pending is not None:
            self._thread.join()
            self._finish()

    def drain_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def _finish(self) -> None:
        pending, published = self._pending, self._published
        self._pending = self._thread = self._published = None
        started = time.perf_counter()
        pending.finish()
        published()
        self._metrics = {"checkpoint/snapshot_s": pending.snapshot_s, "checkpoint/write_s": pending.write_s,
                         "checkpoint/publish_s": time.perf_counter() - started}
