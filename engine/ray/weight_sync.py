"""Actor (Megatron, any TP/PP/EP) -> vLLM engines, before every rollout.

Every actor rank that owns HF tensors (one per pipeline stage, plus expert-parallel owners)
is a sender with its own sync group to all engine workers; the engines read the groups in
turn as one update and verify it is complete. Non-owning ranks iterate the exporter in step
(its TP gathers are collective) and send nothing.
"""
from __future__ import annotations

import ray

from engine.ray.vllm_engine import EngineError
from parallel.weight_transfer import check_reports


class ActorWeightSync:
    def __init__(self, actor_group, engines: list, *, backend: str = "gloo", bucket_bytes: int = 64 << 20,
                 timeout_s: float = 600.0):
        self.actor = actor_group
        self.engines = engines
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        group_ids = actor_group.run(lambda w: w.connect_weight_sync.remote(engines, backend), "weight-sync setup")
        self.group_ids = [g for g in group_ids if g is not None]

    def push(self) -> dict:
        """One complete update of every engine from the actor's current weights."""
        receiving = [engine.receive_weights.remote(self.group_ids) for engine in self.engines]
        sent = self.actor.run(lambda w: w.send_weights.remote(self.bucket_bytes), "weight sync")
        try:
            reports = ray.get(receiving, timeout=self.timeout_s)
        except ray.exceptions.RayError as err:
            raise EngineError(f"an engine failed while receiving weights: {err}") from err
        check_reports(reports)
        stats = [s for s in sent if s]
        return {
            "sync/bytes": float(sum(s["num_bytes"] for s in stats)),
            "sync/send_seconds": max((s["seconds"] for s in stats), default=0.0),
        }
