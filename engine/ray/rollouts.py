"""The RL loop's rollout engines (``engine.rl.rollout.RolloutEngines``): a pool of engines of any
rollout backend (``engine.ray.engine_pool.EnginePool``) and the actor -> engine weight sync, with
the GPU memory handed between trainers and engines in stages where they share the GPUs.

One rollout under ``--colocate_all_models --vllm_enable_sleep --megatron_enable_sleep`` (the
order of veRL's and OpenRLHF's colocated loops):

    sync_weights   trainers park gradients + optimizer (critic: everything)
                   engines wake their weights; the actor sends; (actor's weights still in place)
    generate       trainers park the rest (the actor's weights)
                   engines wake their KV cache; generate
    release_memory engines sleep; trainers take their state back (score, then train)

``--max_engine_restarts N``: each rollout, before the weight sync, every engine answers a health
call; while generating, each engine's share has a deadline (``--engine_generate_timeout_s``). An
engine that died or missed a deadline is killed by its handle and started anew on its placement,
every sync group is formed again and the actor's current weights are pushed to every engine; the
shares it had not returned are generated again with the same seeds. The N + 1st failure ends the
run naming every cause.
"""
from __future__ import annotations

from engine.ray.config import EngineRestartConfig
from engine.ray.engine_pool import EngineFailure, EnginePool
from engine.ray.engine_restarts import FLAG as RESTARTS_FLAG
from engine.ray.engine_restarts import RestartBudget
from engine.ray.weight_sync import ActorWeightSync
from engine.rl.rollout import RolloutSample, SamplingConfig
from engine.runtime.offload import PARTS

ENGINE_MEMORY = ("weights", "kv_cache")  # what a sleeping engine released, woken in this order


class TrainerSleep:
    """The trainable roles' state in host memory while the engines hold the GPUs
    (``--megatron_enable_sleep``); the bytes moved become ``memory/*`` metrics of the step."""

    def __init__(self, actor, critic=None):
        self.roles = {"actor": actor, **({"critic": critic} if critic is not None else {})}
        self.metrics: dict[str, float] = {}

    def before_sync(self) -> None:
        """Room for the engines' weights; the actor keeps its own until they are sent."""
        for name in self.roles:
            self._park(name, ("grads", "optimizer") if name == "actor" else PARTS)

    def before_generate(self) -> None:
        """Room for the engines' KV cache."""
        for name in self.roles:
            self._park(name, PARTS)

    def after_generate(self) -> None:
        for name, group in self.roles.items():
            self._count(name, "restored", group.restore_training_state())

    def drain_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    def _park(self, name: str, parts: tuple[str, ...]) -> None:
        self._count(name, "parked", self.roles[name].park_training_state(parts))

    def _count(self, name: str, what: str, moved: dict[str, int]) -> None:
        key = f"memory/{name}_{what}_gb"
        self.metrics[key] = self.metrics.get(key, 0.0) + sum(moved.values()) / 2**30


class EngineRollouts:
    def __init__(self, pool: EnginePool, sync: ActorWeightSync, *, sleep: bool = False, synced: bool = True,
                 asleep: bool = False, trainers: TrainerSleep | None = None,
                 restarts: EngineRestartConfig | None = None):
        """``sleep`` (--vllm_enable_sleep): the engines release their GPU memory after each
        generation and take it back in stages (weights for the sync, then the KV cache).
        ``synced=False``: the engines hold no weights yet (started from a Megatron --pretrain with
        dummy weights), so the first generation pushes the actor's weights first. ``asleep``: the
        engines were put to sleep at start-up (--colocate_all_models: before the roles took the
        GPU). ``trainers``: the trainable roles park their state while the engines work.
        ``restarts``: how dead or unresponsive engines are replaced (module docstring)."""
        self.pool = pool
        self.sync = sync
        self.sleep = sleep
        self.trainers = trainers
        self._asleep = set(ENGINE_MEMORY) if asleep else set()
        self._synced = synced
        self.restarts = restarts or EngineRestartConfig()
        self.budget = None
        if self.restarts.max_engine_restarts:
            self._check_restartable()
            self.budget = RestartBudget(self.restarts.max_engine_restarts)
            pool.recovery = self._recover_generation
        pool.generate_timeout_s = self.restarts.engine_generate_timeout_s

    def _check_restartable(self) -> None:
        if not self.pool.can_replace_engines():
            raise ValueError(f"{RESTARTS_FLAG}: this rollout backend's engines cannot be replaced")
        # A new engine is awake and its trainers' memory is not arranged for it: not supported yet.
        if self.sleep or self.trainers is not None:
            raise ValueError(f"{RESTARTS_FLAG} with --vllm_enable_sleep or --megatron_enable_sleep (on by default "
                             "under --colocate_all_models on GPU) is not supported yet: drop one of them")

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 rows: list[dict] | None = None) -> list[RolloutSample]:
        return self.generate_async(prompt_token_ids, sampling, rows=rows).result()

    def generate_async(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                       rows: list[dict] | None = None):
        """``rows`` (the prompts' text and labels) are for rollouts that read them (agents); unused here."""
        self.prepare_generate()
        return self.pool.submit_generate(prompt_token_ids, sampling)

    def prepare_generate(self) -> None:
        """Ready the engines to generate (weights synced, memory awake, trainers parked); then
        ``pool.submit_generate`` as often as needed (the turns of multi-turn rollouts)."""
        if not self._synced:
            self.sync_weights()
        self._wake("weights")  # asleep since start-up, with weights of their own
        if self.trainers is not None:
            self.trainers.before_generate()
        self._wake("kv_cache")

    def release_memory(self) -> None:
        if self.sleep:
            self.pool.sleep()
            self._asleep = set(ENGINE_MEMORY)
        if self.trainers is not None:
            self.trainers.after_generate()

    def probe_layers(self, sequences: list[list[int]]) -> list[dict]:
        """The mismatch doctor's forward on engine 0, with the engines' memory handed over as for a
        generation (woken, the trainers parked) and released after it."""
        self._wake("weights")
        if self.trainers is not None:
            self.trainers.before_generate()
        self._wake("kv_cache")
        try:
            return self.pool.probe_layers(sequences)
        finally:
            self.release_memory()

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.pool.wake_up([tag])
            self._asleep.discard(tag)

    def sync_weights(self) -> dict:
        if self.trainers is not None:
            self.trainers.before_sync()
        self._wake("weights")
        if self.budget is not None:  # once per rollout: a dead engine is replaced before the push
            self._replace([EngineFailure(h.index, h.name, f"is dead ({h.reason})" if h.dead else
                                         f"did not answer the health call ({h.reason})")
                           for h in self.pool.health(timeout_s=self.restarts.health_timeout_s) if not h.alive],
                          when="at the health check before the weight sync")
        metrics = self.sync.push()
        self._synced = True
        if self.budget is not None:
            metrics.update(self.budget.drain_metrics())  # this rollout's restarts, generation's included
        return {**metrics, **(self.trainers.drain_metrics() if self.trainers is not None else {})}

    # ----- --max_engine_restarts ---------------------------------------------------------------
    def _replace(self, failures: list[EngineFailure], *, when: str) -> None:
        """Replace the failed engines (or raise when the restarts are spent) and form every sync
        group anew; the caller pushes the weights."""
        if not failures:
            return
        self.budget.spend(failures, when=when)
        for failure in failures:
            print(f"warning: {failure.describe()} ({when}): replacing it on its placement (restart "
                  f"{self.budget.restarts} of {RESTARTS_FLAG} {self.budget.max_restarts})", flush=True)
            self.pool.replace_engine(failure.index)
        self.sync.reopen()

    def _recover_generation(self, failures: list[EngineFailure]) -> None:
        """The pool's recovery while generating: the engines replaced and given the actor's current
        weights (the ones the others generate with); the pool then generates their shares again."""
        self._replace(failures, when="while generating")
        self.sync.push()
