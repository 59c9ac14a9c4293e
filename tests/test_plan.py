"""The capacity planner (tools/plan): counts from the meta-device build equal a hand count, a
stage's count equals the sum the planner makes of it, the weight maps tile every full-size HF
tensor, and impossible layouts are refused with the reason.

The planner builds models in a fake process group, so each check runs in a fresh process."""
from __future__ import annotations

import json

import pytest

from tests.dist_harness import run_distributed


def _in_process(fn, *args):
    return run_distributed(fn, world_size=1, args=args, timeout=600)[0]


def _padded(vocab: int, tp: int) -> int:
    return -(-vocab // (128 * tp)) * 128 * tp


def llama_hand_count(c: dict, tp: int, pp: int) -> list[int]:
    """Per-rank parameters of each stage of a Llama-style model, from its HF config by hand."""
    h, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d * h // tp
    proj = c["num_attention_heads"] * d * h // tp
    experts = c.get("num_local_experts")
    mlp = 3 * f * h // tp if not experts else 0
    layer = qkv + proj + mlp + 2 * h  # two norms, replicated
    embedding = _padded(c["vocab_size"], tp) // tp * h
    per_stage = c["num_hidden_layers"] // pp
    counts = [per_stage * layer for _ in range(pp)]
    counts[0] += embedding
    counts[-1] += h + embedding  # final norm, output layer (untied: its own shard)
    return counts


def _stage_counts(_rank, _world, name, tp, pp, ep, first=None, last=None):
    from models.registry import get_adapter
    from parallel.config import ParallelConfig
    from tools.plan import meta
    from tools.plan.configs import load_hf_config

    adapter = get_adapter(load_hf_config(name))
    moe = bool(adapter.num_experts)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
                              expert_model_parallel_size=ep, expert_tensor_parallel_size=1 if moe else None)
    stage_layers = parallel.stage_num_layers(adapter.num_layers)
    summed = [(s.dense, s.expert) for s in meta.stage_params(meta.rank_params(adapter, parallel), stage_layers)]
    with meta.fake_world(parallel):
        built = [meta.count_stage_build(meta.build_stage(adapter, parallel, k, meta.meta_build_config()))
                 for k in range(pp)]
    return summed, built


@pytest.mark.parametrize("name,tp,pp,ep", [("llama3-70b", 8, 4, 1), ("qwen2.5-72b", 8, 8, 1),
                                           ("mixtral-8x22b", 4, 4, 8)])
def test_meta_counts_equal_a_hand_count(name, tp, pp, ep):
    from tools.plan.configs import BUILTIN

    c = BUILTIN[name]
    summed, built = _in_process(_stage_counts, name, tp, pp, ep)
    assert summed == built  # the planner's per-stage sums are the real stage builds
    expected = llama_hand_count(c, tp, pp)
    per_stage = c["num_hidden_layers"] // pp
    if name.startswith("qwen"):  # q / k / v biases, split like their rows
        d = c["hidden_size"] // c["num_attention_heads"]
        expected = [n + per_stage * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d // tp
                    for n in expected]
    experts = [0] * pp
    if c.get("num_local_experts"):
        e, h, f = c["num_local_experts"], c["hidden_size"], c["intermediate_size"]
        expected = [n + per_stage * e * h for n in expected]  # the router, replicated
        experts = [per_stage * (e // ep) * 3 * h * f] * pp  # expert TP 1: whole experts
    assert [d for d, _ in built] == expected
    assert [x for _, x in built] == experts
    if name == "llama3-70b":  # the example, spelled out
        assert built[0][0] == 2_271_543_296 and built[1][0] == 2_139_422_720


def _tied_counts(_rank, _world, path):
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from tools.plan import meta

    adapter = load_adapter(path)
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    summed = [s.total for s in meta.stage_params(meta.rank_params(adapter, parallel, bf16=False), [adapter.num_layers // 2] * 2)]
    built = []
    for k in range(2):
        with meta.fake_world(parallel, stage=k):
            built.append(sum(meta.count_stage_build(meta.build_stage(adapter, parallel, k,
                                                                     meta.meta_build_config(bf16=False)))))
    return summed, built


def test_tied_embeddings_are_counted_on_both_ends_of_a_pipeline(tmp_path):
    from models.tiny import build_tiny_model

    path = build_tiny_model("qwen2", tmp_path / "tied", tie_word_embeddings=True)
    summed, built = _in_process(_tied_counts, str(path))
    assert summed == built


def _tiling(_rank, _world, name, tp, pp, ep, first=None, last=None):
    from tools.plan.weight_map_check import check_weight_map

    return check_weight_map(name, tp=tp, pp=pp, ep=ep, first=first, last=last)


@pytest.mark.parametrize("name,tp,pp,ep", [("llama3-70b", 8, 4, 1), ("llama3-70b", 8, 8, 1),
                                           ("mixtral-8x22b", 8, 4, 8), ("qwen2.5-72b", 8, 4, 1)])
def test_weight_maps_tile_every_full_size_hf_tensor(name, tp, pp, ep):
    report = _in_process(_tiling, name, tp, pp, ep)
    assert report["problems"] == []
    assert report["tensors"] == report["hf_tensors"] > 0


def _plan_cli(_rank, _world, argv):
    from tools.plan.cli import parse_args, run

    return run(parse_args(argv))


def test_impossible_layouts_are_refused_with_the_reason():
    base = ["--model", "llama3-70b", "--nodes", "4", "--context_parallel_size", "1", "--recompute_granularity", "full",
            "--json"]
    layers = _in_process(_plan_cli, base + ["--tensor_model_parallel_size", "8", "--pipeline_model_parallel_size", "3"])
    assert not layers["fits"] and "--pipeline_model_parallel_size (3) must divide the number of layers (80)" in \
        layers["reasons"][0]
    kv = _in_process(_plan_cli, base + ["--tensor_model_parallel_size", "16", "--pipeline_model_parallel_size", "2"])
    assert not kv["fits"] and "must divide the number of key/value heads (8)" in kv["reasons"][0]
    memory = _in_process(_plan_cli, base + ["--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "1",
                                            "--nodes", "1"])
    assert not memory["fits"] and "GB per GPU" in memory["reasons"][0]


def test_search_ranks_fitting_layouts_and_json_has_per_stage_bytes():
    out = _in_process(_plan_cli, ["--model", "mixtral-8x7b", "--nodes", "2", "--json", "--top", "3"])
    assert out["tried"] > 10 and 0 < len(out["plans"]) <= 3
    seconds = [p["step_seconds"] for p in out["plans"]]
    assert seconds == sorted(seconds) and all(p["fits"] for p in out["plans"])
    stage = out["plans"][0]["stages"][0]
    assert stage["num_parameters"] > 0 and set(stage["bytes"]) == {"weights", "grads", "optimizer", "activations",
                                                                    "logits"}
    json.dumps(out)


def test_adam_offload_selects_megatrons_cpu_offload_on_gpus_only():
    from megatron.core.optimizer import OptimizerConfig

    from engine.runtime.optimizer import offload_kwargs

    assert offload_kwargs(True, cuda=False, transformer_engine=False) == {}  # host memory already
    assert offload_kwargs(False, cuda=True, transformer_engine=True) == {}
    without_te = offload_kwargs(True, cuda=True, transformer_engine=False)
    assert without_te == {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0,
                          "use_precision_aware_optimizer": False}
    assert offload_kwargs(True, cuda=True, transformer_engine=True)["use_precision_aware_optimizer"]
    config = OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, use_distributed_optimizer=True, **without_te)
    assert config.optimizer_cpu_offload and config.decoupled_weight_decay  # AdamW, as the offload needs


def qwen_hand_count(c: dict, tp: int, pp: int, ep: int) -> list[tuple[int, int]]:
    """Per-rank (dense, expert) parameters of each stage of a Qwen3 / Qwen3-MoE / Qwen2-MoE model, by
    hand from its HF config (expert TP 1: whole experts, E / EP of them per rank)."""
    h, d = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    heads, groups = c["num_attention_heads"], c["num_key_value_heads"]
    qwen3 = c["model_type"] in ("qwen3", "qwen3_moe")
    attention = (heads + 2 * groups) * d * h // tp + heads * d * h // tp + 2 * h  # qkv, proj, two norms
    attention += 2 * d if qwen3 else (heads + 2 * groups) * d // tp  # q/k norms (Qwen3) or q/k/v biases
    experts = c.get("num_experts", 0)
    layers = []
    for layer in range(c["num_hidden_layers"]):
        moe = experts and layer not in c.get("mlp_only_layers", []) and (layer + 1) % c.get("decoder_sparse_step", 1) == 0
        if not moe:
            layers.append((attention + 3 * h * c["intermediate_size"] // tp, 0))
            continue
        shared = c.get("shared_expert_intermediate_size", 0)
        dense = attention + experts * h + (3 * h * shared // tp + h if shared else 0)  # router, gated shared expert
        layers.append((dense, experts // ep * 3 * h * c["moe_intermediate_size"]))
    per_stage = c["num_hidden_layers"] // pp
    stages = [[sum(x) for x in zip(*layers[k * per_stage:(k + 1) * per_stage])] for k in range(pp)]
    embedding = _padded(c["vocab_size"], tp) // tp * h
    stages[0][0] += embedding
    stages[-1][0] += h + embedding  # final norm, untied output layer
    return [tuple(s) for s in stages]


#: Published sizes (Qwen's model cards): total parameters at TP = PP = EP = 1, unpadded vocabulary.
QWEN_TOTALS = {"qwen3-8b": 8_190_735_360, "qwen3-32b": 32_762_123_264, "qwen3-30b-a3b": 30_532_122_624,
               "qwen3-235b-a22b": 235_093_634_560, "qwen2-57b-a14b": 57_408_658_944}


@pytest.mark.parametrize("name,tp,pp,ep", [("qwen3-8b", 1, 1, 1), ("qwen3-32b", 8, 4, 1), ("qwen3-30b-a3b", 2, 4, 8),
                                           ("qwen3-235b-a22b", 4, 2, 32), ("qwen2-57b-a14b", 4, 4, 8)])
def test_qwen_presets_count_as_by_hand(name, tp, pp, ep):
    """The meta build of a sharded layout equals the hand count (the EP=1 builds of 128 experts per layer
    take a minute: the hand count, so checked, gives the published totals, 8.19B ... 57.4B, by itself)."""
    from tools.plan.configs import BUILTIN

    summed, built = _in_process(_stage_counts, name, tp, pp, ep)
    assert summed == built
    assert built == qwen_hand_count(BUILTIN[name], tp, pp, ep)
    assert sum(qwen_hand_count(BUILTIN[name], 1, 1, 1)[0]) == QWEN_TOTALS[name]  # 151936 rows: no padding


@pytest.mark.parametrize("name,tp,pp,ep", [("qwen3-8b", 4, 2, 1), ("qwen3-30b-a3b", 4, 4, 8),
                                           ("qwen2-57b-a14b", 4, 2, 8)])
def test_qwen_weight_maps_tile_every_full_size_hf_tensor(name, tp, pp, ep):
    report = _in_process(_tiling, name, tp, pp, ep)
    assert report["problems"] == []
    assert report["tensors"] == report["hf_tensors"] > 0


def sigmoid_moe_hand_count(c: dict, tp: int, pp: int, ep: int, stage_layers: list[int] | None = None
                           ) -> list[tuple[int, int]]:
    """Per-rank (dense, expert) parameters of each stage of a DeepSeek-V3 (latent attention) or GLM-4.5 (GQA with
    q/k/v biases, optional qk-norm) model, by hand from its HF config: dense layers before
    ``first_k_dense_replace``, then a router (its expert bias is a buffer), shared experts split like a dense
    MLP, and whole routed experts (expert TP 1), E / EP per rank. ``stage_layers``: an uneven split's layers
    per stage (default: even)."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    if c["model_type"] == "deepseek_v3":  # every projection split over TP, the down-projections too
        rope, kv_rank, q_rank = c["qk_rope_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
        qk, v = c["qk_nope_head_dim"] + rope, c["v_head_dim"]
        q = (q_rank * h + heads * qk * q_rank) // tp + q_rank if q_rank else heads * qk * h // tp
        attention = (q + (kv_rank + rope) * h // tp + kv_rank + heads * (qk - rope + v) * kv_rank // tp
                     + h * heads * v // tp)
    else:  # fused qkv with its bias, o_proj, q/k norms of head_dim
        d, groups = c["head_dim"], c["num_key_value_heads"]
        attention = (heads + 2 * groups) * d * (h + 1) // tp + heads * d * h // tp + (2 * d if c["use_qk_norm"] else 0)
    attention += 2 * h  # input and pre-MLP norms
    experts, expert_ffn = c["n_routed_experts"], c["moe_intermediate_size"]
    layers = [(attention + 3 * h * c["intermediate_size"] // tp, 0)] * c["first_k_dense_replace"]
    layers += [(attention + experts * h + 3 * h * expert_ffn * c["n_shared_experts"] // tp,
                experts // ep * 3 * h * expert_ffn)] * (c["num_hidden_layers"] - c["first_k_dense_replace"])
    stage_layers = stage_layers or [c["num_hidden_layers"] // pp] * pp
    starts = [sum(stage_layers[:k]) for k in range(pp)]
    stages = [[sum(x) for x in zip(*layers[start:start + n])] for start, n in zip(starts, stage_layers)]
    embedding = _padded(c["vocab_size"], tp) // tp * h
    stages[0][0] += embedding
    stages[-1][0] += h + embedding
    return [tuple(s) for s in stages]


#: Totals by the hand count at TP = PP = EP = 1 (no vocabulary padding at these sizes), MTP layers left out:
#: the model cards say 671B (DeepSeek-V3, "+14B MTP"), 16B (Moonlight), 355B (GLM-4.5, with its MTP layer)
#: and 106B (GLM-4.5-Air).
SIGMOID_MOE_TOTALS = {"deepseek-v3": 671_026_404_352, "moonlight-16b-a3b": 15_960_108_544,
                      "glm-4.5": 352_797_814_784, "glm-4.5-air": 106_852_245_504}


#: DeepSeek-V3's 61 layers at PP=16: 3 + 14 x 4 + 2 (the three dense layers and the embedding on the first stage,
#: the output layer on a lighter last one).
DEEPSEEK_V3_PP16 = {"first": 3, "last": 2}


@pytest.mark.parametrize("name,tp,pp,ep,split", [("deepseek-v3", 1, 16, 64, DEEPSEEK_V3_PP16),
                                                 ("moonlight-16b-a3b", 2, 3, 8, {}), ("glm-4.5", 4, 4, 32, {}),
                                                 ("glm-4.5-air", 2, 2, 16, {})])
def test_deepseek_and_glm_presets_count_as_by_hand(name, tp, pp, ep, split):
    """DeepSeek-V3 at EP=64 PP=16 TP=1 with the uneven split its 61 layers need."""
    from tools.plan.configs import BUILTIN

    summed, built = _in_process(_stage_counts, name, tp, pp, ep, split.get("first"), split.get("last"))
    assert summed == built
    stage_layers = [split["first"], *[4] * 14, split["last"]] if split else None
    assert built == sigmoid_moe_hand_count(BUILTIN[name], tp, pp, ep, stage_layers)
    assert sum(sigmoid_moe_hand_count(BUILTIN[name], 1, 1, 1)[0]) == SIGMOID_MOE_TOTALS[name]


def test_vllm_kv_cache_of_latent_attention_is_the_latent():
    """vLLM's MLA caches kv_lora_rank + qk_rope_head_dim values per token and layer, on every TP rank; GQA caches
    K and V of the rank's KV heads. Hand counts in bf16 bytes per token at vLLM TP 8: Moonlight 27 layers x (512 +
    64) x 2 = 31,104 (full K and V of its 16 heads, 2 of them per GPU, would be 27 x 2 x (192 + 128) x 2 = 34,560
    per GPU); GLM-4.5-Air 2 (K, V) x 46 layers x 1 KV head x 128 x 2 = 23,552."""
    layout = ["--tensor_model_parallel_size", "1", "--pipeline_model_parallel_size", "1", "--context_parallel_size",
              "1", "--expert_model_parallel_size", "8", "--recompute_granularity", "full"]
    args = ["--job", "grpo", "--nodes", "2", "--json", "--rollout_batch_size", "8", "--n_samples_per_prompt", "4",
            "--vllm_tensor_parallel_size", "8", "--vllm_num_engines", "1", *layout]
    moonlight = _in_process(_plan_cli, ["--model", "moonlight-16b-a3b", *args])["vllm"]
    air = _in_process(_plan_cli, ["--model", "glm-4.5-air", *args])["vllm"]
    assert moonlight["kv_cache_bytes_per_token"] == 27 * (512 + 64) * 2
    assert air["kv_cache_bytes_per_token"] == 2 * 46 * 1 * 128 * 2
    # what the engine's KV budget holds: sequences of --max_len (4096) tokens
    assert moonlight["concurrent_sequences"] == moonlight["kv_cache_per_gpu_bytes"] // (27 * 576 * 2 * 4096)


@pytest.mark.parametrize("name,tp,pp,ep,split", [("deepseek-v3", 2, 16, 64, DEEPSEEK_V3_PP16), ("glm-4.5", 4, 4, 32, {})])
def test_deepseek_and_glm_weight_maps_tile_every_full_size_hf_tensor(name, tp, pp, ep, split):
    """DeepSeek-V3 under an uneven split: every stage's layers map to their global HF layer ids."""
    report = _in_process(_tiling, name, tp, pp, ep, split.get("first"), split.get("last"))
    assert report["problems"] == []
    assert report["tensors"] == report["hf_tensors"] > 0
