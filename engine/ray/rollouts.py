"""The RL loop's rollout engines on Ray: vLLM engine actors and the actor -> engine weight sync
(``engine.rl.rollout.RolloutEngines``)."""
from __future__ import annotations

from engine.ray.vllm_engine import generate, sleep_engines, wake_up_engines
from engine.ray.weight_sync import ActorWeightSync
from engine.rl.rollout import RolloutSample, SamplingConfig


class VLLMRollouts:
    def __init__(self, engines: list, sync: ActorWeightSync, *, sleep: bool = False, synced: bool = True,
                 asleep: bool = False):
        """``sleep`` (--vllm_enable_sleep): the engines release their GPU memory after each
        generation and take it back just before the weight sync. ``synced=False``: the engines
        hold no weights yet (started from a Megatron --pretrain with dummy weights), so the first
        generation pushes the actor's weights first. ``asleep``: the engines were put to sleep at
        start-up (--colocate_all_models: before the roles took the GPU)."""
        self.engines = engines
        self.sync = sync
        self.sleep = sleep
        self._asleep = asleep
        self._synced = synced

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[RolloutSample]:
        if not self._synced:
            self.sync_weights()
        self._wake()  # asleep since start-up, with weights of their own
        return generate(self.engines, prompt_token_ids, sampling)

    def release_memory(self) -> None:
        if self.sleep:
            sleep_engines(self.engines)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            wake_up_engines(self.engines)
            self._asleep = False

    def sync_weights(self) -> dict:
        self._wake()
        metrics = self.sync.push()
        self._synced = True
        return metrics
