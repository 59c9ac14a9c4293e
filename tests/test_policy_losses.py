"""Selectable policy losses, ``--loss_agg_mode`` and per-token loss masks (issue 28).

The distributed bodies train real Megatron actors (and a critic) on gloo with a learning rate
too small to move a float32 weight, so every ``train`` call of a body is a gradient at the same
weights, read from Megatron's ``main_grad`` buffers (no distributed optimizer, no clipping: the
full, DP x CP-averaged gradient of the step's loss).
"""
from __future__ import annotations

import pytest
import torch

from engine.rl.policy_losses.registry import PolicyLoss, register_policy_loss
from tests.dist_harness import run_distributed

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
MAX_RESPONSE_LEN = 16


@register_policy_loss("toy_sequence_ratio")
class ToySequenceLoss(PolicyLoss):
    """A sequence-level loss (not shipped): ``-A_i exp(mean log-prob of sequence i)``, nonlinear in
    the CP ranks' partial sums, so it is exact only if the sums are reduced over the CP group."""

    needs = frozenset({"cp_group", "sequence_index"})
    seen: list = []  # per micro-batch: the per-sequence values, and which optional inputs came

    def __call__(self, inputs):
        from engine.runtime.per_sequence import context_parallel_share, sequence_sums

        given = sorted(k for k in ("old_log_probs", "ref_log_probs", "rollout_log_probs", "values", "dp_group")
                       if getattr(inputs, k) is not None)
        mask = inputs.mask
        sums = sequence_sums(torch.stack([inputs.log_probs * mask, inputs.advantages * mask, mask]),
                             inputs.sequences, cp_group=inputs.cp_group)
        count = sums[2].detach().clamp(min=1)
        mean_log_prob, advantage = sums[0] / count, sums[1].detach() / count
        ToySequenceLoss.seen.append((mean_log_prob.detach().clone(), given))
        loss = -(advantage * mean_log_prob.exp()).sum() * context_parallel_share(inputs.cp_group)
        return loss, {}


# ------------------------------------------------------------------------- unit level

def test_an_unknown_loss_or_mode_is_refused_naming_the_known_ones():
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.policy_losses.registry import check_policy_loss_name, known_policy_losses
    from engine.rl.ppo_trainer import PPOConfig

    assert {"ppo", "toy_sequence_ratio"} <= set(known_policy_losses())
    with pytest.raises(ValueError, match=r"--policy_loss_type 'gspo2'.*ppo"):
        check_policy_loss_name("gspo2")
    small = dict(rollout_batch_size=2, train_batch_size=2, advantage=AdvantageConfig())
    with pytest.raises(ValueError, match="--policy_loss_type 'nope' is not a known policy loss: (.*, )?ppo"):
        PPOConfig(policy_loss_type="nope", **small)
    with pytest.raises(ValueError, match="--loss_agg_mode 'seq-sum'.*token-mean, seq-mean-token-sum"):
        PPOConfig(loss_agg_mode="seq-sum", **small)

    @register_policy_loss("needs_a_critic")
    class NeedsValues(PolicyLoss):
        needs = frozenset({"values"})

    with pytest.raises(ValueError, match="--policy_loss_type needs_a_critic needs the critic's values"):
        PPOConfig(policy_loss_type="needs_a_critic", **{**small, "advantage": AdvantageConfig(estimator="reinforce")})
    PPOConfig(policy_loss_type="needs_a_critic", **small)  # GAE: the critic is there
    with pytest.raises(ValueError, match="unknown inputs"):
        register_policy_loss("bad")(type("Bad", (PolicyLoss,), {"needs": frozenset({"logits"})}))


def _sample(index, tokens, finish_reason, **extra):
    from engine.rl.rollout import RolloutSample

    return RolloutSample(prompt_index=index, sample_index=0, response_token_ids=tokens, logprobs=None,
                         finish_reason=finish_reason, **extra)


def test_mask_truncated_completions_drops_exactly_the_length_capped_samples():
    from engine.rl.policy_losses.aggregation import StepCounts
    from engine.rl.rollout import rollout_loss_masks
    from engine.rl.sequences import build_rollout_batch

    samples = [_sample(0, [5, 6, 7], "stop"), _sample(1, [8, 9, 10, 11], "length"), _sample(2, [12], "stop"),
               _sample(3, [13, 14, 15, 16], "length"), _sample(4, [17, 18], "stop", loss_mask=(1, 0))]
    prompts = [[1, 2], [1, 2, 3], [4], [4, 4], [3]]
    responses = [s.response_token_ids for s in samples]
    plain = build_rollout_batch(prompts, responses, pad_id=0,
                                response_loss_masks=rollout_loss_masks(samples, mask_truncated=False))
    masked = build_rollout_batch(prompts, responses, pad_id=0,
                                 response_loss_masks=rollout_loss_masks(samples, mask_truncated=True))
    truncated = [s.truncated for s in samples]
    assert truncated == [False, True, False, True, False]
    for row, cut in enumerate(truncated):
        if cut:
            assert masked.action_mask[row].sum() == 0 and plain.action_mask[row].sum() == len(responses[row])
        else:  # the others untouched (sample 4 keeps its own mask either way)
            assert torch.equal(masked.action_mask[row], plain.action_mask[row])
    assert plain.action_mask[4].tolist()[:3] == [1.0, 0.0, 0.0]  # prompt of 1: its labels start at 0
    assert torch.equal(masked.input_ids, plain.input_ids)  # the tokens stay in the context
    # the step normalisers no longer count them: 1 + 3 + 1 trained tokens in 3 sequences
    counts = StepCounts(num_tokens=int(masked.action_mask.sum()),
                        num_sequences=int((masked.action_mask.sum(1) > 0).sum()))
    assert counts == StepCounts(num_tokens=3 + 1 + 1, num_sequences=3)
    # nothing to mask: no mask at all (the batch is built as before)
    assert rollout_loss_masks([_sample(0, [5], "length")], mask_truncated=False) is None


def test_loss_masks_and_segments_of_a_sample():
    sample = _sample(0, [5, 6, 7, 8, 9, 10], "stop", loss_mask=(1, 1, 0, 1, 1, 1), segments=((0, 2), (4, 6)))
    assert sample.trained_tokens() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]  # token 3: outside every segment
    assert _sample(0, [5, 6, 7], "stop", segments=((1, 3),)).trained_tokens() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="loss_mask has 2 entries for 3 response tokens"):
        _sample(0, [5, 6, 7], "stop", loss_mask=(1, 1))
    with pytest.raises(ValueError, match=r"segment \[2, 5\) is not inside"):
        _sample(0, [5, 6, 7], "stop", segments=((2, 5),))


# ------------------------------------------------ token-mean: today's loss, bit for bit

def _pre_change_policy_loss(settings, *, scale, tp_group, logits, batch):
    """engine.rl.train_losses.policy_loss_fn as it was before the registry (ptx aside), verbatim."""
    from engine.rl.losses import kl_loss, policy_loss, truncated_importance_weights
    from engine.runtime.vocab_parallel import token_entropy, token_log_probs

    mask = batch["action_mask"]
    log_probs = token_log_probs(logits, batch["labels"], temperature=settings.temperature)
    old_log_probs = batch.get("old_log_probs")
    old_log_probs = log_probs.detach() if old_log_probs is None else old_log_probs
    # The engines' mismatch, now measured on one route whatever the old log-probs' source (metric
    # names as the loop reports them).
    rollout = batch.get("rollout_log_probs")
    weights, engine_metrics = None, {}
    if rollout is not None:
        cap = settings.vllm_is_cap
        engine_metrics = {"rollout_logprob_abs_diff_sum": ((old_log_probs - rollout).abs() * mask).sum()}
        if cap is not None:
            weights, raw = truncated_importance_weights(old_log_probs, rollout, mask, cap=cap)
            engine_metrics.update({"vllm_is/mean_sum": weights.sum(),
                                   "vllm_is/capped_frac_sum": ((raw > cap).float() * mask).sum(),
                                   "vllm_is/max": weights.max() if weights.numel() else weights.new_zeros(())})
    loss_sum, info = policy_loss(log_probs, old_log_probs, batch["advantages"], mask, eps_clip=settings.eps_clip,
                                 eps_clip_high=settings.eps_clip_high, dual_clip=settings.dual_clip,
                                 normaliser=1.0, importance_weights=weights)
    metrics = {"policy_loss_sum": loss_sum.detach(), "num_tokens": mask.sum().detach(),
               "clip_frac": info["clip_frac"].detach(), "approx_kl": info["approx_kl"].detach(), **engine_metrics}
    total = loss_sum
    if settings.kl_loss_coef > 0:
        kl_sum = kl_loss(log_probs, batch["ref_log_probs"], mask, settings.kl_estimator, normaliser=1.0)
        total = total + settings.kl_loss_coef * kl_sum
        metrics["kl_loss_sum"] = kl_sum.detach()
    metrics["entropy_sum"] = (token_entropy(logits, tp_group, temperature=settings.temperature) * mask).sum()
    return total * scale, metrics


def _bit_for_bit_body(rank, world_size):
    from megatron.core import parallel_state as ps

    from engine.rl.policy_losses.aggregation import Aggregation, StepCounts
    from engine.rl.train_losses import LossGroups, TrainSettings, make_loss_fn
    from engine.runtime.schedule import token_mean_scale
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    initialize_parallel(ParallelConfig())
    g = torch.Generator().manual_seed(3)
    rows, length, vocab = 4, 11, 32
    mask = (torch.rand(rows, length, generator=g) > 0.3).float()
    batch = {"labels": torch.randint(0, vocab, (rows, length), generator=g), "action_mask": mask,
             "advantages": torch.randn(rows, length, generator=g) * mask,
             "ref_log_probs": -torch.rand(rows, length, generator=g) * 3,
             "rollout_log_probs": -torch.rand(rows, length, generator=g) * 3}
    logits = torch.randn(rows, length, vocab, generator=g)
    settings = TrainSettings(train_batch_size=rows, micro_train_batch_size=rows, max_epochs=1, seed=0,
                             eps_clip=0.2, eps_clip_high=0.28, dual_clip=3.0, temperature=0.7, kl_loss_coef=0.05,
                             kl_estimator="k3", vllm_is_cap=1.5)
    num_tokens = int(mask.sum())
    scale = token_mean_scale(num_microbatches=3, data_parallel_size=2, global_num_tokens=num_tokens + 17)
    aggregation = Aggregation.for_step("token-mean", StepCounts(num_tokens=num_tokens + 17, num_sequences=rows),
                                       num_microbatches=3, data_parallel_size=2)
    results = []
    for old_log_probs in (None, -torch.rand(rows, length, generator=g) * 3):
        step_batch = dict(batch) if old_log_probs is None else {**batch, "old_log_probs": old_log_probs}
        outputs = []
        for compute in ("before", "after"):
            leaf = logits.clone().requires_grad_(True)
            if compute == "before":
                loss, metrics = _pre_change_policy_loss(settings, scale=scale, tp_group=ps.get_tensor_model_parallel_group(),
                                                        logits=leaf, batch=step_batch)
            else:
                loss_fn = make_loss_fn("policy", settings, aggregation=aggregation,
                                       groups=LossGroups(tp_group=ps.get_tensor_model_parallel_group()))
                loss, metrics = loss_fn(leaf, step_batch)
            loss.backward()
            outputs.append((loss.detach(), leaf.grad, {k: v.detach() for k, v in metrics.items()}))
        results.append((aggregation.scale == scale, outputs))
    return results


def test_token_mean_reproduces_the_pre_change_policy_loss_bit_for_bit():
    for same_scale, ((loss0, grad0, metrics0), (loss1, grad1, metrics1)) in run_distributed(
            _bit_for_bit_body, 1, timeout=120)[0]:
        assert same_scale
        assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
        assert sorted(metrics0) == sorted(metrics1)
        assert all(torch.equal(metrics0[k], metrics1[k]) for k in metrics0), metrics0


# ------------------------------------------- aggregation and a toy loss under every layout

def _experience(seed: int, rows: int = 8):
    """Random prompts and responses with advantages; some response tokens masked out of the loss,
    one response entirely (as --mask_truncated_completions does)."""
    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    responses = [torch.randint(3, 300, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(rows)]
    masks = [(torch.rand(len(r), generator=g) > 0.25).float().tolist() for r in responses]
    masks[1] = [0.0] * len(responses[1])
    batch = build_rollout_batch(prompts, responses, pad_id=0, response_loss_masks=masks)
    experience = Experience.from_rollout(batch)
    return experience.with_fields(advantages=torch.randn(batch.action_mask.shape, generator=g) * batch.action_mask)


def _direct_policy_loss(experience, mode: str) -> float:
    """The first step's policy loss, single process: the ratio is 1, each token's loss is -A."""
    mask = experience.action_mask.double()
    token_loss = -experience.advantages.double() * mask
    per_sequence, counts = token_loss.sum(1), mask.sum(1)
    sequences = int((counts > 0).sum())
    return float({"token-mean": token_loss.sum() / mask.sum(),
                  "seq-mean-token-sum": per_sequence.sum() / sequences,
                  "seq-mean-token-mean": (per_sequence / counts.clamp(min=1)).sum() / sequences,
                  "seq-mean-token-sum-norm": per_sequence.sum() / (sequences * MAX_RESPONSE_LEN)}[mode])


def _frozen_worker(rank, world, path, grid, *, value_head=False, ctx=None):
    """A trainable role whose steps leave the weights as they are (lr 1e-30 is below float32's
    resolution of any weight), so each step's gradient is at the same point."""
    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    optim = OptimConfig(learning_rate=1e-30, lr_warmup_ratio=0.0, lr_scheduler="constant", max_norm=0.0,
                        use_distributed_optimizer=False)
    config = EngineConfig(pretrain=path, parallel=ParallelConfig(**grid), optim=optim,
                          build=ModelBuildConfig(value_head=value_head))
    worker = MegatronRoleWorker(RoleConfig(name="critic" if value_head else "actor", engine=config, num_ranks=world,
                                           trainable=True), rank)
    worker.engine = TrainingEngine(config, ctx=ctx)
    return worker


def _gradient(worker) -> list[torch.Tensor]:
    return [p.main_grad.detach().clone() for p in worker.engine.model.parameters()]


def _settings(**overrides):
    from engine.rl.train_losses import TrainSettings

    return TrainSettings(**{"train_batch_size": 8, "micro_train_batch_size": 3, "max_epochs": 1, "seed": 0,
                            "max_response_len": MAX_RESPONSE_LEN, **overrides})


def _aggregation_body(rank, world, path, grid, layouts):
    actor = _frozen_worker(rank, world, path, grid)
    experience = _experience(0)
    out = {}
    for packed in layouts:
        for loss_type, mode in [("ppo", m) for m in MODES] + [("toy_sequence_ratio", "seq-mean-token-sum")]:
            ToySequenceLoss.seen.clear()
            metrics = actor.train(experience, "policy", _settings(policy_loss_type=loss_type, loss_agg_mode=mode,
                                                                  packing_samples=packed))
            out[loss_type, mode, packed] = (metrics["policy_loss"], _gradient(actor), list(ToySequenceLoss.seen))
    return out


def _assert_same_gradient(actual, expected, what):
    for a, b in zip(actual, expected, strict=True):
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= 1e-4 * scale + 1e-8, what
    assert max(float(b.abs().max()) for b in expected) > 1e-4, what  # a gradient there is


@pytest.mark.parametrize("grid,layouts", [
    ({}, (False,)),  # the single-process reference
    ({"context_parallel_size": 2}, (False, True)),
    ({"data_parallel_size": 2}, (False,)),
], ids=["single", "cp2_padded_and_packed", "dp2"])
def test_loss_agg_modes_and_a_registered_sequence_loss_are_exact_under_dp_cp_and_packing(tiny_models, grid, layouts):
    """(1) the toy loss gets the CP group: its per-sequence values and gradient at CP=2 equal CP=1's;
    (2) every --loss_agg_mode equals the direct formula and the single-process gradient at CP=2,
    DP=2 and with packing."""
    path = tiny_models["llama"]
    experience = _experience(0)
    world = 2 if grid else 1
    grid = {k: v for k, v in grid.items() if k != "data_parallel_size"}  # DP: what the ranks leave over
    results = run_distributed(_aggregation_body, world, args=(path, grid, layouts), timeout=400)
    if world == 1:
        _REFERENCE[path] = results[0]
    elif path not in _REFERENCE:  # run alone (-k): make the reference
        _REFERENCE[path] = run_distributed(_aggregation_body, 1, args=(path, {}, (False,)), timeout=400)[0]
    reference = _REFERENCE[path]
    for result in results:
        for (loss_type, mode, packed), (loss, gradient, seen) in result.items():
            what = (loss_type, mode, packed, grid, world)
            _, ref_gradient, ref_seen = reference[loss_type, mode, False]
            if loss_type == "ppo":
                assert loss == pytest.approx(_direct_policy_loss(experience, mode), rel=1e-5, abs=1e-7), what
            else:
                assert seen and all(given == [] for _, given in seen), what  # it declared no other input, got none
            _assert_same_gradient(gradient, ref_gradient, what)
    # The toy loss's per-sequence values: the whole sequences' at CP=2 too (each CP rank holds them
    # all; the DP ranks hold their own rows).
    shares = results if world == 2 and not grid else results[:1]
    for packed in layouts:
        values = torch.cat([v for share in shares for v, _ in share["toy_sequence_ratio", "seq-mean-token-sum", packed][2]])
        ref_values = torch.cat([v for v, _ in reference["toy_sequence_ratio", "seq-mean-token-sum", False][2]])
        torch.testing.assert_close(values.sort().values, ref_values.sort().values, rtol=1e-5, atol=1e-6)
    if world == 1:  # the modes are different losses: their gradients differ
        token_mean = results[0]["ppo", "token-mean", False][1]
        seq_mean = results[0]["ppo", "seq-mean-token-mean", False][1]
        assert max(float((a - b).abs().max()) for a, b in zip(token_mean, seq_mean)) > 1e-4


_REFERENCE: dict = {}  # the single-process run of a model, shared by the layouts of this session


# --------------------------------------------- loss masks: as if the masked tail never was

def _masked_and_cut(seed: int, rows: int = 6):
    """The same rollout twice: with the tail of some responses masked out of the loss, and with
    those responses cut where their mask starts (the tail never generated). Per-token fields of
    the cut rows are the prefix of the masked rows'."""
    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    responses = [torch.randint(3, 300, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(rows)]
    keep = [len(r) if i % 3 == 0 else int(torch.randint(1, len(r), (1,), generator=g)) for i, r in enumerate(responses)]
    masks = [[1.0] * k + [0.0] * (len(r) - k) for r, k in zip(responses, keep)]
    full = build_rollout_batch(prompts, responses, pad_id=0, response_loss_masks=masks)
    cut = build_rollout_batch(prompts, [r[:k] for r, k in zip(responses, keep)], pad_id=0)
    shape = full.action_mask.shape
    fields = {name: torch.randn(shape, generator=g) for name in ("advantages", "returns", "values")}
    fields["ref_log_probs"] = -torch.rand(shape, generator=g) * 3
    masked = Experience.from_rollout(full)
    masked = masked.with_fields(**{k: v * full.action_mask for k, v in fields.items()})
    width = cut.action_mask.shape[1]
    truncated = Experience.from_rollout(cut)
    truncated = truncated.with_fields(**{k: v[:, :width] * cut.action_mask for k, v in fields.items()})
    return masked, truncated


def _mask_body(rank, world, path, grid):
    actor = _frozen_worker(rank, world, path, grid)
    critic = _frozen_worker(rank, world, path, grid, value_head=True, ctx=actor.engine.ctx)
    masked, truncated = _masked_and_cut(1)
    full_response = masked.with_fields(action_mask=_response_mask(masked))
    out = {}
    for packed in (False, True):
        for mode in ("token-mean", "seq-mean-token-mean"):
            settings = _settings(train_batch_size=6, micro_train_batch_size=2, packing_samples=packed,
                                 loss_agg_mode=mode, kl_loss_coef=0.1, kl_estimator="k3", value_clip=0.2)
            for name, experience in (("masked", masked), ("cut", truncated), ("unmasked", full_response)):
                metrics = actor.train(experience, "policy", settings)
                out["actor", mode, packed, name] = (metrics, _gradient(actor))
                if mode == "token-mean":
                    metrics = critic.train(experience, "value", settings)
                    out["critic", mode, packed, name] = (metrics, _gradient(critic))
    return out


def _response_mask(experience) -> torch.Tensor:
    """Every response token trained: the label positions from the first masked-or-trained response
    token of each row to its last real token (the rows' prompts are where ``action_mask`` begins)."""
    mask = torch.zeros_like(experience.action_mask)
    for row, (trained, last) in enumerate(zip(experience.action_mask, experience.last_index.tolist())):
        first = int(trained.nonzero()[0, 0]) if trained.any() else last
        mask[row, first:last] = 1.0
    return mask


def test_masked_tokens_train_like_tokens_never_generated_at_tp2_and_packed(tiny_models):
    """(3) the policy loss (+ KL loss, entropy, --loss_agg_mode normalisers) and the critic's value
    loss of a rollout whose responses end in masked tokens have the gradient of the rollout cut
    there; training every response token gives another gradient (the mask is what makes them equal)."""
    results = run_distributed(_mask_body, 2, args=(tiny_models["llama"], {"tensor_model_parallel_size": 2}),
                              timeout=400)
    for result in results:
        for (role, mode, packed, name), (metrics, gradient) in result.items():
            if name != "masked":
                continue
            what = (role, mode, packed)
            cut_metrics, cut_gradient = result[role, mode, packed, "cut"]
            _assert_same_gradient(gradient, cut_gradient, what)
            for key in ("policy_loss", "kl_loss", "entropy", "value_loss", "num_tokens"):
                if key in metrics:
                    assert metrics[key] == pytest.approx(cut_metrics[key], rel=1e-5, abs=1e-7), (key, what)
            unmasked = result[role, mode, packed, "unmasked"][1]
            assert max(float((a - b).abs().max()) for a, b in zip(gradient, unmasked)) > 1e-4, what
