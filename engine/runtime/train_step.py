"""One optimizer step over a global batch of micro-batches, for every trainer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from engine.runtime.finite import LossWatch, step_skip_cause
from engine.runtime.schedule import LossFn, run_microbatches


@dataclass
class StepResult:
    metrics: dict[str, float]  # summed over micro-batches and data-parallel ranks, then normalised
    grad_norm: float
    update_successful: bool
    skip_cause: str | None = None  # "loss" / "grad norm" when the step was skipped for non-finite values


def reduce_metrics(per_microbatch: list[dict], *, normaliser_key: str | None = None) -> dict[str, float]:
    """Sum metric tensors over micro-batches and DP ranks; broadcast them from the last stage.

    Keys ending in ``_sum`` are divided by the summed ``normaliser_key`` (e.g. a token count)
    and reported without the suffix; keys ending in ``_max`` or ``/max`` are the maximum over
    micro-batches and ranks (of values >= 0); everything else is averaged over micro-batches.
    """
    keys = sorted(per_microbatch[0]) if per_microbatch else []
    names = _broadcast_keys_from_last_stage(keys)
    maxima = {name: _max_over_ranks([float(m[name]) for m in per_microbatch])
              for name in names if name.endswith(("_max", "/max"))}
    names = [name for name in names if name not in maxima]
    values = torch.zeros(len(names) + 1, dtype=torch.float64)
    for metrics in per_microbatch:
        for i, name in enumerate(names):
            values[i] += float(metrics[name])
    values[-1] = len(per_microbatch)
    dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=True))
    # Non-last stages hold zeros: a sum over the pipeline group gives them the last stage's values.
    dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    count = max(values[-1].item(), 1.0)
    totals = dict(zip(names, values[:-1].tolist()))
    out = {}
    for name, total in totals.items():
        if name.endswith("_sum") and normaliser_key:
            out[name[: -len("_sum")]] = total / max(totals.get(normaliser_key, 0.0), 1.0)
        elif name != normaliser_key:
            out[name] = total / count
    if normaliser_key in totals:
        out[normaliser_key] = totals[normaliser_key]
    return {**out, **maxima}


def _max_over_ranks(values: list[float]) -> float:
    """The largest of ``values`` over the data / context-parallel ranks and pipeline stages (the
    stages without the value hold 0)."""
    local = torch.tensor(max(values, default=0.0), dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return float(local)


def _broadcast_keys_from_last_stage(keys: list[str]) -> list[str]:
    holder = [keys if ps.is_pipeline_last_stage() else None]
    group = ps.get_pipeline_model_parallel_group()
    last = dist.get_global_rank(group, dist.get_world_size(group) - 1)
    dist.broadcast_object_list(holder, src=last, group=group)
    return holder[0]


def train_step(
    ddp_model,
    optimizer,
    scheduler,
    microbatches: list[dict],
    loss_fn: LossFn,
    *,
    seq_length: int,
    normaliser_key: str | None = None,
) -> StepResult:
    """Zero grads, forward/backward all micro-batches (1F1B under PP), reduce, clip, step.

    A non-finite loss or gradient on any rank skips the update on every rank (grads zeroed, the LR
    schedule not advanced), as Megatron's fp16 loss scaler skips an overflow; this engine trains in
    fp32 / bf16, where megatron-core checks nothing."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    watch = LossWatch(loss_fn)
    metrics = run_microbatches(
        ddp_model,
        microbatches,
        watch,
        num_microbatches=len(microbatches),
        forward_only=False,
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["input_ids"].shape[0],
    )
    skip_cause = step_skip_cause(watch, ddp_model)
    if skip_cause is not None:
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        update_successful, grad_norm = False, float("nan")
    else:
        update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return StepResult(
        metrics=reduce_metrics(metrics, normaliser_key=normaliser_key),
        grad_norm=float(grad_norm if grad_norm is not None else 0.0),
        update_successful=bool(update_successful),
        skip_cause=skip_cause,
    )


ROUTING_KEYS = ("aux_loss", "moe/load_cv", "moe/max_expert_load")


def routing_metrics(stats, *, with_aux_loss: bool) -> dict[str, float]:
    """MoE routing metrics of the step (``models.moe_aux``): the mean over micro-batches and over
    every rank of the model (collective; a stage without MoE layers adds nothing). HF's aux loss
    pools every layer: a pipeline stage's share of it is not reported."""
    records = stats.drain() if stats is not None else []
    totals = torch.zeros(len(ROUTING_KEYS) + 1, dtype=torch.float64)
    for record in records:
        totals[:-1] += torch.tensor([record[key] for key in ROUTING_KEYS], dtype=torch.float64)
    totals[-1] = len(records)
    dist.all_reduce(totals)
    count = max(totals[-1].item(), 1.0)
    metrics = {key: totals[i].item() / count for i, key in enumerate(ROUTING_KEYS)}
    if not with_aux_loss:
        metrics.pop("aux_loss")
    return metrics
