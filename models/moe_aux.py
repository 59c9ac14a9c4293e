"""Mixtral's load-balancing loss as HF transformers computes it (``--aux_loss_coef``), and the
routing statistics every MoE step logs.

HF's ``load_balancing_loss_func`` pools all MoE layers of one forward pass. With ``C_e`` the top-k
selections of expert ``e`` summed over layers and tokens, ``S_e`` its softmax probability summed
the same way, ``R`` = layers x tokens (padding excluded) and ``E`` experts::

    aux = E * sum_e (C_e / R) * (S_e / R)

OpenRLHF trains on ``lm_loss + aux_loss_coef * aux`` with exactly that value. Megatron's own aux
loss is a different function: per layer ``(E / k) sum_e f_e P_e``, summed over layers -- a sum of
per-layer products where HF has the product of means over layers, so no rescaled coefficient
turns one into the other. Megatron's is therefore left off and this module adds HF's: each
router records its layer's counts and probability sums (``RouterStats``); in backward, when the
counts of every layer of the micro-batch are known, the gradient of ``coef x aux`` is added to
each layer's router logits (the counts are not differentiable: ``d aux / d logits`` is
``E C / R^2`` through the softmax), scaled like the main loss (Megatron's
``MoEAuxLossAutoScaler`` scale, which its schedule sets per micro-batch). Activation recompute
re-runs the routers inside backward, which is where the gradient is then attached.

The value is per micro-batch (one HF forward); the logged ``aux_loss`` is its mean over the step's
micro-batches and data-parallel ranks, which is also how the gradients combine. Tokens split over
ranks (sequence parallelism, context parallelism) are pooled over those ranks first. Every MoE
layer must sit on one pipeline stage when the coefficient is not zero (the counts of later stages
are not known to earlier ones).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps


@dataclass
class _LayerCounts:
    counts: torch.Tensor  # [E] top-k selections, pooled over the ranks sharing the micro-batch
    prob_sum: torch.Tensor  # [E] softmax probabilities summed over tokens (detached, pooled)
    tokens: torch.Tensor  # () valid tokens (pooled)


class RouterStats:
    """The routing statistics of one model's current micro-batch, and of the finished ones."""

    def __init__(self, *, num_experts: int, topk: int, num_moe_layers: int, aux_loss_coef: float,
                 sequence_parallel: bool):
        self.num_experts, self.topk, self.num_moe_layers = num_experts, topk, num_moe_layers
        self.aux_loss_coef = aux_loss_coef
        self.sequence_parallel = sequence_parallel
        self.layers: dict[int, _LayerCounts] = {}
        self.token_mask: torch.Tensor | None = None  # [b, s] of this rank's (CP-local) micro-batch
        self.finished: list[dict[str, float]] = []

    # ----- the micro-batch life cycle (engine.runtime.schedule) ------------------------------
    def begin_microbatch(self, token_mask: torch.Tensor | None) -> None:
        """A new micro-batch starts (its backward follows before the next one: one pipeline stage)."""
        self._finish()
        self.token_mask = token_mask

    def reset(self) -> None:
        self.layers.clear()
        self.finished.clear()
        self.token_mask = None

    def drain(self) -> list[dict[str, float]]:
        """Per micro-batch since the last reset: ``aux_loss``, ``moe/load_cv``, ``moe/max_expert_load``."""
        self._finish()
        finished, self.finished = self.finished, []
        return finished

    def _finish(self) -> None:
        if not self.layers:
            return
        counts = torch.stack([layer.counts for layer in self.layers.values()])  # [L, E]
        mean = counts.mean(dim=1).clamp(min=1e-12)
        self.finished.append({
            "aux_loss": float(self.aux_value()),
            "moe/load_cv": float((counts.std(dim=1, unbiased=False) / mean).mean()),  # 0: perfectly even
            "moe/max_expert_load": float((counts.max(dim=1).values / mean).max()),  # 1: perfectly even
        })
        self.layers.clear()

    # ----- HF's value and its gradient -------------------------------------------------------
    def rows(self) -> torch.Tensor:
        return sum(layer.tokens for layer in self.layers.values()).clamp(min=1)

    def total_counts(self) -> torch.Tensor:
        return sum(layer.counts for layer in self.layers.values())

    def aux_value(self) -> torch.Tensor:
        prob_sum = sum(layer.prob_sum for layer in self.layers.values())
        return self.num_experts * (self.total_counts() * prob_sum).sum() / self.rows() ** 2

    def record(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Record a router's ``[tokens, E]`` logits; returns them, carrying the aux gradient when training."""
        valid = self._local_token_mask(logits.shape[0], logits.device)
        probs = F.softmax(logits.detach().float(), dim=-1)
        chosen = probs.topk(self.topk, dim=-1).indices.reshape(-1)
        counts = torch.zeros(self.num_experts, device=logits.device).scatter_add_(
            0, chosen, valid.repeat_interleave(self.topk))
        pooled = torch.cat([counts, (probs * valid[:, None]).sum(dim=0), valid.sum()[None]])
        group = self._pooling_group()
        if group is not None:
            dist.all_reduce(pooled, group=group)
        self.layers[layer] = _LayerCounts(pooled[:self.num_experts], pooled[self.num_experts:-1], pooled[-1])
        if self.aux_loss_coef and torch.is_grad_enabled() and logits.requires_grad:
            logits = _AuxLossGradient.apply(logits, valid, self)
        return logits

    def aux_logits_gradient(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``d (coef x aux) / d logits`` of one layer, scaled like the main loss."""
        if len(self.layers) != self.num_moe_layers:
            raise RuntimeError(f"--aux_loss_coef: {len(self.layers)} of {self.num_moe_layers} MoE layers routed "
                               "this micro-batch on this rank; the HF-style loss needs all of them on one stage")
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        counts = self.total_counts()
        probs = F.softmax(logits.float(), dim=-1)
        grad = probs * (counts - (probs * counts).sum(dim=-1, keepdim=True))
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        scale = 1.0 if scale is None else scale.to(grad.device)
        return grad * valid[:, None] * (self.aux_loss_coef * self.num_experts / self.rows() ** 2) * scale

    # ----- which tokens this rank routes ------------------------------------------------------
    def _pooling_group(self):
        return token_group(self.sequence_parallel)

    def _local_token_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """1.0 for this rank's routed tokens that are not padding, in the router's [s, b] order."""
        if self.token_mask is None:
            return torch.ones(num_tokens, device=device)
        mask = self.token_mask.to(device=device, dtype=torch.float32).transpose(0, 1)  # [s, b]
        if self.sequence_parallel:
            mask = mask.chunk(ps.get_tensor_model_parallel_world_size())[ps.get_tensor_model_parallel_rank()]
        mask = mask.reshape(-1)
        if mask.numel() != num_tokens:
            raise RuntimeError(f"router saw {num_tokens} tokens, the micro-batch's mask has {mask.numel()}")
        return mask


class _AuxLossGradient(torch.autograd.Function):
    """Identity on the router logits; backward adds the HF aux loss's gradient (``RouterStats``)."""

    @staticmethod
    def forward(ctx, logits, valid, stats):
        ctx.stats = stats
        ctx.save_for_backward(logits, valid)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        logits, valid = ctx.saved_tensors
        return grad + ctx.stats.aux_logits_gradient(logits, valid).to(grad.dtype), None, None


def _routing_with_stats(original, stats: RouterStats, layer: int, logits: torch.Tensor, *args, **kwargs):
    flat = stats.record(layer, logits.reshape(-1, stats.num_experts))
    return original(flat.view_as(logits), *args, **kwargs)


def install_router_stats(model, *, aux_loss_coef: float, num_moe_layers: int, sequence_parallel: bool) -> RouterStats | None:
    """Wrap every router of ``model`` (this rank's chunk) to record into one ``RouterStats``; None
    for a dense model. Megatron's own aux loss must be off (``moe_aux_loss_coeff=0``)."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if not routers:
        return None
    config = routers[0].config
    stats = RouterStats(num_experts=config.num_moe_experts, topk=config.moe_router_topk,
                        num_moe_layers=num_moe_layers, aux_loss_coef=aux_loss_coef,
                        sequence_parallel=sequence_parallel)
    for index, router in enumerate(routers):
        router.routing = functools.partial(_routing_with_stats, router.routing, stats, index)
    return stats


def router_stats_of(model) -> RouterStats | None:
    """The ``RouterStats`` of a built model, through DDP / Float16Module wrappers."""
    while not hasattr(model, "router_stats") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "router_stats", None)


def token_group(sequence_parallel: bool):
    """The ranks holding the other tokens of a micro-batch: TP under sequence parallelism, CP (None: alone)."""
    tp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    cp = ps.get_context_parallel_world_size()
    if tp > 1 and cp > 1:
        return ps.get_tensor_and_context_parallel_group()
    if tp > 1:
        return ps.get_tensor_model_parallel_group()
    return ps.get_context_parallel_group() if cp > 1 else None
