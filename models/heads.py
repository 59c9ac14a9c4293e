"""Heads the RL roles put on a decoder instead of the LM output layer."""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

VALUE_HEAD_SEED = 0


class ValueHead(torch.nn.Module):
    """Scalar per token (critic values, reward scores); exported as HF ``score.weight``.

    Stands in for ``GPTModel.output_layer`` and keeps its call signature, so Megatron's
    post-processing returns ``[batch, seq, 1]`` instead of logits. Replicated over TP: its input
    (the final hidden states, gathered over the sequence under sequence parallelism) is identical
    on every TP rank, so its gradient is too and needs no TP reduction.
    """

    def __init__(self, config, normalisation: tuple[float, float] | None = None):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        # (mean, std): outputs as (v - mean) / std, OpenRLHF's --normalize_reward for a reward model
        # or critic whose config.json holds the reward statistics its trainer measured.
        self.normalisation = normalisation
        # Its own generator: a fresh head (a critic started from a causal LM) must not depend on
        # how much of the global RNG stream this rank's layers consumed, i.e. on the PP layout.
        generator = torch.Generator().manual_seed(VALUE_HEAD_SEED)
        weight = torch.randn(1, config.hidden_size, generator=generator) / (config.hidden_size + 1) ** 0.5
        self.weight = torch.nn.Parameter(weight.to(config.params_dtype))

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None, **kwargs):
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        values = torch.nn.functional.linear(hidden_states, self.weight)
        if self.normalisation is not None:
            mean, std = self.normalisation
            values = (values - mean) / std
        return values, None


def is_value_model(model) -> bool:
    """Whether the model was built with a value head (true on every pipeline stage)."""
    return bool(getattr(model, "is_value_model", False))
