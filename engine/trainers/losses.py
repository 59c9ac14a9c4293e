"""Losses of the offline trainers: reward model, DPO / IPO / cDPO, KTO, process reward model
and knowledge distillation, with the log-prob helpers they share.

Pure tensor math (torch only), batch-first. Sequence log-probs are sums (or means) of token
log-probs over a ``loss_mask`` of response tokens; labels are already aligned with the logits
(``labels[t]`` is the token predicted at position ``t``, see ``engine.data.collate``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.runtime.reductions import aggregate_loss, masked_mean

# ------------------------------------------------------------------------------- log-probs

def log_probs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., labels]`` for logits ``[..., vocab]`` and labels
    ``[...]``, computed in float32 as ``logit[label] - logsumexp(logits)``.

    Memory-sane: no full log-softmax is materialised, and the logsumexp runs over ``chunk_rows``
    rows at a time, so the transient float32 buffers are ``chunk_rows x vocab``, not the whole
    batch (the input is never modified in place, unlike OpenRLHF's temperature division).
    Negative labels (ignore index) give 0; mask them out of any loss.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without the vocab dim")
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_labels = labels.reshape(-1)
    ignored = flat_labels < 0
    flat_labels = flat_labels.masked_fill(ignored, 0)
    pieces = []
    for start in range(0, flat_logits.size(0), chunk_rows):
        chunk = flat_logits[start:start + chunk_rows].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, flat_labels[start:start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    token_log_probs = torch.cat(pieces) if pieces else flat_logits.new_zeros(0, dtype=torch.float32)
    return token_log_probs.masked_fill(ignored, 0.0).view(labels.shape)


def sequence_log_probs(
    token_log_probs: torch.Tensor, loss_mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Per-sequence log-prob ``[batch]``: the sum over ``loss_mask`` (``average=True``: the mean,
    as IPO / SimPO-style length normalisation; 0 for a row without any masked-in token)."""
    if token_log_probs.shape != loss_mask.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must match token_log_probs "
                         f"{tuple(token_log_probs.shape)}")
    if average:
        return masked_mean(token_log_probs, loss_mask, dim=-1)
    return (token_log_probs * loss_mask.to(token_log_probs.dtype)).sum(dim=-1)


# ----------------------------------------------------------------------- preference losses

def pairwise_rm_loss(
    chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry reward model loss ``mean(-logsigmoid(chosen - rejected - margin))``."""
    difference = chosen_reward - rejected_reward
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"--beta must be > 0, got {beta}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its variants on sequence log-probs ``[batch]``; ``(loss, chosen_rewards,
    rejected_rewards)`` with the implicit rewards ``beta * (policy - ref)`` detached.

    With ``h = (pi_c - pi_r) - (ref_c - ref_r)``: DPO ``-logsigmoid(beta h)``; cDPO
    (``label_smoothing`` = eps, the assumed label-flip rate) ``-(1-eps) logsigmoid(beta h) -
    eps logsigmoid(-beta h)``; IPO ``(h - 1/(2 beta))^2``.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if ipo and label_smoothing > 0:
        raise ValueError("--label_smoothing (cDPO) does not apply with --ipo")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if ipo:
        losses = (logits - 1.0 / (2.0 * beta)).square()  # Eq. 17 of arXiv:2310.12036
    else:
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the detached mean of ``policy - ref`` log-probs over mismatched
    (prompt, other sample's completion) pairs. Average it over data-parallel ranks before
    ``kto_loss`` (which clamps it at 0), as OpenRLHF all-reduces it."""
    return (policy_kl_logps - ref_kl_logps).detach().float().mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    *,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO loss (Ethayarajh et al. 2024) on unpaired sequence log-probs ``[batch]``.

    With ``z = max(kl, 0)`` (from ``kto_kl_estimate``) and ``h = policy - ref``: desirable samples
    lose ``desirable_weight * (1 - sigmoid(beta (h - z)))``, undesirable ones
    ``undesirable_weight * (1 - sigmoid(beta (z - h)))``; the loss is the mean over all samples.
    Returns ``(loss, chosen_rewards, rejected_rewards, kl)``: the detached implicit rewards
    ``beta * h`` of the desirable / undesirable samples, and the clamped ``z``.
    """
    _check_beta(beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"--desirable_weight and --undesirable_weight must be >= 0, "
                         f"got {desirable_weight} and {undesirable_weight}")
    if is_desirable.shape != policy_logps.shape or ref_logps.shape != policy_logps.shape:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and "
                         f"is_desirable {tuple(is_desirable.shape)} must all be [batch]")
    desirable = is_desirable.bool()
    z = kl.detach().clamp(min=0)  # the reference point gets no gradient (KTO, Sec. 4.1)
    log_ratio = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - log_ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * log_ratio.detach()
    return losses.mean(), rewards[desirable], rewards[~desirable], z


# ---------------------------------------------------------------------- process reward model

def _reward_token_index(step_labels: torch.Tensor, reward_token_ids: torch.Tensor) -> torch.Tensor:
    """Position of every hard label in ``reward_token_ids`` (ValueError if one is not there)."""
    matches = step_labels.unsqueeze(-1) == reward_token_ids
    if not bool(matches.any(dim=-1).all()):
        unknown = sorted(set(step_labels[~matches.any(dim=-1)].tolist()))
        raise ValueError(f"step labels {unknown} are not among the --reward_tokens ids {reward_token_ids.tolist()}")
    return matches.long().argmax(dim=-1)


def prm_loss(
    logits_at_placeholders: torch.Tensor,
    step_labels: torch.Tensor,
    *,
    reward_token_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Process reward model loss: cross-entropy at the step placeholders, ``(loss, accuracy)``.

    ``logits_at_placeholders`` is ``[num_steps, vocab]``. Hard labels (integer token ids): the
    cross-entropy over ``reward_token_ids`` only when given (else over the whole vocabulary).
    Soft labels (floats): the probability of the first of exactly two ``reward_token_ids``
    (e.g. "+", then "-"), trained with the soft-target cross-entropy. Both are means over steps;
    no steps gives a zero loss that still has a gradient (a pipeline stage must run backward).
    """
    if logits_at_placeholders.dim() != 2 or step_labels.shape != logits_at_placeholders.shape[:1]:
        raise ValueError(f"expected logits [num_steps, vocab] and step_labels [num_steps], got "
                         f"{tuple(logits_at_placeholders.shape)} and {tuple(step_labels.shape)}")
    logits = logits_at_placeholders.float()
    if step_labels.numel() == 0:
        return logits.sum() * 0.0, logits.new_zeros(())
    ids = None if reward_token_ids is None else torch.as_tensor(list(reward_token_ids), device=logits.device)
    if step_labels.is_floating_point():
        if ids is None or ids.numel() != 2:
            raise ValueError("soft (numeric) step labels need exactly two --reward_tokens: positive, then negative")
        logits = logits[:, ids]
        target = torch.stack([step_labels.float(), 1.0 - step_labels.float()], dim=-1)
        loss = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        targets = target.argmax(dim=-1)
    else:
        targets = step_labels.long()
        if ids is not None:
            logits = logits[:, ids]
            targets = _reward_token_index(targets, ids)
        loss = F.cross_entropy(logits, targets)
    accuracy = (logits.argmax(dim=-1) == targets).float().mean().detach()
    return loss, accuracy


# ----------------------------------------------------------------------- distillation

def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge distillation loss ``-sum_v p_teacher(v) log p_student(v)`` per token (forward
    KL up to the teacher's entropy), token mean over ``loss_mask`` like OpenRLHF's KDLoss.

    Both logits are divided by ``temperature`` (no T^2 rescaling). Vocab entries where the
    student logit is infinite (masked vocabulary padding) are left out, as in OpenRLHF.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models must share a vocabulary")
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # Zero the log (not the product) at excluded entries: 0 * -inf would be NaN.
    student_log_probs = student_log_probs.masked_fill(torch.isinf(student_logits), 0.0)
    cross_entropy = -(teacher_probs * student_log_probs).sum(dim=-1)
    return aggregate_loss(cross_entropy, loss_mask, normaliser=normaliser)
