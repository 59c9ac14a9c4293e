"""DAPO's dynamic sampling with refill (``--dynamic_filtering``): the groups a rollout keeps.

A prompt group whose rewards are all equal has group-relative advantages of 0: it trains nothing
and dilutes the batch. Such groups (and, with ``--dynamic_filtering_reward_range LOW HIGH``,
groups whose mean reward is not strictly inside the range, as OpenRLHF filters; and groups with a
non-finite reward under ``--nonfinite_reward_policy skip``) are dropped, and the loop generates
more prompts, round after round, until ``--rollout_batch_size`` groups are kept or
``--max_num_gen_batches`` rounds are spent (then the rollout trains on the groups it has).

``KeptGroups`` gathers the kept groups of every round (their prompt rows, engine samples and
rewards) and the counts the loop logs; ``rollout`` lays them out as one rollout of at most
``target`` groups, re-indexed so that sample ``j`` of kept group ``g`` is row ``g * n + j``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

# OpenRLHF's margin inside the reward range (a mean at the bound is outside).
RANGE_EPS = 1e-6


def kept_groups(rewards: torch.Tensor, n_samples_per_prompt: int,
                reward_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Keep-mask per group (bool ``[num_groups]``): finite rewards that are not all equal, and a mean
    strictly inside ``reward_range`` when one is given."""
    if rewards.numel() % n_samples_per_prompt:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of --n_samples_per_prompt "
                         f"{n_samples_per_prompt}")
    grouped = rewards.view(-1, n_samples_per_prompt).double()
    finite = torch.isfinite(grouped).all(dim=1)
    safe = torch.where(torch.isfinite(grouped), grouped, torch.zeros_like(grouped))
    keep = finite & (safe.max(dim=1).values > safe.min(dim=1).values)
    if reward_range is not None:
        low, high = reward_range
        mean = safe.mean(dim=1)
        keep &= (mean > low + RANGE_EPS) & (mean < high - RANGE_EPS)
    return keep


@dataclass
class KeptGroups:
    """The kept groups of a rollout's generation rounds, in round order, and what was counted."""

    n_samples_per_prompt: int
    rows: list[dict] = field(default_factory=list)  # one prompt row per kept group
    samples: list = field(default_factory=list)  # engine.rl.rollout.RolloutSample, (group, sample) order
    rewards: list[torch.Tensor] = field(default_factory=list)
    num_generated: int = 0  # groups generated over all rounds
    num_rounds: int = 0
    num_nonfinite: int = 0  # samples with a non-finite reward (their groups dropped)
    reward_sum: float = 0.0  # of the finite rewards of every round (the policy's reward, before filtering)

    @property
    def num_kept(self) -> int:
        return len(self.rows)

    def add_round(self, rows: list[dict], samples: list, rewards: torch.Tensor, keep: torch.Tensor) -> None:
        """One round: ``samples`` of ``rows`` ordered by (prompt, sample), their ``rewards`` and group ``keep``."""
        n = self.n_samples_per_prompt
        if len(samples) != len(rows) * n or rewards.numel() != len(samples):
            raise ValueError(f"a round of {len(rows)} prompts returned {len(samples)} samples and {rewards.numel()} "
                             f"rewards, expected {len(rows) * n} (--n_samples_per_prompt {n})")
        self.num_rounds += 1
        self.num_generated += len(rows)
        finite = torch.isfinite(rewards)
        self.num_nonfinite += int((~finite).sum())
        self.reward_sum += float(rewards[finite].double().sum())
        for group in keep.nonzero()[:, 0].tolist():
            new_index = len(self.rows)
            self.rows.append(rows[group])
            self.samples += [dataclasses.replace(s, prompt_index=new_index) for s in samples[group * n:(group + 1) * n]]
            self.rewards.append(rewards[group * n:(group + 1) * n])

    def rollout(self, target: int) -> tuple[list[dict], list, torch.Tensor]:
        """The first ``target`` kept groups: prompt rows, samples (prompt_index into those rows), rewards."""
        n = self.n_samples_per_prompt
        num = min(target, self.num_kept)
        rewards = torch.cat(self.rewards[:num]) if num else torch.zeros(0)
        return self.rows[:num], self.samples[:num * n], rewards

    def metrics(self, target: int) -> dict[str, float]:
        kept = self.num_kept
        return {"rollout/groups_generated": self.num_generated, "rollout/groups_kept": kept,
                "rollout/groups_dropped": self.num_generated - kept, "rollout/groups_trained": min(kept, target),
                "rollout/gen_rounds": self.num_rounds,
                "rollout/generated_reward": self.reward_sum / max(self.num_generated * self.n_samples_per_prompt
                                                                  - self.num_nonfinite, 1),
                "filtered_ratio": 1.0 - kept / max(self.num_generated, 1)}
