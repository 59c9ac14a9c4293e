"""Token-budget micro-batches (``--use_dynamic_batch_size --max_tokens_per_gpu N``, issue 31).

The plan (``engine.data.token_budget``) keeps every micro-batch within N tokens and gives every DP
rank the same number of micro-batches; the RL roles score and train on it with the fixed
micro-batches' log-probs, values, rewards, loss and weights, at DP=2 with responses spread 1:20.
"""
from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed

RESPONSES = [2, 40, 5, 30, 3, 20, 10, 38]  # response lengths, spread 1:20
PROMPT = 3
MAX_TOKENS = 48


def test_the_plan_fits_the_budget_and_matches_the_ranks():
    from engine.data.token_budget import balanced_microbatches

    lengths = [PROMPT + n for n in RESPONSES] * 3
    for ranks in (1, 2, 4):
        plan = balanced_microbatches(lengths, max_tokens=MAX_TOKENS, num_ranks=ranks)
        assert len({len(micro) for micro in plan}) == 1  # as many micro-batches on every rank
        assert sorted(i for micro in plan for group in micro for i in group) == list(range(len(lengths)))
        assert all(0 < sum(lengths[i] for i in group) <= MAX_TOKENS for micro in plan for group in micro)
        # balanced by tokens: no rank more than one longest sample above another
        per_rank = [sum(lengths[i] for group in micro for i in group) for micro in plan]
        assert max(per_rank) - min(per_rank) <= max(lengths)
    # Forward only: a rank may get fewer (here none) micro-batches.
    assert balanced_microbatches([5], max_tokens=8, num_ranks=2, equal_counts=False) == [[[0]], []]


def test_a_sample_over_the_budget_is_an_error_naming_both():
    from engine.data.token_budget import TokenBudgetConfig, balanced_microbatches, check_fits

    with pytest.raises(ValueError, match=r"sample 1 has 43 tokens, more than --max_tokens_per_gpu 40"):
        balanced_microbatches([5, 43, 7], max_tokens=40, num_ranks=1)
    with pytest.raises(ValueError, match=r"training sample 17 has 9 tokens, more than --max_tokens_per_gpu 8"):
        check_fits([3, 9], 8, what="training sample", indices=[4, 17])
    with pytest.raises(ValueError, match="more micro-batches than samples"):
        balanced_microbatches([8, 8, 8], max_tokens=8, num_ranks=2)
    with pytest.raises(ValueError, match="--use_dynamic_batch_size needs --max_tokens_per_gpu"):
        TokenBudgetConfig(use_dynamic_batch_size=True)
    with pytest.raises(ValueError, match="--max_tokens_per_gpu applies with --use_dynamic_batch_size"):
        TokenBudgetConfig(max_tokens_per_gpu=8)


def _rollout():
    import torch

    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (PROMPT,), generator=g).tolist() for _ in RESPONSES]
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() for n in RESPONSES]
    experience = Experience.from_rollout(build_rollout_batch(prompts, responses, pad_id=0))
    mask = experience.action_mask
    return experience.with_fields(advantages=torch.randn(mask.shape, generator=g) * mask)


def _fixed_and_budget(rank, world, path, agg_mode):

    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.rl.train_losses import TrainSettings
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    optim = OptimConfig(learning_rate=1e-3, lr_warmup_ratio=0.0)

    def worker(value_head: bool, ctx=None):
        config = EngineConfig(pretrain=path, parallel=ParallelConfig(), optim=optim,
                              build=ModelBuildConfig(value_head=value_head))
        out = MegatronRoleWorker(RoleConfig(name="critic" if value_head else "actor", engine=config, num_ranks=world,
                                            trainable=True), rank)
        out.engine = TrainingEngine(config, ctx=ctx)
        return out

    fixed = worker(False)
    ctx = fixed.engine.ctx
    budget, critic = worker(False, ctx), worker(True, ctx)
    experience = _rollout()
    scores = {}
    for max_tokens in (None, MAX_TOKENS):
        scores[max_tokens] = [fixed.compute_log_probs(experience, 2, packed=True, max_tokens=max_tokens),
                              critic.compute_values(experience, 2, packed=True, max_tokens=max_tokens),
                              critic.compute_rewards(experience, 2, packed=True, max_tokens=max_tokens)]
    base = dict(train_batch_size=8, micro_train_batch_size=2, max_epochs=1, seed=0, packing_samples=True,
                loss_agg_mode=agg_mode, max_response_len=40)
    settings = {None: TrainSettings(**base), MAX_TOKENS: TrainSettings(**base, max_tokens_per_gpu=MAX_TOKENS)}
    micro_tokens = [int(b["attention_mask"].sum()) for b in budget.step_microbatches(experience, settings[MAX_TOKENS])]
    results = [fixed.train(experience, "policy", settings[None]), budget.train(experience, "policy", settings[MAX_TOKENS])]
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(fixed.engine.model.parameters(),
                                                                   budget.engine.model.parameters()))
    initial = TrainingEngine(fixed.engine.config, trainable=False, ctx=ctx)
    moved = max(float((a - b).abs().max()) for a, b in zip(fixed.engine.model.parameters(), initial.model.parameters()))
    return {"scores": scores, "micro_tokens": micro_tokens, "results": results, "weight_diff": weight_diff,
            "moved": moved, "mask": experience.action_mask}


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_budget_batches_score_and_train_as_the_fixed_ones_at_dp2(tiny_models, agg_mode):
    results = run_distributed(_fixed_and_budget, world_size=2, args=(tiny_models["llama"], agg_mode), timeout=400)
    lengths = [PROMPT + n for n in RESPONSES]
    # Every micro-batch within the budget, as many on both ranks, every sample trained once.
    counts = [len(r["micro_tokens"]) for r in results]
    assert counts[0] == counts[1] and all(t <= MAX_TOKENS for r in results for t in r["micro_tokens"])
    assert sum(t for r in results for t in r["micro_tokens"]) == sum(lengths)
    # The budget's scores equal the fixed micro-batches' (both ranks' shares assembled by rows).
    import torch

    mask = results[0]["mask"]
    for max_tokens in (None, MAX_TOKENS):
        assembled = []
        for kind in range(3):
            shards = [r["scores"][max_tokens][kind] for r in results]
            out = torch.zeros((len(RESPONSES), *shards[0].values.shape[1:]))
            for shard in shards:
                out[shard.row_indices()] = shard.values
            assembled.append(out)
        results[0].setdefault("assembled", {})[max_tokens] = assembled
    for kind, (a, b) in enumerate(zip(*results[0]["assembled"].values())):
        weight = mask if a.dim() == 2 else 1
        assert float(((a - b) * weight).abs().max()) < 2e-5, kind
    for r in results:
        fixed, budget = r["results"]
        assert r["moved"] > 1e-4 and r["weight_diff"] < 0.05 * r["moved"], (r["weight_diff"], r["moved"])
        assert budget["policy_loss"] == pytest.approx(fixed["policy_loss"], rel=1e-4, abs=1e-6)
        assert budget["num_tokens"] == fixed["num_tokens"]
