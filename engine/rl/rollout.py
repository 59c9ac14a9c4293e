"""What the RL loop asks of generation: how to sample, what comes back, and the interface of the
rollout engines it is given (``engine.ray.rollouts.VLLMRollouts`` on a Ray cluster)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from parallel.options import option


@dataclass(kw_only=True)
class SamplingConfig:
    """How responses are sampled."""

    temperature: float = option(1.0, help="sampling temperature (0: greedy); also applied to the trainer's log-probs")
    top_p: float = option(1.0, help="nucleus sampling")
    top_k: int = option(-1, help="top-k sampling (-1: off)")
    max_new_tokens: int = option(1024, flag="generate_max_len", help="tokens per response")
    n_samples_per_prompt: int = option(1, help="responses per prompt (vLLM's n: one prefill per prompt)")
    repetition_penalty: float = option(1.0, help="vLLM's repetition penalty over prompt and response tokens "
                                                 "(1.0: none)")
    min_new_tokens: int = 0  # benchmarks force full-length responses
    seed: int | None = None  # sample j of prompt i uses seed + i * n + j: independent of engine count
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = True  # return the log-prob of every sampled token

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"--top_k must be -1 (off) or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--generate_max_len must be positive, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, --generate_max_len], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"--n_samples_per_prompt must be positive, got {self.n_samples_per_prompt}")


@dataclass(frozen=True)
class RolloutSample:
    """One generated response.

    ``loss_mask`` (one 0 / 1 per response token) and ``segments`` (``[start, stop)`` spans of the
    response the policy generated, e.g. the turns of a multi-turn sample between which the
    environment's tokens were appended) say which tokens train: a token trains when its mask is 1
    (default) and it lies in a segment (default: the whole response). The others are in the
    context of the forward passes but contribute nothing to any loss or loss normaliser.
    """

    prompt_index: int  # index into the prompt list given to ``generate``
    sample_index: int  # 0 .. n_samples_per_prompt - 1
    response_token_ids: list[int]
    logprobs: list[float] | None  # log-prob of each response token, before temperature / top-p
    # "stop" (EOS / stop token) or "length" (hit --generate_max_len); multi-turn: also "max_turns", "error"
    finish_reason: str
    loss_mask: tuple[int, ...] | None = None
    segments: tuple[tuple[int, int], ...] | None = None
    # Multi-turn rollouts (engine.rl.agents): the environment's reward of the whole trajectory, and
    # numbers about it logged as agent/<name> (turns, failures, the environment's own logs).
    reward: float | None = None
    info: dict[str, float] | None = None
    # Multi-turn: the environment's reward of each model turn (one per entry of ``segments``; their
    # sum is ``reward``), for --turn_rewards per_turn.
    turn_rewards: tuple[float, ...] | None = None
    # The experts the engine routed each token of prompt + response to, for MoE models: an int array
    # [tokens, decoder layers, top_k] (numpy), row t = the token at position t of prompt + response,
    # -1 where not recorded. Covers the tokens the engine ran forward (all but the last).
    routed_experts: object | None = field(default=None, compare=False)
    # --max_staleness: per response token, the actor updates the engine weights that sampled it held
    # (engine.rl.rollout_stream; under --partial_rollout a resumed sample holds more than one).
    token_versions: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self):
        length = len(self.response_token_ids)
        if self.loss_mask is not None and len(self.loss_mask) != length:
            raise ValueError(f"sample {self.prompt_index}/{self.sample_index}: loss_mask has {len(self.loss_mask)} "
                             f"entries for {length} response tokens")
        if self.turn_rewards is not None and len(self.turn_rewards) != len(self.segments or ()):
            raise ValueError(f"sample {self.prompt_index}/{self.sample_index}: {len(self.turn_rewards)} turn rewards "
                             f"for {len(self.segments or ())} segments (model turns)")
        for start, stop in self.segments or ():
            if not 0 <= start <= stop <= length:
                raise ValueError(f"sample {self.prompt_index}/{self.sample_index}: segment [{start}, {stop}) is not "
                                 f"inside its {length} response tokens")

    @property
    def truncated(self) -> bool:
        """The response hit --generate_max_len (the engine stopped it, not EOS / a stop token)."""
        return self.finish_reason == "length"

    def trained_tokens(self, *, mask_truncated: bool = False) -> list[float] | None:
        """Per response token, 1.0 where it trains (None: every token, the common case).
        ``mask_truncated`` (--mask_truncated_completions): none of a truncated response's."""
        if mask_truncated and self.truncated:
            return [0.0] * len(self.response_token_ids)
        if self.loss_mask is None and self.segments is None:
            return None
        mask = [float(m) for m in self.loss_mask] if self.loss_mask is not None else [1.0] * len(self.response_token_ids)
        if self.segments is not None:
            inside = [0.0] * len(mask)
            for start, stop in self.segments:
                inside[start:stop] = [1.0] * (stop - start)
            mask = [m * i for m, i in zip(mask, inside)]
        return mask


def rollout_loss_masks(samples: list[RolloutSample], *, mask_truncated: bool = False) -> list[list[float] | None] | None:
    """The per-token loss masks of ``samples`` for ``build_rollout_batch`` (None: every token trains)."""
    masks = [sample.trained_tokens(mask_truncated=mask_truncated) for sample in samples]
    return masks if any(mask is not None for mask in masks) else None


class PendingRollout(Protocol):
    def result(self) -> list[RolloutSample]:
        """Wait for the samples, ordered by (prompt, sample)."""


class RolloutEngines(Protocol):
    """The generation side of the loop."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 rows: list[dict] | None = None) -> list[RolloutSample]:
        """Every sample of every prompt, ordered by (prompt, sample). ``rows``: each prompt's row
        (``prompt`` text, ``label``), for rollouts that read them (multi-turn agents)."""

    def generate_async(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                       rows: list[dict] | None = None) -> PendingRollout:
        """Start generating with the weights the engines hold now; returns at once."""

    def release_memory(self) -> None:
        """Generation is over until the next weight sync (free accelerator memory if configured to)."""

    def sync_weights(self) -> dict:
        """Load the policy's current weights into every engine; returns metrics."""
