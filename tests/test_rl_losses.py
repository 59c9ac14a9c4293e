"""The 2026 RL losses (issue 31): GSPO, CISPO, every --loss_agg_mode, the entropy bonus, the
low_var_kl estimator, --vllm_is_correction_type tis / icepop / seq-mask-tis and DAPO's overlong
penalty.

Three levels: (1) each loss and mode against a float64 implementation of the paper's formula,
written here, value and gradient, in process; (2) the actor's whole loss function from logits
(entropy bonus, KL loss, engine-mismatch weights) against float64, one process; (3) each layout
(TP=2, PP=2, CP=2 padded and packed, DP=2) in one multi-rank body that trains every loss x mode
on a real Megatron actor and gives the single-process loss and gradients.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.rl.policy_losses.gspo import GSPOLoss
from engine.rl.policy_losses.registry import register_policy_loss
from tests.dist_harness import run_distributed

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOSSES = ("ppo", "gspo", "cispo")
MAX_RESPONSE_LEN = 16
CLIP = {"ppo": (0.2, 0.28), "gspo": (0.02, 0.03), "cispo": (1.0, 0.1)}  # (low, high) eps of each loss


@register_policy_loss("gspo_probe")
class GSPOProbe(GSPOLoss):
    """The shipped GSPO loss, recording its per-sequence log-ratios (sequences with trained tokens)."""

    seen: list = []

    def sequence_log_ratio(self, inputs):
        means, counts = super().sequence_log_ratio(inputs)
        GSPOProbe.seen.append(means[counts > 0].clone())
        return means, counts


def _settings(loss: str, mode: str, **extra):
    from engine.rl.train_losses import TrainSettings

    low, high = CLIP[loss]
    clip = ({"cispo_eps_clip_low": low, "cispo_eps_clip_high": high} if loss == "cispo"
            else {"eps_clip": low, "eps_clip_high": high})
    return TrainSettings(train_batch_size=8, micro_train_batch_size=3, max_epochs=1, seed=0,
                         max_response_len=MAX_RESPONSE_LEN, policy_loss_type=loss, loss_agg_mode=mode,
                         **clip, **extra)


# ------------------------------------------------------- direct float64 formulas (the papers')

def _aggregate(token_loss, mask, mode):
    """veRL's four modes, from their definitions."""
    per_sequence, counts = (token_loss * mask).sum(1), mask.sum(1)
    sequences = (counts > 0).sum()
    return {"token-mean": per_sequence.sum() / counts.sum(),
            "seq-mean-token-sum": per_sequence.sum() / sequences,
            "seq-mean-token-mean": (per_sequence / counts.clamp(min=1)).sum() / sequences,
            "seq-mean-token-sum-norm": per_sequence.sum() / (sequences * MAX_RESPONSE_LEN)}[mode]


def _ppo_tokens(log_probs, old, advantages, mask):
    low, high = CLIP["ppo"]
    ratio = (log_probs - old).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - low, 1 + high) * advantages)


def _gspo_tokens(log_probs, old, advantages, mask):
    """GSPO eq. 5-7: s_i = (prod_t pi / pi_old)^(1 / |y_i|), differentiated as it stands."""
    low, high = CLIP["gspo"]
    s = (((log_probs - old) * mask).sum(1) / mask.sum(1).clamp(min=1)).exp()[:, None]
    return -torch.min(s * advantages, s.clamp(1 - low, 1 + high) * advantages)


def _cispo_tokens(log_probs, old, advantages, mask):
    """MiniMax-M1 eq. 4-5: -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi."""
    low, high = CLIP["cispo"]
    weight = (log_probs - old).exp().clamp(1 - low, 1 + high).detach()
    return -weight * advantages * log_probs


def _gspo_token_tokens(log_probs, old, advantages, mask):
    """GSPO-token (GSPO eq. 13-14): s_it = sg[s_i] pi(y_it) / sg[pi(y_it)]; GSPO's gradient where the
    tokens of a sequence weigh the same, and the form a per-token weight (the engines' mismatch) scales."""
    low, high = CLIP["gspo"]
    log_s = (((log_probs - old) * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None].detach()
    s = (log_probs - log_probs.detach() + log_s).exp()
    return -torch.min(s * advantages, s.clamp(1 - low, 1 + high) * advantages)


DIRECT = {"ppo": _ppo_tokens, "gspo": _gspo_tokens, "cispo": _cispo_tokens}
PER_TOKEN_WEIGHTED = {**DIRECT, "gspo": _gspo_token_tokens}


def _ragged(seed: int, rows: int = 7, width: int = 12):
    """Responses of ragged lengths (one without trained tokens, a few tokens masked inside), log-probs
    whose ratios reach past every clip range, one advantage per sequence (GSPO's and GRPO's)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).double()
    mask = mask * (torch.rand(rows, width, generator=g) > 0.15).double()
    mask[2] = 0.0
    log_probs = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    old = log_probs + 0.25 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    advantages = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, width) * mask
    return log_probs, old, advantages, mask


# --------------------------------------------------------------------- (1) each loss, each mode

@pytest.mark.parametrize("loss", LOSSES)
def test_each_policy_loss_and_mode_equals_its_papers_formula_in_float64(loss):
    from engine.rl.policy_losses.aggregation import Aggregation, StepCounts, annotate_microbatches
    from engine.rl.policy_losses.registry import PolicyLossInputs, policy_loss_class

    log_probs, old, advantages, mask = _ragged(0)
    for mode in MODES:
        [batch] = annotate_microbatches([{"action_mask": mask}], mode=mode)
        counts = StepCounts(num_tokens=int(mask.sum()), num_sequences=int((mask.sum(1) > 0).sum()))
        aggregation = Aggregation.for_step(mode, counts, num_microbatches=1, data_parallel_size=1,
                                           max_response_len=MAX_RESPONSE_LEN)
        ours = log_probs.clone().requires_grad_(True)
        inputs = PolicyLossInputs(log_probs=ours, advantages=advantages, mask=mask, old_log_probs=old,
                                  weights=aggregation.token_weights(mask, batch), aggregation=aggregation,
                                  sequences={k: batch[k] for k in ("sequence_index", "num_sequences")})
        loss_sum, _ = policy_loss_class(loss)(_settings(loss, mode))(inputs)
        (loss_sum * aggregation.scale).backward()
        theirs = log_probs.clone().requires_grad_(True)
        direct = _aggregate(DIRECT[loss](theirs, old, advantages, mask), mask, mode)
        direct.backward()
        assert float(loss_sum * aggregation.scale) == pytest.approx(float(direct), rel=1e-12, abs=1e-14), mode
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-13, msg=mode)
        assert float(theirs.grad.abs().max()) > 1e-3
    # the clip ranges are reached: the test would see a wrong clip
    ratio = (log_probs - old).exp()[mask > 0]
    sequence = (((log_probs - old) * mask).sum(1) / mask.sum(1).clamp(min=1)).exp()[mask.sum(1) > 0]
    low, high = CLIP[loss]
    reached = sequence if loss == "gspo" else ratio
    assert bool((reached > 1 + high).any()) and (loss == "cispo" or bool((reached < 1 - low).any()))


def test_low_var_kl_is_verls_clamped_k3_and_stays_finite():
    from engine.rl.kl import kl_estimate

    log_probs = torch.tensor([[-0.5, -1.0, -60.0, -0.1]], requires_grad=True)
    ref = torch.tensor([[-0.7, -0.2, -0.1, -45.0]])
    kl = kl_estimate(log_probs, ref, estimator="low_var_kl")
    kl.sum().backward()
    direct = []
    for lp, r in zip(log_probs[0].tolist(), ref[0].tolist()):
        x = min(max(r - lp, -20.0), 20.0)  # veRL: kl = ref - logp, clamped, then exp(kl) - kl - 1, clamped
        direct.append(min(max(torch.tensor(x, dtype=torch.float64).exp().item() - x - 1, -10.0), 10.0))
    torch.testing.assert_close(kl[0].double(), torch.tensor(direct, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(log_probs.grad).all()
    k3 = torch.tensor([[-60.0]], requires_grad=True)
    kl_estimate(k3, torch.tensor([[40.0]]), estimator="k3").sum().backward()
    assert not torch.isfinite(k3.grad).all()  # what the clamp of low_var_kl is for


def test_overlong_penalty_is_dapos_soft_length_penalty():
    from engine.rl.reward_shaping import overlong_penalty

    lengths = torch.tensor([1, 12, 13, 16, 18, 20])
    penalty = overlong_penalty(lengths, max_len=20, buffer_len=8, factor=0.5)
    direct = [0.0 if n <= 12 else 0.5 * (12 - n) / 8 for n in lengths.tolist()]
    assert penalty.tolist() == pytest.approx(direct)
    with pytest.raises(ValueError, match=r"--overlong_buffer_len \(20\) must be in \[1, --generate_max_len\)"):
        overlong_penalty(lengths, max_len=20, buffer_len=20, factor=1.0)


def test_the_new_options_are_checked_and_dr_grpo_defaults_to_its_aggregation(capsys):
    from engine.cli.options import OptionError
    from engine.cli.train_ppo_ray import parse_args
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.config import PPOConfig

    small = dict(rollout_batch_size=2, train_batch_size=4, n_samples_per_prompt=2)
    grpo = AdvantageConfig(estimator="grpo", n_samples_per_prompt=2)
    dr = AdvantageConfig(estimator="dr_grpo", n_samples_per_prompt=2)
    assert PPOConfig(advantage=dr, **small).aggregation_mode == "seq-mean-token-sum-norm"
    assert PPOConfig(advantage=dr, loss_agg_mode="token-mean", **small).aggregation_mode == "token-mean"
    assert PPOConfig(advantage=grpo, **small).aggregation_mode == "token-mean"
    with pytest.raises(ValueError, match="--vllm_is_correction_type icepop masks outside a band: pass "
                                         "--vllm_is_truncated_threshold LOW HIGH"):
        PPOConfig(advantage=grpo, vllm_is_correction=True, vllm_is_correction_type="icepop", **small)
    with pytest.raises(ValueError, match="--vllm_is_correction_type seq-mask-tis without --vllm_is_correction"):
        PPOConfig(advantage=grpo, vllm_is_correction_type="seq-mask-tis", **small)
    with pytest.raises(ValueError, match="--cispo_eps_clip_low / --cispo_eps_clip_high bound --policy_loss_type "
                                         "cispo's weights; this run's loss is ppo"):
        PPOConfig(advantage=grpo, cispo_eps_clip_high=5.0, **small)
    with pytest.raises(ValueError, match="--overlong_penalty_factor scales the --overlong_buffer_len penalty"):
        PPOConfig(advantage=grpo, overlong_penalty_factor=0.5, **small)
    assert PPOConfig(advantage=grpo, vllm_is_truncated_threshold=(0.5, 5.0), **small).is_correction_band == (0.5, 5.0)
    with pytest.raises(ValueError, match="--dual_clip bounds PPO's token surrogate; --policy_loss_type gspo"):
        PPOConfig(advantage=grpo, policy_loss_type="gspo", dual_clip=3.0, **small)
    with pytest.raises(ValueError, match="--entropy_coef must be >= 0"):
        PPOConfig(advantage=grpo, entropy_coef=-1.0, **small)
    base = ["--pretrain", "x", "--remote_rm_url", "r.py", "--prompt_data", "p", "--n_samples_per_prompt", "2",
            "--rollout_batch_size", "2", "--train_batch_size", "4", "--generate_max_len", "8"]
    job = parse_args([*base, "--advantage_estimator", "dr_grpo", "--entropy_loss_coef", "0.01",
                      "--kl_estimator", "low_var_kl", "--vllm_is_truncated_threshold", "0.5", "5"])
    assert "--loss_agg_mode seq-mean-token-sum-norm (Dr. GRPO's" in capsys.readouterr().err
    assert (job.ppo.entropy_coef, job.ppo.kl_estimator, job.ppo.vllm_is_truncated_threshold) == (0.01, "low_var_kl",
                                                                                                 (0.5, 5.0))
    with pytest.raises((OptionError, SystemExit)):
        parse_args([*base, "--overlong_buffer_len", "8"])


# ------------------------------------------- (2) the actor's loss from logits, one process

def _glue_batch(seed: int, rows: int = 5, width: int = 9, vocab: int = 24):
    g = torch.Generator().manual_seed(seed)
    _, _, advantages, mask = _ragged(seed, rows, width)
    logits = torch.randn(rows, width, vocab, generator=g) * 2
    batch = {"labels": torch.randint(0, vocab, (rows, width), generator=g), "action_mask": mask.float(),
             "advantages": advantages.float(),
             "ref_log_probs": (-torch.rand(rows, width, generator=g) * 3),
             "rollout_log_probs": None, "old_log_probs": None}
    return logits, batch, g


def _glue_direct(logits, batch, loss, mode, correction, band, entropy_coef, kl_coef):
    """The actor's loss in float64 from its definitions: policy loss x mismatch weights, + KL, - entropy."""
    mask = batch["action_mask"].double()
    log_p = torch.log_softmax(logits.double(), -1)
    log_probs = log_p.gather(-1, batch["labels"][..., None])[..., 0]
    old, rollout = batch["old_log_probs"].double(), batch["rollout_log_probs"].double()
    tokens = PER_TOKEN_WEIGHTED[loss](log_probs, old, batch["advantages"].double(), mask)
    w = (old - rollout).exp()
    low, high = band
    if correction == "tis":
        w = w.clamp(low, high)
    elif correction == "icepop":
        w = w * ((w >= low) & (w <= high))
    else:
        geometric = (((old - rollout) * mask).sum(1) / mask.sum(1).clamp(min=1)).exp()[:, None]
        w = w * ((geometric >= low) & (geometric <= high))
    x = (batch["ref_log_probs"].double() - log_probs).clamp(-20, 20)
    kl = (x.exp() - x - 1).clamp(-10, 10)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (_aggregate(tokens * w, mask, mode) + kl_coef * _aggregate(kl, mask, mode)
            - entropy_coef * _aggregate(entropy, mask, mode))


GLUE_BAND, GLUE_ENTROPY_COEF, GLUE_KL_COEF = (0.85, 1.15), 0.05, 0.1


def _glue_cases() -> dict:
    """Every loss x mode x correction: (logits, batch, settings), the same in every process."""
    cases = {}
    for loss in LOSSES:
        for mode in MODES:
            for correction in ("tis", "icepop", "seq-mask-tis"):
                logits, batch, g = _glue_batch(len(cases))
                log_p = torch.log_softmax(logits.double(), -1).gather(-1, batch["labels"][..., None])[..., 0]
                batch["old_log_probs"] = (log_p + 0.2 * torch.randn(log_p.shape, generator=g)).float()
                batch["rollout_log_probs"] = batch["old_log_probs"] + 0.4 * torch.randn(log_p.shape, generator=g)
                settings = _settings(loss, mode, vllm_is_cap=GLUE_BAND[1], vllm_is_low=GLUE_BAND[0],
                                     vllm_is_correction_type=correction, entropy_coef=GLUE_ENTROPY_COEF,
                                     kl_loss_coef=GLUE_KL_COEF, kl_estimator="low_var_kl")
                cases[loss, mode, correction] = (logits, batch, settings)
    return cases


def _glue_results() -> dict:
    """The actor's loss function on every glue case (parallel state initialised, one rank)."""
    from megatron.core import parallel_state as ps

    from engine.rl.policy_losses.aggregation import Aggregation, StepCounts, annotate_microbatches
    from engine.rl.train_losses import LossGroups, make_loss_fn

    groups = LossGroups(tp_group=ps.get_tensor_model_parallel_group(), cp_group=ps.get_context_parallel_group())
    out = {}
    for key, (logits, batch, settings) in _glue_cases().items():
        mask = batch["action_mask"]
        [annotated] = annotate_microbatches([batch], mode=settings.loss_agg_mode)
        counts = StepCounts(num_tokens=int(mask.sum()), num_sequences=int((mask.sum(1) > 0).sum()))
        aggregation = Aggregation.for_step(settings.loss_agg_mode, counts, num_microbatches=1, data_parallel_size=1,
                                           max_response_len=MAX_RESPONSE_LEN)
        leaf = logits.clone().requires_grad_(True)
        loss, metrics = make_loss_fn("policy", settings, aggregation=aggregation, groups=groups)(leaf, annotated)
        loss.backward()
        out[key] = (float(loss.detach()), leaf.grad.tolist(), {k: float(v) for k, v in metrics.items()})
    return out


def test_the_actor_loss_with_entropy_bonus_kl_and_each_mismatch_correction_equals_float64(tiny_models):
    results = _reference(tiny_models["llama"])[1]  # computed by the single-process layout run (one spawn less)
    masked = {"icepop": 0.0, "seq-mask-tis": 0.0}
    for key, (logits, batch, _) in _glue_cases().items():
        leaf = logits.double().requires_grad_(True)
        direct = _glue_direct(leaf, batch, *key, GLUE_BAND, GLUE_ENTROPY_COEF, GLUE_KL_COEF)
        direct.backward()
        loss, grad, metrics = results[key]
        assert loss == pytest.approx(float(direct), rel=1e-5, abs=1e-6), key
        torch.testing.assert_close(torch.tensor(grad, dtype=torch.float64), leaf.grad, rtol=1e-4, atol=1e-6,
                                   msg=str(key))
        if key[2] != "tis":
            masked[key[2]] += metrics["vllm_is/masked_frac_sum"]
        assert "entropy_loss" in metrics or "entropy_loss_sum" in metrics
    assert min(masked.values()) > 0  # the bands mask tokens and sequences, so a wrong mask would show


# ------------------------------------------------------------- (3) every layout, one body each

def _rollout_near_the_policy(actor, world):
    """The test rollout with old / reference / engine log-probs a little off the actor's own, so
    ratios spread over each clip range (the same noise at every layout)."""
    import torch.distributed as dist

    from tests.test_policy_losses import _experience

    experience = _experience(0)
    share = actor.compute_log_probs(experience, 8)
    shares = [None] * world
    dist.all_gather_object(shares, share)
    current = torch.zeros_like(experience.action_mask)
    for part in shares:
        if part is not None and part.values is not None:
            current[part.start:part.stop] = part.values
    g = torch.Generator().manual_seed(7)
    mask = experience.action_mask
    noise = [torch.randn(mask.shape, generator=g) * mask for _ in range(3)]
    old = current + 0.15 * noise[0]
    return experience.with_fields(old_log_probs=old, ref_log_probs=current + 0.3 * noise[1],
                                  rollout_log_probs=old + 0.3 * noise[2])


LAYOUT_CASES = [(loss, mode) for loss in LOSSES for mode in MODES]
CORRECTION = {"ppo": "tis", "gspo": "seq-mask-tis", "cispo": "icepop"}


def _layout_body(rank, world, path, grid, layouts):
    from models.weights import iter_hf_weights
    from tests.test_policy_losses import _frozen_worker

    actor = _frozen_worker(rank, world, path, grid)
    experience = _rollout_near_the_policy(actor, world)
    out = {}
    for packed in layouts:
        for loss, mode in LAYOUT_CASES:
            GSPOProbe.seen.clear()
            settings = _settings(loss, mode, packing_samples=packed, entropy_coef=0.01, kl_loss_coef=0.05,
                                 kl_estimator="low_var_kl", vllm_is_cap=2.0, vllm_is_low=0.5,
                                 vllm_is_correction_type=CORRECTION[loss])
            if loss == "gspo":
                settings = replace(settings, policy_loss_type="gspo_probe")
            metrics = actor.train(experience, "policy", settings)
            grads = dict(iter_hf_weights(actor.engine.model, actor.engine.adapter, tensor_of=lambda p: p.main_grad))
            out[loss, mode, packed] = (metrics.get("policy_loss"), grads, list(GSPOProbe.seen))
    return out, _glue_results() if world == 1 else None


def _merged(results):
    """Per case: the losses reported, the full gradients (each rank's owned tensors), rank 0's probes."""
    results = [cases for cases, _ in results]
    merged = {}
    for key in results[0]:
        grads = {}
        for result in results:
            grads.update(result[key][1])
        losses = [float(r[key][0]) for r in results if r[key][0] is not None]
        merged[key] = (losses, grads, results[0][key][2])
    return merged


_REFERENCE: dict = {}


def _reference(path):
    """(the single-process layout run merged, the glue results)"""
    if path not in _REFERENCE:
        results = run_distributed(_layout_body, 1, args=(path, {}, (False,)), timeout=400)
        _REFERENCE[path] = (_merged(results), results[0][1])
    return _REFERENCE[path]


@pytest.mark.parametrize("grid,world,layouts", [
    ({"tensor_model_parallel_size": 2}, 2, (False,)),
    ({"pipeline_model_parallel_size": 2}, 2, (False,)),
    ({"context_parallel_size": 2}, 2, (False, True)),
    ({}, 2, (False,)),  # DP=2
], ids=["tp2", "pp2", "cp2_padded_and_packed", "dp2"])
def test_every_loss_and_mode_gives_the_single_process_loss_and_gradients(tiny_models, grid, world, layouts):
    """ppo / gspo / cispo x the four modes, with the entropy bonus, a low_var_kl loss and a mismatch
    correction each (tis / seq-mask-tis / icepop): at TP=2, PP=2, CP=2 (padded and packed) and DP=2
    the step's loss and full gradients are the single-process ones; GSPO's sequence ratios at CP=2
    (each sequence split over the two ranks) are CP=1's."""
    path = tiny_models["llama"]
    reference = _reference(path)[0]
    results = _merged(run_distributed(_layout_body, world, args=(path, grid, layouts), timeout=500))
    for (loss, mode, packed), (losses, grads, seen) in results.items():
        what = (loss, mode, packed, grid)
        ref_losses, ref_grads, ref_seen = reference[loss, mode, False]
        assert losses, what
        for value in losses:
            assert value == pytest.approx(ref_losses[0], rel=1e-4, abs=1e-6), what
        assert sorted(grads) == sorted(ref_grads), what
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        assert scale > 1e-4, what
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=0, atol=2e-4 * scale, msg=f"{what} {name}")
        if loss == "gspo" and "context_parallel_size" in grid:
            values, ref_values = torch.cat(seen), torch.cat(ref_seen)
            assert values.numel() == ref_values.numel() > 0, what
            torch.testing.assert_close(values.sort().values, ref_values.sort().values, rtol=1e-5, atol=1e-6)
    # the losses are different losses (their gradients differ), at the reference
    first = {loss: reference[loss, "token-mean", False][1] for loss in LOSSES}
    for a, b in (("ppo", "gspo"), ("ppo", "cispo")):
        assert max(float((first[a][n] - first[b][n]).abs().max()) for n in first[a]) > 1e-5
