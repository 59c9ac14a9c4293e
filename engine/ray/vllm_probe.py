"""The engine side of the mismatch doctor: per-layer hidden states and router choices of a running
vLLM model, recorded by forward hooks inside each worker (``WeightSyncExtension.start_layer_probe``).

What is recorded, in vLLM's flat ``[num_tokens, ...]`` layout (vLLM 0.32 model code, e.g.
``vllm/model_executor/models/llama.py``, ``mixtral.py``, ``qwen3_moe.py``):

* ``embedding``: the output of ``model.model.embed_tokens``.
* ``layer.i``: the residual stream after decoder layer ``i``. vLLM's decoder layers return
  ``(hidden_states, residual)`` with the last residual add deferred to the next layer's fused
  add-RMSNorm, so the stream is their sum -- taken in the hook at once, because that fused norm
  later updates both tensors in place.
* ``final_norm``: the output of ``model.model.norm`` (``(out, residual)`` when fused: ``out``).
* ``router.i``: the router logits of MoE layer ``i``: the output of the ``gate`` of every module
  that has a ``gate`` and ``experts`` (Mixtral's ``block_sparse_moe``, Qwen-MoE's ``mlp``). Which
  experts a token went to is the top-k of these logits: what vLLM's fused MoE selects for the
  softmax routers of Mixtral and Qwen-MoE (top-k of softmax(logits) = top-k of the logits).

Under vLLM tensor parallelism every TP worker holds the full hidden states after each layer
(the row-parallel outputs are all-reduced) and the replicated gate's full logits: TP rank 0 reports.
"""
from __future__ import annotations

import torch


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise RuntimeError(f"{type(model).__name__}: no model.layers; the mismatch doctor reads decoder-only "
                           "models laid out as vLLM's Llama / Qwen / Mixtral")
    return inner


def _stream(output) -> torch.Tensor:
    """The residual stream a decoder layer returns: ``hidden + residual`` (vLLM defers the add)."""
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1] if len(output) > 1 else None
        return hidden if residual is None else hidden + residual
    return output


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class LayerProbe:
    """Forward hooks on one worker's model; ``take`` hands over what the forwards since the last
    ``take`` recorded (float32, on the CPU) and starts afresh."""

    def __init__(self, model: torch.nn.Module):
        decoder = _decoder(model)
        self._records: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        self._hook(getattr(decoder, "embed_tokens", None), "embedding", _first)
        for index, layer in enumerate(decoder.layers):
            if type(layer).__name__ == "PPMissingLayer":
                continue  # another pipeline stage's layer
            self._hook(layer, f"layer.{index}", _stream)
            for module in layer.modules():
                if hasattr(module, "gate") and hasattr(module, "experts"):
                    self._hook(module.gate, f"router.{index}", _first)
                    break
        norm = getattr(decoder, "norm", None)
        if norm is not None and type(norm).__name__ != "PPMissingLayer":
            self._hook(norm, "final_norm", _first)

    def _hook(self, module, name: str, select) -> None:
        if module is None:
            return
        records = self._records.setdefault(name, [])

        def hook(_module, _inputs, output):
            records.append(select(output).detach().float().cpu())

        self._handles.append(module.register_forward_hook(hook))

    def take(self, num_tokens: int) -> dict[str, torch.Tensor]:
        """The first ``num_tokens`` tokens recorded since the last call (a prefill split into chunks
        is joined; whatever came after, a decode step or padding, is dropped)."""
        out = {}
        for name, records in self._records.items():
            if records:
                out[name] = torch.cat(records)[:num_tokens].clone()
            records.clear()
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
