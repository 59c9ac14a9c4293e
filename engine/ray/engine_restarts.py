"""The bookkeeping of ``--max_engine_restarts``: which engines failed in a way a replacement cures,
how many restarts the run has left, and what was generated again (the ``engine/*`` metrics).

No Ray here: the pool (``engine.ray.engine_pool``) classifies each engine's outcome and generates
the unfinished shares again; the rollouts (``engine.ray.rollouts.EngineRollouts``) spend this budget,
replace the engines and push the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.ray.engine_pool import EngineError, EngineFailure

FLAG = "--max_engine_restarts"


@dataclass
class RestartBudget:
    """At most ``max_restarts`` engine replacements in the run; the next failure ends it, naming the
    cause and the restarts spent."""

    max_restarts: int
    restarts: int = 0
    history: list[str] = field(default_factory=list)  # each restart's cause, in order
    _rollout: dict[str, float] = field(default_factory=lambda: {"engine/restarts": 0.0, "engine/requests_retried": 0.0})

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"{FLAG} must be >= 0, got {self.max_restarts}")

    def spend(self, failures: list[EngineFailure], *, when: str) -> None:
        """Take one restart per failed engine, or raise ``EngineError`` naming the failures when the
        budget does not cover them all (nothing is spent then)."""
        if not failures:
            return
        causes = "; ".join(f.describe() for f in failures)
        if self.restarts + len(failures) > self.max_restarts:
            spent = (f"{self.restarts} restart(s) already: " + "; ".join(self.history)) if self.history else \
                "no restart allowed"
            raise EngineError(f"{causes} ({when}); {FLAG} {self.max_restarts} does not cover "
                              f"{len(failures)} more ({spent})")
        self.restarts += len(failures)
        self.history += [f"{f.describe()} ({when})" for f in failures]
        self._rollout["engine/restarts"] += len(failures)
        self._rollout["engine/requests_retried"] += sum(f.requests for f in failures)

    def drain_metrics(self) -> dict[str, float]:
        """This rollout's counts (restarts, requests generated again), then zero for the next."""
        metrics = dict(self._rollout)
        self._rollout = {key: 0.0 for key in metrics}
        return metrics

