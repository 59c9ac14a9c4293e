"""Router replay: route each token to the experts the rollout engine routed it to, and measure how
often the trainer's own routing differs from the engine's.

The routing record of a batch (``routed_experts``, ``[b, s, num_layers, top_k]`` int) sits beside
its tokens, with each entry **one more than the expert id** and 0 where nothing was recorded
(padding, the last token of a sample, which no engine forward ever read, a prompt prefix served
from a prefix cache, pretraining rows). Zero is also what every padding / packing / mixing step
of the batch pipeline fills in, so the record survives them with no special case. Layer ``l`` of
the record is decoder layer ``l`` (0-based, dense layers of a mixed model are never read).

Megatron-core 0.16.1 carries routing replay (``TransformerConfig.moe_enable_routing_replay``,
``transformer/moe/router_replay.py``): each ``TopKRouter`` gets a ``RouterReplay`` whose
``get_replay_topk`` replaces the top-k of ``topk_routing_with_score_function`` (the replayed
indices' scores gathered, so the gate weights and their gradient stay the router's own). Two
adaptations, both here:

* ``TokenReplay`` (a ``RouterReplay``) replays the recorded tokens and lets the router choose for
  the unrecorded ones (Megatron's replays all tokens or none), and keeps the router's own choice
  as well, for the mismatch metric, in the same forward pass.
* Megatron's class-level ``global_router_replay_instances`` collects every router of every model
  built in the process and addresses them by position (the actor and a reference model in one
  process would share it): each model keeps its own ``RoutingReplay`` and the routers are taken
  out of that list.

Activation recompute (``--gradient_checkpointing``, ``--recompute_granularity full``) runs a
checkpointed layer's router again inside backward. Under 1F1B the forwards of later micro-batches
run before that backward, so the targets set last are another micro-batch's. Megatron's answer is
``REPLAY_BACKWARD``: a per-router FIFO (``replay_backward_list``) that each forward appends to and
each recompute pops, in order, since a stage runs its backwards in its forwards' order (veRL
switches the action by hand around backward). Here the switch is automatic: a router forward that
runs inside the autograd engine's backward is a recompute and pops the oldest targets (and with
them the unrecorded-token rows, -1); any other forward of a training call (``recomputable``)
appends its own. The recompute leaves the mismatch counts alone: its routing is the forward's.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router_replay import RouterReplay

from models.moe_aux import token_group

ROUTING_KEY = "routed_experts"  # the batch / Experience field


def _recomputing() -> bool:
    """A forward run by the autograd engine, i.e. inside backward: an activation recompute (Megatron's
    ``CheckpointFunction``, Transformer Engine's or torch's checkpoint alike). The engine's current
    graph task is -1 everywhere outside a backward."""
    return torch._C._current_graph_task_id() != -1


class TokenReplay(RouterReplay):
    """One router's replay: ``targets`` ``[tokens, k]`` expert ids (-1 rows: the router chooses)."""

    def __init__(self):  # no super().__init__: it registers into Megatron's process-wide list
        self.target_topk_idx = None
        self.recorded_topk_idx = None
        self.router_replay_action = None
        # The targets of this call's forwards not yet recomputed, oldest first (Megatron's REPLAY_BACKWARD
        # list); None: not a training call, the forwards keep nothing.
        self.replay_backward_list: list | None = None
        self.chosen: torch.Tensor | None = None  # what the router would pick on its own [tokens, k]

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        targets = self._targets_of_this_forward()
        if not _recomputing():
            self.chosen = indices.detach()  # the metric: once per micro-batch, from its first forward
        if targets is None:
            return probs, indices
        targets = targets.to(indices.device)
        if targets.shape != indices.shape:
            raise RuntimeError(f"router replay: {tuple(targets.shape)} recorded experts for a router routing "
                               f"{tuple(indices.shape)}")
        recorded = (targets >= 0).all(dim=-1, keepdim=True)
        indices = torch.where(recorded, targets.long(), indices)
        # The router's own scores at the replayed experts (what Megatron's REPLAY_FORWARD returns).
        return scores.gather(1, indices), indices

    def _targets_of_this_forward(self) -> torch.Tensor | None:
        """A recompute: the targets of the oldest forward not yet recomputed; a forward: the micro-batch's,
        kept for its recompute in a training call."""
        if _recomputing() and self.replay_backward_list is not None:  # None: a backward outside run_microbatches
            if not self.replay_backward_list:
                raise RuntimeError("router replay: a router recomputed inside backward with no forward of "
                                   "this training call left to replay")
            return self.replay_backward_list.pop(0)
        if self.replay_backward_list is not None:
            self.replay_backward_list.append(self.target_topk_idx)
        return self.target_topk_idx


@dataclass
class _Microbatch:
    differs: torch.Tensor  # [tokens] bool: the router's own choice differs from the record in some local layer
    recorded: torch.Tensor  # [tokens] bool: the record has this token


@dataclass
class RoutingReplay:
    """The replay of one model chunk's routers (this pipeline stage's), and the mismatch counts."""

    routers: list  # (decoder layer index, TokenReplay), this stage's MoE layers
    sequence_parallel: bool
    replay: bool = False  # route recorded tokens as recorded (--router_replay, actor)
    measure: bool = False  # count tokens whose own routing differs from the record
    _current: tuple | None = None  # (record [s*b, layers, k] in the router's token order, recorded mask)
    _finished: list[_Microbatch] = field(default_factory=list)

    def begin_microbatch(self, routed_experts: torch.Tensor | None) -> None:
        """Before a micro-batch's forward on this stage: its (CP-local) record ``[b, s, L, k]``, or None."""
        self._finish()
        if routed_experts is None or not (self.replay or self.measure):
            self._set_targets(None)
            return
        record = self._router_order(routed_experts)  # [tokens, L, k], entries = expert + 1
        recorded = (record > 0).all(dim=-1).any(dim=-1)
        self._current = (record, recorded)
        self._set_targets(record if self.replay else None)

    def _router_order(self, routed_experts: torch.Tensor) -> torch.Tensor:
        """``[b, s, L, k]`` -> the router's ``[s * b]`` token order (this rank's sequence chunk)."""
        record = routed_experts.transpose(0, 1)  # [s, b, L, k]
        if self.sequence_parallel:
            tp = ps.get_tensor_model_parallel_world_size()
            record = record.chunk(tp)[ps.get_tensor_model_parallel_rank()]
        return record.reshape(-1, *record.shape[2:])

    def _set_targets(self, record: torch.Tensor | None) -> None:
        for layer, router in self.routers:
            router.chosen = None
            if record is None:
                router.target_topk_idx = None
                continue
            if layer >= record.shape[1]:
                raise RuntimeError(f"router replay: the routing record has {record.shape[1]} layers, this model's "
                                   f"MoE layer {layer} is not among them")
            router.target_topk_idx = record[:, layer].long() - 1

    def _finish(self) -> None:
        if self._current is None:
            return
        record, recorded = self._current
        self._current = None
        differs = torch.zeros_like(recorded)
        for layer, router in self.routers:
            if router.chosen is None:
                continue  # the forward stopped before this layer (or never ran)
            own = router.chosen.sort(dim=-1).values.to(record.device)
            engine = (record[:, layer].long() - 1).sort(dim=-1).values
            differs |= (own != engine).any(dim=-1) & recorded
            router.chosen = None
        self._finished.append(_Microbatch(differs.cpu(), recorded.cpu()))

    @contextmanager
    def recomputable(self, training: bool):
        """Around one call's forwards and backwards (``schedule.run_microbatches``): in a training call
        each router forward keeps its targets for its recompute in backward; after it none are left."""
        for _, router in self.routers:
            router.replay_backward_list = [] if training else None
        try:
            yield
        finally:
            for _, router in self.routers:
                router.replay_backward_list = None  # layers not recomputed (--recompute_num_layers) kept theirs

    def clear(self) -> None:
        """Forget targets and counts (before a new call's forwards)."""
        self._current = None
        self._finished.clear()
        self._set_targets(None)

    def drain_counts(self, *, dp_group) -> dict[str, float]:
        """``{"routing_mismatch_tokens", "routing_recorded_tokens"}`` of the forwards since ``clear``,
        summed over every rank of the model's world (collective: every rank calls it once)."""
        self._finish()
        self._set_targets(None)
        pp_group = ps.get_pipeline_model_parallel_group()
        differs, recorded = 0, 0
        for micro in self._finished:
            flags = micro.differs.to(torch.int32)
            if ps.get_pipeline_model_parallel_world_size() > 1:  # a token differs if it does on any stage
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pp_group)
            differs += int(flags.sum())
            recorded += int(micro.recorded.sum())
        self._finished.clear()
        counts = torch.tensor([differs, recorded], dtype=torch.float64)
        for group in (self._token_group(), dp_group):
            if group is not None:
                dist.all_reduce(counts, group=group)
        return {"routing_mismatch_tokens": float(counts[0]), "routing_recorded_tokens": float(counts[1])}

    def _token_group(self):
        return token_group(self.sequence_parallel)


def install_routing_replay(model, *, sequence_parallel: bool) -> RoutingReplay | None:
    """Give every router of ``model`` (built with ``moe_enable_routing_replay``) a ``TokenReplay``;
    None for a dense model."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if not routers:
        return None
    replays = []
    for router in routers:
        if router.router_replay is not None and router.router_replay in RouterReplay.global_router_replay_instances:
            RouterReplay.global_router_replay_instances.remove(router.router_replay)
        router.router_replay = TokenReplay()
        replays.append((router.layer_number - 1, router.router_replay))  # Megatron's layer_number: global, 1-based
    return RoutingReplay(routers=replays, sequence_parallel=sequence_parallel)


def routing_replay_of(model) -> RoutingReplay | None:
    """The ``RoutingReplay`` of a built model, through DDP / Float16Module wrappers."""
    while not hasattr(model, "routing_replay") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "routing_replay", None)
