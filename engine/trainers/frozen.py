"""A frozen Megatron model on the trainer's grid: the DPO / KTO reference, the KD teacher.

Same TP / PP / CP layout as the trained model (so its micro-batches split the same way), loaded
from HF, no optimizer, no DDP, forward only. With ``offload`` its weights wait in host memory
between uses (``--ref_offload``): on GPU that frees the device memory for the trained model's
activations; on CPU there is nothing to move.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import torch
from megatron.core import parallel_state as ps

from engine.runtime.schedule import run_microbatches
from models.builder import build_model
from models.registry import load_adapter
from models.weights import load_hf_weights


class FrozenModel:
    def __init__(self, hf_path: str, engine, *, role: str, offload: bool = False, value_head: bool = False):
        self.adapter = load_adapter(hf_path)
        if self.adapter.vocab_size != engine.vocab_size:
            raise ValueError(f"{role} {hf_path} has a vocabulary of {self.adapter.vocab_size} tokens, the trained "
                             f"model {engine.vocab_size}: the two must share a tokenizer")
        build = replace(engine.config.build, value_head=value_head, recompute_granularity=None)
        self.model = build_model(self.adapter, engine.config.parallel, build)
        load_hf_weights(self.model, self.adapter, hf_path, progress=engine.is_rank_zero)
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.offload = offload and self.device.type == "cuda"
        if self.offload:
            self.model.to("cpu")

    @contextmanager
    def _on_device(self):
        if self.offload:
            self.model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.model.to("cpu")
                torch.cuda.empty_cache()

    @torch.no_grad()
    def run(self, microbatches: list[dict], compute: Callable[[torch.Tensor, dict], torch.Tensor]) -> list[torch.Tensor]:
        """``compute(output, micro_batch)`` per micro-batch, on the last pipeline stage ([] elsewhere)."""

        def keep(out: torch.Tensor, batch: dict):
            return out.new_zeros(()), {"out": compute(out, batch)}

        with self._on_device():
            results = run_microbatches(
                self.model, microbatches, keep, num_microbatches=len(microbatches), forward_only=True,
                seq_length=max(b["input_ids"].shape[1] for b in microbatches),
                micro_batch_size=microbatches[0]["input_ids"].shape[0],
            )
        return [r["out"] for r in results] if ps.is_pipeline_last_stage() else []
