"""Megatron DDP + distributed (DP-sharded) Adam + LR schedule, from one typed config."""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from engine.runtime.config import LR_SCHEDULES, OptimConfig  # noqa: F401  (declared apart: the parsers import no torch)

try:  # what megatron-core's precision-aware optimizer needs
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def wrap_ddp(model, optim: OptimConfig) -> DistributedDataParallel:
    """Megatron DDP: contiguous grad buffers, fp32 reduction, DP-sharded optimizer states."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # The schedule calls this after the last backward: DP reduction, tied-embedding and
    # sequence-parallel layernorm grad all-reduces.
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, optim: OptimConfig, *, bf16: bool = False):
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.learning_rate,
        min_lr=optim.learning_rate * optim.min_lr_ratio,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_betas[0],
        adam_beta2=optim.adam_betas[1],
        adam_eps=optim.adam_eps,
        clip_grad=optim.max_norm,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        **offload_kwargs(optim.adam_offload, cuda=torch.cuda.is_available(), transformer_engine=HAVE_TE),
    )
    optimizer = get_megatron_optimizer(config, [ddp_model], use_gloo_process_groups=torch.cuda.is_available())
    ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def offload_kwargs(adam_offload: bool, *, cuda: bool, transformer_engine: bool) -> dict:
    """``--adam_offload`` as megatron-core 0.16.1 offers it: HybridDeviceOptimizer runs AdamW on the
    host for the whole shard, its states in pinned host memory. With Transformer Engine the
    precision-aware path hands it the bf16 shards, so the fp32 master weights live on the host too
    (Megatron-LM pairs the two flags); without TE (its version check needs TE) the fp32 masters stay
    on the GPU. A CPU build keeps every optimizer state in host memory already: nothing to move."""
    if not (adam_offload and cuda):
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=1.0,
                use_precision_aware_optimizer=transformer_engine)


def build_scheduler(optimizer, optim: OptimConfig, *, total_steps: int) -> OptimizerParamScheduler:
    warmup = int(total_steps * optim.lr_warmup_ratio)
    style = LR_SCHEDULES[optim.lr_scheduler]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else optim.learning_rate,
        max_lr=optim.learning_rate,
        min_lr=optim.learning_rate * optim.min_lr_ratio if style != "constant" else optim.learning_rate,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )


def replan_scheduler(scheduler: OptimizerParamScheduler, *, samples_per_step: int, consumed_samples: int,
                     warmup_samples: int, decay_samples: int) -> None:
    """Set a schedule planned in samples in steps of ``samples_per_step`` (a resume under another
    --train_batch_size): the LR as a function of the samples trained stays that of the plan. The
    step counts may be fractional (Megatron's scheduler computes in floats)."""
    scheduler.num_steps = consumed_samples / samples_per_step
    scheduler.lr_warmup_steps = warmup_samples / samples_per_step
    scheduler.lr_decay_steps = decay_samples / samples_per_step
    scheduler.wd_incr_steps = decay_samples / samples_per_step
    scheduler.step(increment=0)  # sets the parameter groups' LR for the new count
