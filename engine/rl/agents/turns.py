"""Many trajectories' turns on one pool of engines, as batches of whatever is ready.

A trajectory asks for its next turn and awaits it; the turns asked for while the engines are busy
wait and go together as the next batch (split by sampling settings, spread over the engines by
the pool), so a trajectory waiting for its environment never holds up the others' generation,
and the engines see batches rather than single requests. The wait on the engines runs in a thread
(``asyncio.to_thread``): environment steps keep running meanwhile.

One batch is on the engines at a time: the engines behind ``EnginePool`` run one generate call to
completion (vLLM's offline ``LLM``), so a turn asked for mid-batch waits for that batch's end.
"""
from __future__ import annotations

import asyncio
from dataclasses import astuple, replace
from typing import Protocol

from engine.rl.rollout import PendingRollout, RolloutSample, SamplingConfig


class SubmitsGeneration(Protocol):
    def submit_generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> PendingRollout: ...


class PoolTurns:
    """``engine.rl.agents.executor.TurnGenerator`` over a pool (``EnginePool.submit_generate``).

    ``seed``: batch ``k`` samples with ``seed + k * 7919`` (reproducible given the same order of
    turns; greedy sampling is reproducible regardless); None: unseeded, whatever the turns' sampling says."""

    def __init__(self, pool: SubmitsGeneration, *, seed: int | None = None):
        self.pool = pool
        self.seed = seed
        self.queue: list[tuple[list[int], SamplingConfig, asyncio.Future]] = []
        self.batches: list[int] = []  # the size of each batch sent, for the benchmark and tests
        self._drainer: asyncio.Task | None = None

    async def generate(self, token_ids: list[int], sampling: SamplingConfig) -> RolloutSample:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((list(token_ids), sampling, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.queue:
            await asyncio.sleep(0)  # the turns asked for in this same moment join the batch
            batch, self.queue = self.queue, []
            try:
                await self._run(batch)
            except BaseException as err:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                if isinstance(err, asyncio.CancelledError):
                    raise

    async def _run(self, batch: list) -> None:
        by_sampling: dict[tuple, list] = {}
        for item in batch:
            by_sampling.setdefault(astuple(item[1]), []).append(item)
        calls = []
        for items in by_sampling.values():
            seed = None if self.seed is None else self.seed + len(self.batches) * 7919
            sampling = replace(items[0][1], seed=seed)
            calls.append(self.pool.submit_generate([ids for ids, _, _ in items], sampling))
            self.batches.append(len(items))
        results = await asyncio.gather(*(asyncio.to_thread(call.result) for call in calls))
        for items, samples in zip(by_sampling.values(), results):
            if len(samples) != len(items):
                raise RuntimeError(f"the engines returned {len(samples)} samples for {len(items)} turns")
            for (_, _, future), sample in zip(items, samples):
                if not future.done():
                    future.set_result(sample)
