"""The trainer side of the mismatch doctor: per-layer hidden states and routing of this rank's
chunk of a Megatron ``GPTModel``, recorded by forward hooks during a forward-only pass.

    with MegatronLayerProbe(engine.model, sequence_parallel=..., tp_group=..., cp_group=...) as probe:
        engine.forward_outputs(microbatches, compute)
    records = probe.per_sequence(lengths)   # {name: [len, ...]} per sequence, this stage's names

Names match ``engine.ray.vllm_probe``: ``embedding`` (first stage), ``layer.i`` (``i`` the global
layer index: Megatron's 1-based ``layer_number`` already counts the stage offset, so each pipeline
stage reports its own layers), ``final_norm`` (last stage), and per MoE layer ``router.i`` (the
router logits) and ``routing.i`` (the experts it chose: Megatron's routing map, 0 / 1 per expert).

Megatron keeps activations ``[s, b, h]``: under sequence parallelism each TP rank holds ``s / tp``
of them (gathered over the TP group here), under context parallelism each CP rank its zigzag
chunks (gathered over the CP group); every rank of those groups takes part in the gathers, and
the rank at the head of both reports.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.context_parallel import zigzag_gather


class MegatronLayerProbe:
    """Forward hooks on a ``GPTModel`` chunk (unwrapped); records ``[b, s, ...]`` float32 on the CPU."""

    def __init__(self, model: torch.nn.Module, *, sequence_parallel: bool, tp_group, cp_group):
        from megatron.core.transformer.moe.router import TopKRouter

        self.sequence_parallel = sequence_parallel and dist.get_world_size(group=tp_group) > 1
        self.tp_group, self.cp_group = tp_group, cp_group
        self._records: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        if getattr(model, "pre_process", False):
            self._hook(model.embedding, "embedding", lambda inputs, output: output)
        for layer in model.decoder.layers:
            index = layer.layer_number - 1  # global: Megatron adds the pipeline stage's offset
            self._hook(layer, f"layer.{index}", lambda inputs, output: output[0])
            for module in layer.modules():
                if isinstance(module, TopKRouter):
                    self._hook_router(module, index)
        final_norm = getattr(model.decoder, "final_layernorm", None)
        if getattr(model, "post_process", False) and final_norm is not None:
            self._hook(final_norm, "final_norm", lambda inputs, output: output)

    def _hook(self, module, name: str, select) -> None:
        records = self._records.setdefault(name, [])

        def hook(_module, inputs, output):
            records.append(self._full_sequence(select(inputs, output)))

        self._handles.append(module.register_forward_hook(hook))

    def _hook_router(self, router, index: int) -> None:
        logits_records = self._records.setdefault(f"router.{index}", [])
        routing_records = self._records.setdefault(f"routing.{index}", [])

        def hook(module, inputs, output):
            hidden = inputs[0]  # [s, b, h] (s local under sequence / context parallelism)
            shape = (*hidden.shape[:2], -1)
            logits_records.append(self._full_sequence(module.gating(hidden).reshape(shape)))
            routing_records.append(self._full_sequence(output[1].reshape(shape)))

        self._handles.append(router.register_forward_hook(hook))

    def _full_sequence(self, local: torch.Tensor) -> torch.Tensor:
        """``[s_local, b, ...]`` -> ``[b, s, ...]`` of the whole sequence, float32 on the CPU."""
        local = local.detach().float()
        if self.sequence_parallel:
            pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group=self.tp_group))]
            dist.all_gather(pieces, local.contiguous(), group=self.tp_group)
            local = torch.cat(pieces)
        full = local.transpose(0, 1)
        if dist.get_world_size(group=self.cp_group) > 1:
            full = zigzag_gather(full.contiguous(), dim=1, cp_group=self.cp_group)
        return full.cpu()

    def per_sequence(self, lengths: list[int]) -> list[dict[str, torch.Tensor]]:
        """Per sequence (rows in micro-batch order), each record cut to the sequence's length."""
        joined = {name: torch.cat(records) for name, records in self._records.items() if records}
        return [{name: rows[i, :length] for name, rows in joined.items()} for i, length in enumerate(lengths)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MegatronLayerProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
