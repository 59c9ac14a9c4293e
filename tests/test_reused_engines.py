"""The session's shared vLLM engines (tests/reused_engines.py) are indistinguishable from fresh ones:
a reused engine samples what a fresh one samples, seeded or not, after a run changed its weights;
an engine that died is not handed out; two RL runs in a row on one engine actor give equal metrics.
"""
from __future__ import annotations

import pytest

from tests.rl_harness import ppo_args


@pytest.fixture(scope="module")
def cache(reuse_vllm_engines):
    if reuse_vllm_engines is None:
        pytest.skip("TESTS_FRESH_ENGINES=1: every run starts its own engines")
    return reuse_vllm_engines


def _actor_ids(handles) -> list[str]:
    return [h._actor_id.hex() for h in handles]


def _idle_entry(cache, config):
    return next(e for e in cache.idle if e.config == config)


def test_a_reused_engine_samples_what_a_fresh_one_does_and_a_dead_one_is_replaced(cache, rl_setup, ray_cluster):
    """A run samples (seeded and unseeded: the unseeded draw from the workers' global generators,
    which every sampling step moves) and leaves other weights in the engine; the engine handed to
    the next run of the config is the same actor with the start-up weights and generators back:
    the same samples. Killed while idle, it is replaced by a new engine, never handed out."""
    import ray
    from transformers import AutoTokenizer

    from engine.ray.vllm_engine import SamplingConfig, VLLMEngineConfig
    from engine.ray.weight_sync import sync_weights
    from tests.reused_engines import BACKEND, _checkpoint_tensors

    config = VLLMEngineConfig(pretrain=rl_setup["model"], dtype="float32", enforce_eager=True, max_model_len=32,
                              seed=5)
    tokenizer = AutoTokenizer.from_pretrained(rl_setup["model"])
    prompts = [tokenizer(text)["input_ids"] for text in ("3+4=", "12+30=", "7+9=")]
    draws = {"seeded": SamplingConfig(n_samples_per_prompt=4, max_new_tokens=6, seed=3),
             "unseeded": SamplingConfig(n_samples_per_prompt=4, max_new_tokens=6)}

    def sample(pool) -> dict:
        return {name: [(s.response_token_ids, s.logprobs) for s in pool.generate(prompts, sampling)]
                for name, sampling in draws.items()}

    started, reused = cache.started, cache.reused
    pool = BACKEND.start(config)
    fresh = sample(pool)
    first_ids = _actor_ids(pool.handles)
    changed = {name: tensor * 1.5 for name, tensor in _checkpoint_tensors(rl_setup["model"])}
    sync_weights(pool, iter(changed.items()), backend="gloo")  # what a run leaves behind: trained weights
    assert sample(pool)["seeded"] != fresh["seeded"]
    pool.shutdown()

    pool = BACKEND.start(config)
    assert (cache.started, cache.reused) == (started + 1, reused + 1)
    assert _actor_ids(pool.handles) == first_ids
    assert sample(pool) == fresh
    pool.shutdown()

    ray.kill(_idle_entry(cache, config).handles[0])
    pool = BACKEND.start(config)
    assert (cache.started, cache.reused) == (started + 2, reused + 1)
    assert _actor_ids(pool.handles) != first_ids
    assert sample(pool) == fresh
    pool.shutdown()


def _same_run(history: list[dict]) -> list[dict]:
    """The metrics a run's samples and updates decide (no timings)."""
    return [{k: v for k, v in h.items() if not k.startswith("time/") and "seconds" not in k} for h in history]


def test_two_runs_in_a_row_share_one_engine_and_equal_each_other(cache, rl_setup, ray_cluster):
    """The second of two identical GRPO runs gets the first one's engine actor (its weights trained by
    the first run, its generators moved) and reproduces the first run bit for bit."""
    from engine.cli import train_ppo_ray

    args = ("--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "2", "--seed", "11")
    started, reused = cache.started, cache.reused
    first = train_ppo_ray.main(ppo_args(rl_setup, *args))
    (entry,) = [e for e in cache.idle if e.config.seed == 11]
    ids = _actor_ids(entry.handles)
    second = train_ppo_ray.main(ppo_args(rl_setup, *args))
    assert (cache.started, cache.reused) == (started + 1, reused + 1)
    assert _actor_ids(_idle_entry(cache, entry.config).handles) == ids and entry.runs == 2
    assert _same_run(second) == _same_run(first)
    assert first[0]["reward"] != first[1]["reward"] or first[0]["actor/policy_loss"] != first[1]["actor/policy_loss"]
