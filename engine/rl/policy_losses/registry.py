"""The policy losses by name (``--policy_loss_type``), veRL's ``@register_policy_loss`` style.

A loss is a small class: ``needs`` declares which inputs beyond this forward's log-probs, the
advantages and the trained-token mask it reads (from ``LOSS_INPUTS``), and the actor hands it
exactly those (the others are None in its ``PolicyLossInputs``). Shipped losses are listed in
``_SHIPPED`` (one line each: name -> the module whose ``@register_policy_loss`` defines it,
imported when the loss is first asked for); a test or a plugin registers its own with the
decorator.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

if TYPE_CHECKING:
    import torch

    from engine.rl.policy_losses.aggregation import Aggregation
    from engine.rl.train_settings import TrainSettings

LossInput = Literal["old_log_probs", "ref_log_probs", "rollout_log_probs", "values", "cp_group", "dp_group",
                    "sequence_index"]
LOSS_INPUTS: tuple[str, ...] = get_args(LossInput)

# name -> the module that registers it. Adding a shipped loss: its module, plus one line here.
_SHIPPED: dict[str, str] = {
    "ppo": "engine.rl.policy_losses.ppo",
    "gspo": "engine.rl.policy_losses.gspo",
    "cispo": "engine.rl.policy_losses.cispo",
}
_REGISTERED: dict[str, type[PolicyLoss]] = {}


@dataclass(frozen=True, kw_only=True)
class PolicyLossInputs:
    """One micro-batch as a policy loss sees it (this rank's tokens: its CP share; one packed row
    under ``--packing_samples``). Per-token tensors are ``[rows, s_local]``."""

    log_probs: torch.Tensor  # this forward's log-probs of the labels (with gradient), temperature applied
    advantages: torch.Tensor
    mask: torch.Tensor  # 1 on the trained tokens: response tokens, less those a loss mask drops
    weights: torch.Tensor  # the --loss_agg_mode token weights (``mask`` under token-mean)
    aggregation: Aggregation  # reduce per-token losses with ``aggregation.sum(loss, weights)``
    importance_weights: torch.Tensor | None = None  # --vllm_is_correction's, per token, no gradient
    # what the loss declared in ``needs`` (None otherwise)
    old_log_probs: torch.Tensor | None = None  # the sampling policy's (this forward's, detached, in one step)
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None  # the engines' own log-probs of their samples
    values: torch.Tensor | None = None  # the critic's
    cp_group: Any = None  # reduce a sequence split over context-parallel ranks (engine.runtime.per_sequence)
    dp_group: Any = None
    # which sequence each token is of and how many there are in the micro-batch
    # (engine.runtime.per_sequence.sequence_sums takes ``sequences`` as its batch)
    sequences: dict | None = None


class PolicyLoss:
    """Base of the registered losses: ``__call__`` returns ``(weighted_sum, metrics)``, where the
    weighted sum is ``inputs.aggregation.sum(...)`` of its per-token loss (the caller adds the KL
    and ptx terms and applies the step's scale) and metrics are detached tensors for
    ``reduce_metrics`` (``_sum`` keys are divided by the step's trained-token count)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: TrainSettings):
        self.settings = settings

    def __call__(self, inputs: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def register_policy_loss(name: str):
    """Class decorator: ``@register_policy_loss("gspo") class GSPOLoss(PolicyLoss): needs = ...``."""

    def register(cls: type[PolicyLoss]) -> type[PolicyLoss]:
        unknown = set(cls.needs) - set(LOSS_INPUTS)
        if unknown:
            raise ValueError(f"policy loss {name!r} needs unknown inputs {sorted(unknown)}; known: {', '.join(LOSS_INPUTS)}")
        if name in _REGISTERED and _REGISTERED[name].__qualname__ != cls.__qualname__:  # a re-import may re-register
            raise ValueError(f"policy loss {name!r} is already registered ({_REGISTERED[name].__qualname__})")
        cls.name = name
        _REGISTERED[name] = cls
        return cls

    return register


def known_policy_losses() -> list[str]:
    return sorted({*_SHIPPED, *_REGISTERED})


def check_policy_loss_name(name: str) -> None:
    """Refuse an unknown ``--policy_loss_type`` (without importing any loss)."""
    if name not in _SHIPPED and name not in _REGISTERED:
        raise ValueError(f"--policy_loss_type {name!r} is not a known policy loss: {', '.join(known_policy_losses())}")


def policy_loss_class(name: str) -> type[PolicyLoss]:
    check_policy_loss_name(name)
    if name not in _REGISTERED:
        importlib.import_module(_SHIPPED[name])
    return _REGISTERED[name]
