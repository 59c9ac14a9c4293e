"""What the RL loop and the weight sync need of a pool of rollout engines, and its implementation
over Ray engine actors.

``EnginePool`` is the one interface the loop (``engine.ray.rollouts.EngineRollouts``) and the
weight sync (``engine.ray.weight_sync``) talk to: generate (token ids in, token ids + log-probs
out), sleep / wake, the weight-receiver protocol, health, shutdown. A rollout backend
(``engine.ray.rollout_backends``) starts one.

``RayEnginePool`` is that interface over a list of Ray actor handles whose class offers the
engine-actor methods below (``engine.ray.vllm_engine.LLMEngineActor`` is one): every backend whose
engines are Ray actors gets generation over many engines, deadlines, health checks and errors
naming the engine from here, and writes only its actor class.

Engine-actor methods (called as ``handle.method.remote(...)``)::

    generate(prompt_token_ids, sampling, prompt_index_offset) -> list[RolloutSample]
    sleep(); wake_up(tags)                       # release / take back accelerator memory
    num_weight_sync_workers() -> int             # sync ranks (one per TP worker)
    init_weight_receivers(specs, rank_offset)    # join each sender's group, in the order given
    receive_weights(group_ids) -> list[dict]     # one update; a report per worker
    close_weight_receiver(group_id)
    ready() -> object                            # returns once the engine is up (the health ping)
    probe_layers(sequences) -> list[dict]        # optional: per-layer records (the mismatch doctor)
    node_id() -> str                             # the Ray node it runs on
    shutdown() -> placement group | None         # stop the engine's own processes

A pool built with ``start_engine`` (the backend's way to start engine ``i`` on its placement) can
``replace_engine``; with a ``recovery`` set (``--max_engine_restarts``, by
``engine.ray.rollouts.EngineRollouts``), a generation whose engine died or missed its deadline
hands the failures to it and generates that engine's share again on the replacement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar

from engine.ray.calls import get_each, root_cause, split_evenly, wait_all
from engine.rl.rollout import RolloutSample, SamplingConfig

T = TypeVar("T")


class EngineError(RuntimeError):
    """An engine failed, died or timed out (the message names the engine)."""


class EngineStartupError(EngineError):
    """An engine could not start (the message names the engine and the flags involved)."""


class WeightSyncError(EngineError):
    """A weight update did not complete on every engine worker (names the engines or tensors at fault)."""


@dataclass(frozen=True)
class EngineFailure:
    """An engine that died or did not answer in time: a replacement on its placement cures it.
    (An engine that raised while alive is not one: the same request would fail again.)"""

    index: int
    name: str  # e.g. "vLLM engine 1"
    reason: str  # e.g. "died during generate: ..." or "did not finish generate within 3600 s"
    requests: int = 0  # the requests (prompts) it had not returned, generated again on its replacement

    def describe(self) -> str:
        return f"{self.name} {self.reason}"


class Pending(Protocol[T]):
    def result(self) -> T:
        """Wait for the outcome (raises naming the engine that failed)."""


@dataclass(frozen=True)
class EngineHealth:
    index: int
    name: str  # e.g. "vLLM engine 1"
    alive: bool  # answered the ping
    dead: bool = False  # its actor is gone (an engine that only did not answer in time may be busy)
    reason: str = ""  # why it is not alive (its death cause, or a ping that timed out)


class EnginePool(Protocol):
    """A started pool of rollout engines."""

    num_engines: int
    generate_timeout_s: float  # the deadline of one engine's share of a generation
    # Called with the engines that died or missed the deadline while generating; returns once they
    # are replaced and hold the current weights (raises when they cannot be). None: such a failure
    # raises naming the engine.
    recovery: Callable[[list[EngineFailure]], None] | None

    def engine_name(self, index: int) -> str: ...

    def submit_generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> Pending[list[RolloutSample]]:
        """Spread the prompts over the engines and start generating; returns at once. The result is
        every sample, ordered by (prompt, sample), independent of the number of engines when
        ``sampling.seed`` is set."""

    def sleep(self) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...

    def weight_sync_worker_counts(self) -> list[int]:
        """How many receiving ranks each engine has in a weight-sync group."""

    def join_weight_groups(self, specs: list[dict], worker_counts: list[int]) -> Pending[None]:
        """Every engine joins every group of ``specs`` in that order (engine e's worker w as rank
        ``1 + sum(worker_counts[:e]) + w``); returns at once: the senders connect meanwhile."""

    def receive_weights(self, group_ids: list[str]) -> Pending[list[list[dict]]]:
        """Start one update from the groups, in order; the result is each engine's worker reports."""

    def close_weight_receiver(self, group_id: str, *, timeout_s: float) -> None: ...

    def health(self, *, timeout_s: float = 10.0) -> list[EngineHealth]: ...

    def can_replace_engines(self) -> bool: ...

    def replace_engine(self, index: int) -> None:
        """Kill engine ``index`` by its handle and start a new one on its placement (it holds the
        start-up weights and is in no weight-sync group yet)."""

    def probe_layers(self, sequences: list[list[int]], *, engine_index: int = 0) -> list[dict]:
        """Per token sequence, one engine's per-layer hidden states, router logits and log-probs (the
        mismatch doctor, ``engine.ray.doctor``); an engine that cannot raises ``EngineError``."""

    def node_ids(self) -> list[str]:
        """The Ray node (or host) of each engine."""

    def explain(self, err: Exception, *, what: str) -> Exception:
        """``err`` with every dead engine of the pool named (``err`` itself when none is dead)."""

    def shutdown(self, *, graceful: bool = True) -> None: ...


# ---------------------------------------------------------------------------------------------
# Over Ray actors.


class RayCalls(Generic[T]):
    """Calls running on some engines of a pool; ``result`` waits with one deadline, and a failure
    names the engine (and every other engine of the pool that is dead by then)."""

    def __init__(self, pool: RayEnginePool, refs: list, indices: list[int], *, what: str, timeout_s: float,
                 error: type[EngineError] = EngineError):
        self.pool, self.refs, self.indices = pool, refs, indices
        self.what, self.timeout_s, self.error = what, timeout_s, error

    def per_engine(self) -> list:
        names = [self.pool.engine_name(i) for i in self.indices]
        try:
            return get_each(self.refs, names=names, timeout_s=self.timeout_s, what=self.what, error=self.error)
        except EngineError as err:
            raise self.pool.explain(err, what=self.what) from err.__cause__

    def result(self):
        return self.per_engine()


class PendingGeneration:
    """One generation spread over the engines (``shares``: engine -> its ``[start, stop)`` prompts).
    ``result`` waits for every share under the pool's deadline; with a ``recovery`` on the pool, the
    shares of engines that died or missed the deadline are generated again on their replacements with
    the same prompt offsets, so every request keeps its seed and the samples are the ones the failed
    engine would have returned."""

    def __init__(self, pool: RayEnginePool, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 shares: dict[int, tuple[int, int]]):
        self.pool, self.prompt_token_ids, self.sampling = pool, prompt_token_ids, sampling
        self.shares = shares
        self.sent_to: dict[int, object] = {}  # the handle each share went to
        self.refs = {index: self._submit(index) for index in shares}

    def _submit(self, index: int):
        start, stop = self.shares[index]
        self.sent_to[index] = self.pool.handles[index]
        return self.sent_to[index].generate.remote(self.prompt_token_ids[start:stop], self.sampling, start)

    def result(self) -> list[RolloutSample]:
        if self.pool.recovery is None:  # the first failure ends the run, named
            chunks = RayCalls(self.pool, list(self.refs.values()), list(self.refs), what="generate",
                              timeout_s=self.pool.generate_timeout_s).per_engine()
        else:
            chunks = self._with_recovery()
        samples = [sample for chunk in chunks for sample in chunk]
        return sorted(samples, key=lambda s: (s.prompt_index, s.sample_index))

    def _with_recovery(self) -> list[list[RolloutSample]]:
        done: dict[int, list[RolloutSample]] = {}
        while len(done) < len(self.shares):
            failures = self._wait(done)
            # A generation running beside this one (the turns of multi-turn rollouts) may have had
            # the engine replaced already.
            replace = [f for f in failures if self.pool.handles[f.index] is self.sent_to[f.index]]
            if replace:
                self.pool.recovery(replace)  # replaced, with the current weights (or it raises)
            for failure in failures:
                self.refs[failure.index] = self._submit(failure.index)
        return [done[index] for index in self.shares]

    def _size(self, index: int) -> int:
        start, stop = self.shares[index]
        return stop - start

    def _wait(self, done: dict) -> list[EngineFailure]:
        """Wait for the shares not done: collect the finished, return the engines to replace."""
        waiting = [index for index in self.shares if index not in done]
        timeout_s = self.pool.generate_timeout_s
        failures = []
        for index, (status, value) in zip(waiting, wait_all([self.refs[i] for i in waiting], timeout_s=timeout_s)):
            name = self.pool.engine_name(index)
            if status == "ok":
                done[index] = value
            elif status == "dead":
                failures.append(EngineFailure(index, name, f"died during generate: {_death_cause(value)}",
                                              requests=self._size(index)))
            elif status == "timeout":
                failures.append(EngineFailure(index, name, f"did not finish generate within {timeout_s:.0f} s",
                                              requests=self._size(index)))
            else:  # alive and raising: the same request would fail again
                raise EngineError(f"{name} failed during generate: {root_cause(value)}") from value
        return failures


class RayEnginePool:
    """``EnginePool`` over Ray engine actors (the methods listed in this module's docstring)."""

    def __init__(self, handles: list, *, kind: str = "engine", generate_timeout_s: float = 3600.0,
                 call_timeout_s: float = 600.0, start_engine: Callable[[int], object] | None = None):
        """``start_engine(i)``: a new, started engine ``i`` on engine ``i``'s placement (None: engines
        cannot be replaced)."""
        self.handles = list(handles)
        self.kind = kind
        self.generate_timeout_s, self.call_timeout_s = generate_timeout_s, call_timeout_s
        self.start_engine = start_engine
        self.recovery: Callable[[list[EngineFailure]], None] | None = None

    @property
    def num_engines(self) -> int:
        return len(self.handles)

    def engine_name(self, index: int) -> str:
        return f"{self.kind} {index}"

    def _calls(self, refs: list, what: str, *, indices: list[int] | None = None, timeout_s: float | None = None,
               error: type[EngineError] = EngineError) -> RayCalls:
        return RayCalls(self, refs, indices if indices is not None else list(range(len(refs))), what=what,
                        timeout_s=self.call_timeout_s if timeout_s is None else timeout_s, error=error)

    # ----- generation ---------------------------------------------------------------------
    def submit_generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> PendingGeneration:
        ranges = split_evenly(len(prompt_token_ids), self.num_engines)
        shares = {i: (start, stop) for i, (start, stop) in enumerate(ranges) if stop > start}
        return PendingGeneration(self, prompt_token_ids, sampling, shares)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[RolloutSample]:
        return self.submit_generate(prompt_token_ids, sampling).result()

    def sleep(self) -> None:
        self._calls([h.sleep.remote() for h in self.handles], "sleep").result()

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._calls([h.wake_up.remote(tags) for h in self.handles], "wake-up").result()

    # ----- the weight-receiver protocol ---------------------------------------------------
    def weight_sync_worker_counts(self, *, timeout_s: float | None = None) -> list[int]:
        return self._calls([h.num_weight_sync_workers.remote() for h in self.handles], "group setup",
                           timeout_s=timeout_s, error=WeightSyncError).result()

    def join_weight_groups(self, specs: list[dict], worker_counts: list[int], *,
                           timeout_s: float | None = None) -> RayCalls:
        """One ordered call per engine. One list for all engines is what keeps several senders (one
        per pipeline stage or expert owner) from deadlocking: an engine joins one group at a time,
        and Ray orders an engine's calls by arrival only, so groups requested by each sender on its
        own could reach engine 0 as (A, B) and engine 1 as (B, A), each then waiting in a group the
        other never enters."""
        refs, offset = [], 1
        for handle, count in zip(self.handles, worker_counts):
            refs.append(handle.init_weight_receivers.remote(specs, offset))
            offset += count
        return self._calls(refs, "group setup", timeout_s=timeout_s, error=WeightSyncError)

    def receive_weights(self, group_ids: list[str], *, timeout_s: float | None = None) -> RayCalls:
        return self._calls([h.receive_weights.remote(group_ids) for h in self.handles], "receiving weights",
                           timeout_s=timeout_s, error=WeightSyncError)

    def close_weight_receiver(self, group_id: str, *, timeout_s: float = 60.0) -> None:
        import ray

        refs = [h.close_weight_receiver.remote(group_id) for h in self.handles]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)

    # ----- the mismatch doctor -------------------------------------------------------------
    def probe_layers(self, sequences: list[list[int]], *, engine_index: int = 0) -> list[dict]:
        """Per sequence, one engine's per-layer records (``engine.ray.doctor``)."""
        handle = self.handles[engine_index]
        if not hasattr(handle, "probe_layers"):
            raise EngineError(f"{self.engine_name(engine_index)} cannot report its layers (no probe_layers): "
                              "the mismatch doctor (--doctor_every) needs vLLM engines")
        return self._calls([handle.probe_layers.remote(sequences)], "layer probe", indices=[engine_index]).result()[0]

    # ----- health -------------------------------------------------------------------------
    def health(self, *, timeout_s: float = 10.0) -> list[EngineHealth]:
        """Ping every engine at once; an engine that does not answer within ``timeout_s`` (a busy
        one included) or whose actor is dead is reported with the reason."""
        import ray

        refs = [h.ready.remote() for h in self.handles]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0)
                out.append(EngineHealth(i, self.engine_name(i), True))
            except ray.exceptions.GetTimeoutError:
                out.append(EngineHealth(i, self.engine_name(i), False, reason=f"no answer within {timeout_s:.0f} s"))
            except ray.exceptions.RayError as err:
                out.append(EngineHealth(i, self.engine_name(i), False, dead=True, reason=_death_cause(err)))
        return out

    def can_replace_engines(self) -> bool:
        return self.start_engine is not None

    def replace_engine(self, index: int) -> None:
        import ray

        if self.start_engine is None:
            raise EngineError(f"{self.engine_name(index)} cannot be replaced: this pool has no way to start engines")
        ray.kill(self.handles[index], no_restart=True)  # dead already, or hung: it must not come back
        self.handles[index] = self.start_engine(index)

    def node_ids(self) -> list[str]:
        return self._calls([h.node_id.remote() for h in self.handles], "node lookup").result()

    def dead_engines(self, *, timeout_s: float = 10.0) -> list[EngineHealth]:
        """The engines whose actor died (a slow engine is not dead)."""
        return [h for h in self.health(timeout_s=timeout_s) if h.dead]

    def explain(self, err: Exception, *, what: str) -> Exception:
        """``err`` with the pool's dead engines named: a failure in one place (a sender's closed
        connection, one engine's call) is often caused by an engine that died elsewhere."""
        dead = self.dead_engines(timeout_s=2.0)  # a dead actor answers at once; a busy one is not dead
        if not dead:
            return err
        when = time.strftime("%H:%M:%S %Z")
        names = "; ".join(f"{h.name} is dead ({h.reason})" for h in dead)
        cls = type(err) if isinstance(err, EngineError) else EngineError
        return cls(f"{names}: found dead at {when}, when {what} failed: {err}")

    def shutdown(self, *, graceful: bool = True, timeout_s: float = 60.0) -> list:
        """Stop the engines' own processes, then the actors; returns what their ``shutdown`` handed
        back (placement groups for the backend to release)."""
        import ray

        returned = []
        if graceful:
            refs = [h.shutdown.remote() for h in self.handles]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for ref in done:
                try:
                    returned.append(ray.get(ref))
                except ray.exceptions.RayError:
                    pass  # a dead engine has nothing left to stop; ray.kill below is enough
        for handle in self.handles:
            ray.kill(handle)
        return [r for r in returned if r is not None]


def _death_cause(err: Exception) -> str:
    """Ray's one-line reason an actor died, without its id / pid / namespace lines."""
    text = root_cause(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    because = [line for line in lines if "is dead because" in line or "died" in line]
    return (because or lines or [type(err).__name__])[-1]


def as_pool(engines) -> EnginePool:
    """An ``EnginePool`` as it is; a list of Ray engine-actor handles as a ``RayEnginePool``."""
    return engines if hasattr(engines, "submit_generate") else RayEnginePool(list(engines))
