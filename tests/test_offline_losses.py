"""Offline trainer losses (engine/trainers/losses.py) against their formulas written out."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from engine.trainers.losses import (
    dpo_loss,
    kd_loss,
    kto_kl_estimate,
    kto_loss,
    log_probs_from_logits,
    pairwise_rm_loss,
    prm_loss,
    sequence_log_probs,
)

B, T, V = 4, 5, 7


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=1e-5)


def _log_softmax(row: list[float]) -> list[float]:
    top = max(v for v in row if v != float("-inf"))
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


# ------------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("temperature,chunk_rows", [(1.0, 1024), (0.7, 3)])
def test_log_probs_from_logits_matches_log_softmax(temperature, chunk_rows):
    logits = _randn(B, T, V, seed=1) * 4
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    original = logits.clone()
    out = log_probs_from_logits(logits, labels, temperature=temperature, chunk_rows=chunk_rows)
    expected = [[_log_softmax([v / temperature for v in logits[i, t].tolist()])[labels[i, t]] for t in range(T)]
                for i in range(B)]
    _assert_close(out, expected)
    assert torch.equal(logits, original)  # the temperature is not applied in place


def test_log_probs_from_logits_gradient_bf16_and_ignore_index():
    logits = _randn(B, T, V, seed=3).float().requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    log_probs_from_logits(logits, labels, chunk_rows=2).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    torch.log_softmax(reference, -1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    _assert_close(logits.grad, reference.grad)
    # bf16 logits are upcast: the result is float32 and close to the float32 computation.
    bf16 = log_probs_from_logits(logits.detach().bfloat16(), labels)
    assert bf16.dtype == torch.float32
    _assert_close(bf16, log_probs_from_logits(logits.detach().bfloat16().float(), labels))
    labels[0, :2] = -100
    out = log_probs_from_logits(logits.detach(), labels)
    assert out[0, :2].tolist() == [0.0, 0.0] and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="labels"):
        log_probs_from_logits(logits, labels[:, :-1])


def test_sequence_log_probs_sum_and_average():
    token_log_probs = -_randn(B, T, seed=5).abs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    rows = [[token_log_probs[i, t].item() for t in range(T) if mask[i, t]] for i in range(B)]
    _assert_close(sequence_log_probs(token_log_probs, mask), [sum(row) for row in rows])
    _assert_close(sequence_log_probs(token_log_probs, mask, average=True),
                  [statistics.fmean(row) if row else 0.0 for row in rows])
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_log_probs(token_log_probs, mask[:, :-1])


# ----------------------------------------------------------------------- preference losses

def test_pairwise_rm_loss_with_and_without_margin():
    chosen, rejected, margin = _randn(8, seed=6), _randn(8, seed=7), _randn(8, seed=8).abs()
    _assert_close(pairwise_rm_loss(chosen, rejected),
                  statistics.fmean(-_log_sigmoid(c - r) for c, r in zip(chosen.tolist(), rejected.tolist())))
    _assert_close(pairwise_rm_loss(chosen, rejected, margin),
                  statistics.fmean(-_log_sigmoid(c - r - m)
                                   for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())))


def _preference_batch():
    return [_randn(8, seed=s) * 5 - 20 for s in (9, 10, 11, 12)]


@pytest.mark.parametrize("variant", ["dpo", "cdpo", "ipo"])
def test_dpo_family_matches_formulas(variant):
    beta, eps = 0.1, 0.1
    pc, pr, rc, rr = _preference_batch()
    kwargs = {"dpo": {}, "cdpo": {"label_smoothing": eps}, "ipo": {"ipo": True}}[variant]
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, **kwargs)
    losses = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - b) - (c - d)
        if variant == "dpo":
            losses.append(-_log_sigmoid(beta * h))
        elif variant == "cdpo":
            losses.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
    _assert_close(loss, statistics.fmean(losses))
    _assert_close(chosen_rewards, [beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist())])
    _assert_close(rejected_rewards, [beta * (b - d) for b, d in zip(pr.tolist(), rr.tolist())])


def test_dpo_gradient_flows_to_policy_only_and_validates():
    pc, pr, rc, rr = _preference_batch()
    pc.requires_grad_()
    loss, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    assert pc.grad is not None and not chosen_rewards.requires_grad
    for kwargs, flag in [(dict(beta=0.0), "--beta"), (dict(beta=0.1, label_smoothing=0.5), "--label_smoothing"),
                         (dict(beta=0.1, label_smoothing=0.1, ipo=True), "--ipo")]:
        with pytest.raises(ValueError, match=flag):
            dpo_loss(pc, pr, rc, rr, **kwargs)


@pytest.mark.parametrize("kl_shift", [0.0, -50.0])  # the second makes the KL estimate negative: clamped
def test_kto_matches_formula(kl_shift):
    beta, w_d, w_u = 0.2, 1.0, 1.5
    policy, ref = _randn(8, seed=13) - 10, _randn(8, seed=14) - 10
    policy_kl, ref_kl = _randn(8, seed=15) - 10 + kl_shift, _randn(8, seed=16) - 10
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    kl = kto_kl_estimate(policy_kl, ref_kl)
    _assert_close(kl, statistics.fmean(a - b for a, b in zip(policy_kl.tolist(), ref_kl.tolist())))
    policy.requires_grad_()
    loss, chosen_rewards, rejected_rewards, z = kto_loss(policy, ref, desirable, kl=kl, beta=beta,
                                                         desirable_weight=w_d, undesirable_weight=w_u)
    z_expected = max(kl.item(), 0.0)
    losses, chosen, rejected = [], [], []
    for p, r, good in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
        h = p - r
        if good:
            losses.append(w_d * (1 - _sigmoid(beta * (h - z_expected))))
            chosen.append(beta * h)
        else:
            losses.append(w_u * (1 - _sigmoid(beta * (z_expected - h))))
            rejected.append(beta * h)
    _assert_close(loss, statistics.fmean(losses))
    _assert_close(z, z_expected)
    _assert_close(chosen_rewards, chosen)
    _assert_close(rejected_rewards, rejected)
    loss.backward()
    assert torch.isfinite(policy.grad).all()


def test_kto_reference_point_gets_no_gradient_and_validates():
    policy_kl = torch.zeros(4, requires_grad=True)
    kl = kto_kl_estimate(policy_kl + 1.0, torch.zeros(4))
    assert not kl.requires_grad
    policy = torch.zeros(4, requires_grad=True)
    desirable = torch.tensor([True, False, True, False])
    kto_loss(policy, torch.zeros(4), desirable, kl=policy_kl.sum(), beta=0.1)[0].backward()
    assert policy_kl.grad is None
    with pytest.raises(ValueError, match="--beta"):
        kto_loss(policy, torch.zeros(4), desirable, kl=kl, beta=-1.0)
    with pytest.raises(ValueError, match="--undesirable_weight"):
        kto_loss(policy, torch.zeros(4), desirable, kl=kl, beta=0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="is_desirable"):
        kto_loss(policy, torch.zeros(4), desirable[:3], kl=kl, beta=0.1)


# ---------------------------------------------------------------------- process reward model

STEPS, PLUS, MINUS = 6, 3, 5


def test_prm_hard_labels_over_reward_tokens_and_whole_vocab():
    logits = _randn(STEPS, V, seed=17) * 2
    labels = torch.tensor([PLUS, MINUS, PLUS, PLUS, MINUS, MINUS])
    loss, accuracy = prm_loss(logits, labels, reward_token_ids=[PLUS, MINUS])
    restricted = [_log_softmax([row[PLUS], row[MINUS]]) for row in logits.tolist()]
    targets = [0 if label == PLUS else 1 for label in labels.tolist()]
    _assert_close(loss, statistics.fmean(-lp[k] for lp, k in zip(restricted, targets)))
    _assert_close(accuracy, statistics.fmean(float(max(range(2), key=lambda j: lp[j]) == k)
                                             for lp, k in zip(restricted, targets)))
    loss, accuracy = prm_loss(logits, labels)
    full = [_log_softmax(row) for row in logits.tolist()]
    _assert_close(loss, statistics.fmean(-lp[k] for lp, k in zip(full, labels.tolist())))
    _assert_close(accuracy, statistics.fmean(float(max(range(V), key=lambda j: lp[j]) == k)
                                             for lp, k in zip(full, labels.tolist())))


def test_prm_soft_labels():
    logits = _randn(STEPS, V, seed=18) * 2
    probs = torch.tensor([1.0, 0.0, 0.3, 0.8, 0.5, 0.1])
    loss, accuracy = prm_loss(logits, probs, reward_token_ids=[PLUS, MINUS])
    expected, correct = [], []
    for row, p in zip(logits.tolist(), probs.tolist()):
        lp = _log_softmax([row[PLUS], row[MINUS]])
        expected.append(-(p * lp[0] + (1 - p) * lp[1]))
        correct.append(float((lp[0] >= lp[1]) == (p >= 1 - p)))
    _assert_close(loss, statistics.fmean(expected))
    _assert_close(accuracy, statistics.fmean(correct))


def test_prm_errors_and_empty_steps():
    logits = _randn(STEPS, V, seed=19)
    with pytest.raises(ValueError, match=r"step labels \[6\] are not among the --reward_tokens"):
        prm_loss(logits, torch.tensor([PLUS, 6, MINUS, PLUS, PLUS, PLUS]), reward_token_ids=[PLUS, MINUS])
    with pytest.raises(ValueError, match="exactly two --reward_tokens"):
        prm_loss(logits, torch.rand(STEPS), reward_token_ids=[PLUS])
    with pytest.raises(ValueError, match="num_steps"):
        prm_loss(logits, torch.zeros(STEPS - 1, dtype=torch.long))
    empty = torch.zeros(0, V, requires_grad=True)
    loss, accuracy = prm_loss(empty, torch.zeros(0, dtype=torch.long), reward_token_ids=[PLUS, MINUS])
    loss.backward()
    assert loss.item() == 0.0 and accuracy.item() == 0.0 and empty.grad is not None


# ----------------------------------------------------------------------- distillation

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_matches_formula(temperature):
    student, teacher = _randn(B, T, V, seed=20) * 2, _randn(B, T, V, seed=21) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    per_token = []
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                log_p_teacher = _log_softmax([v / temperature for v in teacher[i, t].tolist()])
                log_p_student = _log_softmax([v / temperature for v in student[i, t].tolist()])
                per_token.append(-sum(math.exp(a) * b for a, b in zip(log_p_teacher, log_p_student)))
    _assert_close(kd_loss(student, teacher, mask, temperature=temperature), statistics.fmean(per_token))
    _assert_close(kd_loss(student, teacher, mask, temperature=temperature, normaliser=100.0), sum(per_token) / 100.0)


def test_kd_loss_edge_cases():
    student = _randn(1, 2, V, seed=22).requires_grad_()
    teacher = _randn(1, 2, V, seed=23)
    mask = torch.ones(1, 2)
    padded = student.detach().clone()
    padded[..., -1] = float("-inf")  # a masked vocabulary entry: left out, finite loss and gradient
    padded.requires_grad_()
    loss = kd_loss(padded, teacher, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(padded.grad).all()
    # The loss is minimal (the teacher's entropy) when the student equals the teacher.
    assert kd_loss(teacher, teacher, mask) < kd_loss(student.detach(), teacher, mask)
    assert kd_loss(student, teacher, torch.zeros(1, 2)).item() == 0.0
    with pytest.raises(ValueError, match="share a vocabulary"):
        kd_loss(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match="--temperature"):
        kd_loss(student, teacher, mask, temperature=0.0)
