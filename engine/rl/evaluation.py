"""Evaluation during RL: held-out prompts generated with the current weights and scored by the
run's reward sources. Logged as ``eval/reward`` (mean over every response), ``eval/pass@k`` (the
fraction of prompts with at least one of their k responses rewarded above 0: what a verifiable
0 / 1 reward counts as solved), ``eval/pass@1`` (the same per response) and ``eval/response_length``."""
from __future__ import annotations

from dataclasses import dataclass

from parallel.options import option


@dataclass(kw_only=True)
class RLEvalConfig:
    eval_dataset: str | None = option(None, help="held-out prompts (sources and keys as --prompt_data), generated "
                                                 "with the current weights at --eval_steps")
    eval_steps: int = option(-1, help="evaluate every N rollouts and after the last one (-1: after the last only)")
    eval_n_samples_per_prompt: int = option(1, help="responses per eval prompt: k of eval/pass@k")
    eval_temperature: float = option(0.6, help="sampling temperature of the eval responses (0: greedy)")

    def __post_init__(self) -> None:
        if self.eval_steps == 0 or self.eval_steps < -1:
            raise ValueError(f"--eval_steps must be positive or -1 (after the last rollout), got {self.eval_steps}")
        if self.eval_n_samples_per_prompt < 1:
            raise ValueError(f"--eval_n_samples_per_prompt must be positive, got {self.eval_n_samples_per_prompt}")
        if self.eval_temperature < 0:
            raise ValueError(f"--eval_temperature must be >= 0, got {self.eval_temperature}")

    def due(self, step: int, num_steps: int) -> bool:
        """Whether to evaluate after rollout ``step`` (1-based) of ``num_steps``."""
        if not self.eval_dataset:
            return False
        return step == num_steps or (self.eval_steps > 0 and step % self.eval_steps == 0)


def pass_at_k(rewards: list[float], k: int) -> float:
    """Fraction of prompts (``k`` consecutive responses each) with a response rewarded above 0."""
    if len(rewards) % k:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {k} responses")
    groups = [rewards[i:i + k] for i in range(0, len(rewards), k)]
    return sum(any(r > 0 for r in group) for group in groups) / len(groups)


def eval_metrics(rewards: list[float], response_lengths: list[int], k: int) -> dict[str, float]:
    metrics = {"eval/reward": sum(rewards) / len(rewards), "eval/pass@1": pass_at_k(rewards, 1),
               "eval/response_length": sum(response_lengths) / len(response_lengths)}
    metrics[f"eval/pass@{k}"] = pass_at_k(rewards, k)
    return metrics
