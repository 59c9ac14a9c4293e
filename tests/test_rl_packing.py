"""``--packing_samples`` in the RL loop (issue 18): scoring and training micro-batches packed into
one row give the padded run's log-probs, values, rewards, losses and weights, under TP=2 with
sequence parallel, PP=2 and CP=2."""
from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed


def test_packing_a_padded_micro_batch_round_trips():
    import torch

    from engine.data.packing import pack_padded_rows, unpack_to_rows

    lengths, width = [5, 2, 7], 8
    ids = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(1, n + 1) + 10 * row
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(width).expand(3, width),
             "attention_mask": (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long(),
             "values": ids.float()}
    packed = pack_padded_rows(batch, multiple=4)
    assert packed["cu_seqlens"].tolist() == [0, 5, 7, 14]
    assert packed["input_ids"].shape == (1, 16)  # 14 real tokens, padded to a multiple of 4 after the last
    assert packed["position_ids"][0, :14].tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, 6]
    assert packed["attention_mask"][0].tolist() == [1] * 14 + [0, 0]
    assert torch.equal(unpack_to_rows(packed["values"], packed["cu_seqlens"], width), batch["values"])
    # the packed labels are each row's own (a sample's last label never is the next sample's token)
    assert packed["labels"][0, 4].item() == batch["labels"][0, 4].item()


def _rollout(seed: int, rows: int):
    """Rows of different prompt and response lengths, right-padded, with advantages and weights."""
    import torch

    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    responses = [torch.randint(3, 300, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(rows)]
    batch = build_rollout_batch(prompts, responses, pad_id=0)
    experience = Experience.from_rollout(batch)
    mask = experience.action_mask
    return experience.with_fields(advantages=torch.randn(mask.shape, generator=g) * mask,
                                  rollout_log_probs=-(0.5 + 5 * torch.rand(mask.shape, generator=g)) * mask)


def _scores_and_step_both_ways(rank, world, path, grid):
    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.rl.ptx import collate_ptx
    from engine.rl.train_losses import TrainSettings
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    parallel = ParallelConfig(**grid)
    optim = OptimConfig(learning_rate=1e-3, lr_warmup_ratio=0.0)

    def worker(value_head: bool, ctx=None):
        config = EngineConfig(pretrain=path, parallel=parallel, optim=optim, build=ModelBuildConfig(value_head=value_head))
        out = MegatronRoleWorker(RoleConfig(name="critic" if value_head else "actor", engine=config, num_ranks=world,
                                            trainable=True), rank)
        out.engine = TrainingEngine(config, ctx=ctx)
        return out

    padded_actor = worker(False)
    ctx = padded_actor.engine.ctx
    packed_actor, critic = worker(False, ctx), worker(True, ctx)
    experience = _rollout(0, rows=8)
    scores = {}
    for packed in (False, True):
        scores[packed] = [padded_actor.compute_log_probs(experience, 3, temperature=0.9, packed=packed),
                          critic.compute_values(experience, 3, packed=packed),
                          critic.compute_rewards(experience, 3, packed=packed)]
    score_diffs = None
    if scores[False][0] is not None:  # the share head
        mask = experience.action_mask
        score_diffs = [float(((a.values - b.values) * (mask if a.values.dim() == 2 else 1)).abs().max())
                       for a, b in zip(scores[False], scores[True])]
        assert float(scores[False][0].values.abs().sum()) > 0
    ptx_rows = collate_ptx([{"input_ids": list(range(5, 5 + n)), "loss_mask": [1] * n} for n in (4, 9, 3, 6, 7, 2, 5, 8)],
                           pad_id=0)
    results = []
    for actor, packed in ((padded_actor, False), (packed_actor, True)):
        settings = TrainSettings(train_batch_size=8, micro_train_batch_size=4, max_epochs=1, seed=0, temperature=0.9,
                                 ptx_coef=0.1, packing_samples=packed, vllm_is_cap=2.0)
        results.append(actor.train(experience, "policy", settings, ptx_rows))
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(padded_actor.engine.model.parameters(),
                                                                   packed_actor.engine.model.parameters()))
    initial = TrainingEngine(padded_actor.engine.config, trainable=False, ctx=ctx)
    moved = max(float((a - b).abs().max()) for a, b in zip(padded_actor.engine.model.parameters(),
                                                             initial.model.parameters()))
    return score_diffs, results, weight_diff, moved


@pytest.mark.parametrize("grid", [
    {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    {"pipeline_model_parallel_size": 2},
    {"context_parallel_size": 2},
], ids=["tp2_sp", "pp2", "cp2"])
def test_packed_scoring_and_training_equal_the_padded_run(tiny_models, grid):
    results = run_distributed(_scores_and_step_both_ways, world_size=2, args=(tiny_models["llama"], grid), timeout=400)
    heads = [r[0] for r in results if r[0] is not None]
    assert heads, "no rank returned the scores"
    for log_probs, values, rewards in heads:
        assert log_probs < 2e-5 and values < 2e-5 and rewards < 2e-5, (log_probs, values, rewards)
    for _, (padded, packed), weight_diff, moved in results:
        assert moved > 1e-4  # the step changed the weights ...
        # ... the same way packed and padded, up to float noise, which Adam's first step turns into
        # up to +-lr on weights whose gradient is ~0 (a real difference moves them by ~lr everywhere)
        assert weight_diff < 0.05 * moved, (weight_diff, moved)
        for key in ("policy_loss", "ptx_loss", "entropy"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
