"""A rollout backend on HF transformers' ``generate`` (tests only, not shipped): engines are Ray actors
holding an HF model, joining the actor's weight-sync groups through ``parallel.weight_transfer``
and loading the HF-named tensors by name. Registered as ``--rollout_backend hf_generate`` by the
test that runs the RL loop on it: proof that nothing but ``engine.ray.vllm_engine`` assumes vLLM.
"""
from __future__ import annotations

import time

import ray
import torch

from engine.ray.engine_pool import RayEnginePool
from engine.ray.rollout_backends import RolloutBackend
from engine.rl.rollout import RolloutSample, SamplingConfig


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from pathlib import Path

    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


@ray.remote(num_cpus=0)
class HFEngineActor:
    """One engine: an HF causal LM in fp32, one weight-sync worker."""

    def __init__(self, pretrain: str, engine_index: int):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.engine_index = engine_index
        self.model = AutoModelForCausalLM.from_pretrained(pretrain, dtype=torch.float32).eval()
        self.expected = _checkpoint_shapes(pretrain)
        self.receivers: dict = {}

    def ready(self) -> dict:
        return {"rank": 0, "tp_rank": 0, "tp_size": 1}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # ----- weights --------------------------------------------------------------------------
    def num_weight_sync_workers(self) -> int:
        return 1

    def init_weight_receivers(self, specs: list[dict], rank_offset: int) -> None:
        from parallel.weight_transfer import open_receiver

        for spec in specs:
            self.receivers[spec["group_id"]] = open_receiver(spec, rank=rank_offset, device=torch.device("cpu"))

    def close_weight_receiver(self, group_id: str) -> None:
        self.receivers.pop(group_id, None)

    def receive_weights(self, group_ids: list[str]) -> list[dict]:
        started = time.perf_counter()
        params = dict(self.model.named_parameters())
        received, unexpected, aborted = set(), [], False
        with torch.no_grad():
            for group_id in group_ids:
                receiver = self.receivers[group_id]
                for bucket in receiver.buckets():
                    for name, tensor in bucket:
                        if name in params and name in self.expected:
                            params[name].copy_(tensor)
                            received.add(name)
                        else:
                            unexpected.append(name)
                aborted = aborted or bool(receiver.last_end["aborted"])
        return [{**self.ready(), "num_tensors": len(received), "num_bytes": 0,
                 "missing": sorted(set(self.expected) - received), "unexpected": unexpected, "mismatched": [],
                 "duplicated": [], "aborted": aborted, "errors": [],
                 "load_seconds": time.perf_counter() - started}]

    # ----- generation -----------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 prompt_index_offset: int = 0) -> list[RolloutSample]:
        n = sampling.n_samples_per_prompt
        samples = []
        for i, ids in enumerate(prompt_token_ids):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + (prompt_index_offset + i) * n)
            samples += self._sample(ids, sampling, prompt_index_offset + i)
        return samples

    def _sample(self, ids: list[int], sampling: SamplingConfig, prompt_index: int) -> list[RolloutSample]:
        greedy = sampling.temperature == 0
        stop = list(sampling.stop_token_ids)
        out = self.model.generate(
            torch.tensor([ids]), do_sample=not greedy, num_return_sequences=sampling.n_samples_per_prompt,
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            temperature=None if greedy else sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0, eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0, output_logits=True, return_dict_in_generate=True)
        raw = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [n, steps, vocab], before sampling
        samples = []
        for j, row in enumerate(out.sequences[:, len(ids):].tolist()):
            length = next((k + 1 for k, token in enumerate(row) if token in stop), len(row))
            tokens = row[:length]
            logprobs = raw[j, torch.arange(length), torch.tensor(tokens)].tolist()
            reason = "stop" if tokens and tokens[-1] in stop else "length"
            samples.append(RolloutSample(prompt_index=prompt_index, sample_index=j, response_token_ids=tokens,
                                         logprobs=logprobs, finish_reason=reason))
        return samples

    def sleep(self) -> None:
        pass

    def wake_up(self, tags=None) -> None:
        pass

    def shutdown(self):
        return None


def start(config) -> RayEnginePool:
    engines = [HFEngineActor.remote(config.pretrain, i) for i in range(config.num_engines)]
    pool = RayEnginePool(engines, kind="HF engine")
    ray.get([engine.ready.remote() for engine in engines], timeout=300)
    return pool


BACKEND = RolloutBackend(name="hf_generate", start=start, on_gpus=lambda config: False,
                         loads_own_weights=lambda config: True)
