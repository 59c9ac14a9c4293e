"""Run micro-batches through a Megatron model with megatron-core's pipeline schedules.

One function for every trainer: the same call runs plain forward/backward (PP=1) or 1F1B
(PP>1). The caller supplies how a micro-batch enters the model and what the last stage
computes from the output; the schedule handles p2p between stages.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from engine.runtime.cp_batch import split_for_context_parallel
from models.moe_aux import router_stats_of
from models.router_replay import ROUTING_KEY, routing_replay_of

# loss_fn(output, batch) -> (loss_for_backward, metrics dict)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def packed_seq_params(batch: dict) -> PackedSeqParams | None:
    """Megatron's varlen metadata for a packed batch (``cu_seqlens`` present), else None."""
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is None:
        return None
    # Under context parallelism the global boundaries padded per sample to 2 x CP (cp_batch.py):
    # Megatron's rotary and our ring attention derive the local layout from them.
    padded = batch.get("cu_seqlens_padded")
    width = batch["input_ids"].shape[1]
    if padded is None and width > int(cu_seqlens[-1]):
        # Padding after the last sample (sequence parallel wants a multiple of TP): Megatron's thd
        # rotary splits the tokens by the boundaries, so the padding joins the last sample, at
        # its end, where causal attention keeps it out of every real token's view.
        padded = cu_seqlens.clone()
        padded[-1] = width
    cu_seqlens = (padded if padded is not None else cu_seqlens).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=padded.to(torch.int32) if padded is not None else None,
        cu_seqlens_kv_padded=padded.to(torch.int32) if padded is not None else None,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def model_forward(model, batch: dict) -> torch.Tensor:
    """Model output for a micro-batch: logits ``[b, s, vocab/TP]`` (or values) on the last stage."""
    stats = router_stats_of(model)
    if stats is not None:
        stats.begin_microbatch(batch.get("attention_mask"))  # MoE: padding is not routed load
    replay = routing_replay_of(model)
    if replay is not None:
        replay.begin_microbatch(batch.get(ROUTING_KEY))  # the engine's routing (--router_replay, the metric)
    return model(
        batch["input_ids"],
        batch["position_ids"],
        attention_mask=None,
        packed_seq_params=packed_seq_params(batch),
    )


def _max_attention_span(model) -> int | None:
    while not hasattr(model, "max_attention_span") and hasattr(model, "module"):
        model = model.module  # DDP / Float16Module wrappers
    return getattr(model, "max_attention_span", None)


def check_attention_span(batch: dict, span: int | None) -> None:
    """Refuse samples longer than the model computes exactly (Mistral's sliding window)."""
    if span is None:
        return
    cu_seqlens = batch.get("cu_seqlens")
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens is not None else batch["input_ids"].shape[1]
    if longest > span:
        raise ValueError(
            f"a sample of {longest} tokens is longer than the model's sliding attention window ({span}), which "
            f"this engine computes as full attention: cut samples with --max_len {span} (or --prompt_max_len + "
            f"--generate_max_len <= {span})"
        )


def run_microbatches(
    model,
    microbatches: Iterable[dict],
    loss_fn: LossFn,
    *,
    num_microbatches: int,
    forward_only: bool,
    seq_length: int,
    micro_batch_size: int,
) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over all micro-batches.

    Returns the metrics dicts of the last pipeline stage (empty list on other stages).
    """
    iterator = iter(microbatches)
    device = next(model.parameters()).device
    stats = router_stats_of(model)
    if stats is not None:
        stats.reset()  # routing statistics of this call only (TrainingEngine.train_step reads them)

    cp_rank, cp_size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
    span = _max_attention_span(model)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        check_attention_span(batch, span)
        batch = split_for_context_parallel(batch, cp_rank=cp_rank, cp_size=cp_size)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        output = model_forward(chunk, batch)
        return output, lambda out: loss_fn(out, batch)

    replay = routing_replay_of(model)
    # A training call: the routers keep each micro-batch's replayed routing for its activation recompute.
    with replay.recomputable(not forward_only) if replay is not None else nullcontext():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterator,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def token_mean_scale(*, num_microbatches: int, data_parallel_size: int, global_num_tokens: int) -> float:
    """Factor turning a micro-batch's summed token loss into its share of the global token mean.

    Megatron's schedule scales each micro-batch loss by ``cp_size / num_microbatches`` and DDP
    averages gradients over the ``dp x cp`` ranks; with this factor the gradient is exactly that
    of ``sum(all token losses of the step) / global_num_tokens``, whatever the layout.
    """
    return num_microbatches * data_parallel_size / max(global_num_tokens, 1)


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from TP shards, padding columns dropped."""
    return gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]


def forward_logits(model, batches: list[dict], *, vocab_size: int) -> list[torch.Tensor] | None:
    """Full logits per batch on the last stage (None elsewhere). For tests and evaluation."""

    def keep_logits(out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        return out.new_zeros(()), {"logits": gather_vocab(out, vocab_size).detach()}

    seq_length = max(b["input_ids"].shape[1] for b in batches)
    with torch.no_grad():
        results = run_microbatches(
            model, batches, keep_logits, num_microbatches=len(batches), forward_only=True,
            seq_length=seq_length, micro_batch_size=batches[0]["input_ids"].shape[0],
        )
    return [r["logits"] for r in results] if ps.is_pipeline_last_stage() else None
