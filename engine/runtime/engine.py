"""The training engine every trainer shares: a Megatron model on the parallel grid with its
optimizer, LR schedule, checkpoints and HF export.

    engine = TrainingEngine(EngineConfig(pretrain=..., parallel=..., optim=...), total_steps=100)
    result = engine.train_step(microbatches, loss_fn)
    engine.save_checkpoint(ckpt, step, trainer_state); engine.save_hf(path)

    reference = frozen_copy(engine, ref_path, role="--ref_pretrain", offload=True)
    log_probs = reference.forward_outputs(microbatches, compute)   # forward only, last stage

A frozen engine (``trainable=False``) has no DDP, optimizer or schedule; with ``offload`` its
weights wait in host memory except inside ``forward_outputs`` (on GPU; a CPU build has nothing
to move). The RL role workers and the offline trainers' reference / teacher are such engines.
A trainable engine can park its weights, gradients and optimizer state in host memory while
colocated vLLM engines generate (``park_training_state``); whatever needs them brings them back.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from engine.runtime.async_checkpoint import BackgroundWriter
from engine.runtime.checkpoint import (
    CheckpointConfig,
    load_training_checkpoint,
    resume_directory,
    save_training_checkpoint,
)
from engine.runtime.config import EngineConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.runtime.ema import EMA_CHECKPOINT_KEY, EmaModel
from engine.runtime.finite import SkippedSteps, check_finite_weights
from engine.runtime.offload import PARTS, TrainingStateOffloader
from engine.runtime.optimizer import build_optimizer, build_scheduler, wrap_ddp
from engine.runtime.schedule import LossFn, run_microbatches, token_mean_scale
from engine.runtime.train_step import StepResult, reduce_metrics, routing_metrics, train_step
from models.builder import NO_RECOMPUTE, build_model
from models.lora import LoraConfig, adapters_disabled
from models.lora.export import save_peft_adapter
from models.sources import ModelSource
from models.weights import save_hf_checkpoint
from parallel.context_parallel import zigzag_gather, zigzag_gather_packed
from parallel.initialize import initialize_parallel


class TrainingEngine:
    """One role's model, trainable or frozen, on this process's slot of the TP/PP/CP/EP/DP grid."""

    def __init__(self, config: EngineConfig, *, total_steps: int = 1, trainable: bool = True,
                 load_weights: bool = True, offload: bool = False, ctx=None, ema_beta: float | None = None):
        """``ctx``: the parallel context of an engine already on this grid (a frozen copy shares it).
        ``ema_beta``: keep an EMA of the weights (``engine.runtime.ema``), which ``save_hf`` exports."""
        self.config = config
        self.trainable = trainable
        self.source = ModelSource.open(config.pretrain, flag=config.pretrain_flag)
        self.source.check_role(value_head=config.build.value_head, trainable=trainable)
        self.ctx = ctx or initialize_parallel(config.parallel, seed=config.seed)
        self.adapter = self.source.adapter()
        build = config.build if trainable else replace(config.build, **NO_RECOMPUTE)
        self.model = build_model(self.adapter, config.parallel, build)
        if load_weights:
            # Weights only: a training checkpoint as a start is not a resume (see resume()).
            self.source.load_weights(self.model, self.adapter, progress=self.is_rank_zero)
        if self.lora.enabled and trainable and self.is_rank_zero:
            from models.lora.targets import describe_targets

            print(describe_targets(self.adapter, self.lora.target_modules), flush=True)
        self.quantized = None
        if config.build.lora.load_in_4bit:
            self.quantized = self._quantize_base(load_weights)
        self.ddp_model = self.optimizer = self.scheduler = self.parking = None
        self.skipped_steps = SkippedSteps(config.optim.max_skipped_steps)
        self.checkpoint_writer = BackgroundWriter()  # --async_save: the checkpoint in flight
        if trainable:
            self.ddp_model = wrap_ddp(self.model, config.optim)
            self.optimizer = build_optimizer(self.ddp_model, config.optim, bf16=config.build.params_dtype == torch.bfloat16)
            self.scheduler = build_scheduler(self.optimizer, config.optim, total_steps=total_steps)
        self.ema = None
        if ema_beta is not None:
            if self.lora.enabled:
                raise ValueError("--enable_ema with --lora_rank is not supported: the EMA would average the "
                                 "frozen base too (train without LoRA, or without --enable_ema)")
            if not trainable:
                raise ValueError("an EMA of the weights is kept for a trained model only")
            self.ema = EmaModel(self, ema_beta)
        if trainable:
            self.parking = TrainingStateOffloader(self.model, self.ddp_model, self.optimizer,
                                                  extra=self.ema.model if self.ema else None)
        else:
            self.model.eval()
            self.model.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        if offload and trainable:
            raise ValueError("weight offload applies to frozen models (reference, reward, teacher), not trained ones")
        self.offload = offload and self.device.type == "cuda"  # on a CPU build host memory is home already
        if self.offload:
            self._to_host()

    def _quantize_base(self, loaded: bool) -> dict[str, int]:
        """QLoRA: the frozen decoder linears to NF4 once their weights are in; the bytes reported."""
        from models.lora.quant import quantize_base_linears

        if not loaded:
            raise ValueError("--load_in_4bit quantises loaded base weights: this model was built without them")
        stats = quantize_base_linears(self.model)
        if self.is_rank_zero:
            mib = {k: v / 2**20 for k, v in stats.items()}
            print(f"QLoRA: decoder linears of rank 0 in NF4: {mib['base_bytes_before']:.1f} MiB -> "
                  f"{mib['base_bytes_after']:.1f} MiB", flush=True)
        return stats

    # ----- facts about this rank ----------------------------------------------------------
    @property
    def lora(self) -> LoraConfig:
        return self.config.build.lora

    @property
    def is_rank_zero(self) -> bool:
        return dist.get_rank() == 0

    @property
    def data_parallel_size(self) -> int:
        return self.ctx.data_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    def sequence_multiple(self) -> int:
        """Sequence lengths must be multiples of this (sequence parallel x zigzag CP chunks)."""
        return self.config.parallel.sequence_multiple()

    # ----- weights in host memory between uses (frozen models, GPU) -----------------------
    def _to_host(self) -> None:
        self.model.to("cpu")
        torch.cuda.empty_cache()

    def weights_device(self) -> str:
        return str(next(self.model.parameters()).device)

    # ----- trainable state in host memory while colocated engines generate ----------------
    def park_training_state(self, parts: Iterable[str] = PARTS) -> dict[str, int]:
        """Move ``parts`` (weights, grads, optimizer) of a trainable model to host memory; bytes per part.
        Whatever needs them later brings them back first (``restore_training_state``)."""
        if self.parking is None:
            raise ValueError("only a trainable model parks its training state (frozen ones offload their weights)")
        return self.parking.offload(parts)

    def restore_training_state(self, parts: Iterable[str] = PARTS) -> dict[str, int]:
        return self.parking.onload(parts) if self.parking is not None else {}

    @contextmanager
    def weights_on_device(self):
        """The weights on the accelerator inside the block: a trainable model's parked weights come
        back (and stay); a frozen model with ``offload`` returns to host memory after it."""
        self.restore_training_state(("weights",))
        if not self.offload:
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self._to_host()

    # ----- steps --------------------------------------------------------------------------
    def global_token_count(self, microbatches: list[dict], key: str = "loss_mask") -> int:
        """Loss tokens of the whole step over all DP ranks (for exact token-mean losses)."""
        local = torch.tensor(sum(int(b[key].sum()) for b in microbatches), dtype=torch.int64)
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        return int(local)

    def loss_scale(self, microbatches: list[dict], key: str = "loss_mask") -> float:
        return token_mean_scale(
            num_microbatches=len(microbatches),
            data_parallel_size=self.data_parallel_size,
            global_num_tokens=self.global_token_count(microbatches, key),
        )

    def train_step(self, microbatches: list[dict], loss_fn: LossFn, *, normaliser_key: str | None = None) -> StepResult:
        self.restore_training_state()
        self.checkpoint_writer.poll()  # a background checkpoint whose writes are done is published
        self.ddp_model.train()
        seq_length = max(b["input_ids"].shape[1] for b in microbatches)
        result = train_step(
            self.ddp_model, self.optimizer, self.scheduler, microbatches, loss_fn,
            seq_length=seq_length, normaliser_key=normaliser_key,
        )
        self._count_skip(result.skip_cause)
        result.metrics["skipped_steps"] = float(self.skipped_steps.total)
        result.metrics.update(self.checkpoint_writer.drain_metrics())
        if self.ema is not None and result.skip_cause is None:
            self.ema.update()
        if self.adapter.num_experts:
            one_stage = self.config.parallel.pipeline_model_parallel_size == 1
            result.metrics.update(routing_metrics(self.model.router_stats, with_aux_loss=one_stage))
        return result

    def _count_skip(self, cause: str | None) -> None:
        """Counts a skipped step (logged on rank 0); raises after --max_skipped_steps in a row."""
        try:
            self.skipped_steps.record(cause)
        finally:
            if cause is not None and self.is_rank_zero:
                print(self.skipped_steps.message(cause), flush=True)

    @torch.no_grad()
    def forward_only(self, microbatches: list[dict], loss_fn: LossFn) -> list[dict]:
        """Per-micro-batch outputs of ``loss_fn`` on the last stage (empty list elsewhere)."""
        model = self.ddp_model if self.trainable else self.model
        model.eval()
        with self.weights_on_device():
            return run_microbatches(
                model, microbatches, loss_fn, num_microbatches=len(microbatches), forward_only=True,
                seq_length=max(b["input_ids"].shape[1] for b in microbatches),
                micro_batch_size=microbatches[0]["input_ids"].shape[0],
            )

    def forward_outputs(self, microbatches: list[dict], compute: Callable[[torch.Tensor, dict], torch.Tensor], *,
                        gather_context_parallel: bool = False) -> list[torch.Tensor]:
        """``compute(output, micro_batch)`` per micro-batch, forward only, on the last pipeline stage
        ([] elsewhere). ``gather_context_parallel``: per-token results ``[b, s_local, ...]`` of the CP
        ranks joined back into the full sequence order (packed batches: the real samples, per-sample CP
        padding dropped)."""
        cp_group = self.ctx.cp_group if gather_context_parallel and self.config.parallel.context_parallel_size > 1 else None

        def keep(output: torch.Tensor, batch: dict):
            result = compute(output, batch)
            if cp_group is not None and "cu_seqlens" in batch:
                result = zigzag_gather_packed(result, batch["cu_seqlens"], dim=1, cp_group=cp_group)
            elif cp_group is not None:
                result = zigzag_gather(result, dim=1, cp_group=cp_group)
            return output.new_zeros(()), {"out": result}

        return [r["out"] for r in self.forward_only(microbatches, keep)]

    def evaluate(self, microbatches: list[dict], loss_fn: LossFn, *, normaliser_key: str | None = None) -> dict:
        return reduce_metrics(self.forward_only(microbatches, loss_fn), normaliser_key=normaliser_key)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ----- persistence --------------------------------------------------------------------
    def save_checkpoint(self, config: CheckpointConfig, step: int, trainer_state: dict, *, wait: bool = False) -> Path:
        """The checkpoint of ``step`` (with --async_save written in the background; ``wait``: this one
        and any before it complete on return, as the run's last and a preemption's must be)."""
        self.restore_training_state(("weights", "optimizer"))
        check_finite_weights({"": self.model, **{f"{k}.": m for k, m in self._extra_models().items()}},
                             what=f"the checkpoint of step {step} under {config.ckpt_path}")
        directory = save_training_checkpoint(
            config, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state=trainer_state, adapter=self.adapter, hf_source_dir=self.source.hf_dir,
            extra_models=self._extra_models(), writer=self.checkpoint_writer,
        )
        if wait:
            self.checkpoint_writer.wait()
        return directory

    def resume(self, config: CheckpointConfig) -> dict | None:
        """Restore the newest valid checkpoint under ``--ckpt_path``; None if there is none."""
        directory = resume_directory(config, group=dist.group.WORLD)
        if directory is None:
            return None
        self.restore_training_state()
        state = load_training_checkpoint(directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                         extra_models=self._extra_models(), seed=self.config.seed)
        if EMA_CHECKPOINT_KEY in state.pop("missing_extra_models"):
            self.ema.copy_weights()
            if self.is_rank_zero:
                print(f"note: {directory} holds no EMA: the average restarts at the resumed weights", flush=True)
        if self.is_rank_zero:
            print(f"resumed from {directory}", flush=True)
        return state

    def _extra_models(self) -> dict:
        return {EMA_CHECKPOINT_KEY: self.ema.model} if self.ema is not None else {}

    def save_hf(self, path: str | Path, *, config_updates: dict | None = None) -> None:
        """The HF export of the model, or of its EMA when one is kept (as OpenRLHF exports it); with
        LoRA, a PEFT adapter directory (``tools.convert.lora_combiner`` merges it into the base)."""
        self.restore_training_state(("weights", "optimizer"))
        check_finite_weights({"": self.model, **({"ema.": self.ema.model} if self.ema is not None else {})},
                             what=f"the HF export {path}")
        if self.lora.enabled:
            save_peft_adapter(self.model, self.adapter, self.lora, path, base_model=self.config.pretrain,
                              source_dir=self.source.hf_dir, config_updates=config_updates)
            return
        model = self.ema.model if self.ema is not None else self.model
        save_hf_checkpoint(model, self.adapter, path, source_dir=self.source.hf_dir, progress=self.is_rank_zero,
                           config_updates=config_updates)


class AdaptersOff:
    """The base model under a LoRA engine's adapters, as a frozen model: the DPO / KTO reference
    of a LoRA run is its start, which the adapted model holds already (no second copy)."""

    def __init__(self, engine: TrainingEngine):
        self.engine = engine
        self.vocab_size = engine.vocab_size

    def forward_outputs(self, microbatches: list[dict], compute, **kwargs) -> list[torch.Tensor]:
        with adapters_disabled(self.engine.model):
            return self.engine.forward_outputs(microbatches, compute, **kwargs)


def frozen_copy(engine: TrainingEngine, hf_path: str, *, role: str, offload: bool = False):
    """A frozen model on ``engine``'s grid (the DPO / KTO reference, the KD teacher): same TP / PP /
    CP layout, so its micro-batches split the same way; ``role`` names its flag in errors.
    ``hf_path``: an HF directory or a Megatron checkpoint, as ``--pretrain``. With LoRA, the model
    ``engine`` started from is its own base with the adapters off (:class:`AdaptersOff`); another
    model is built without adapters."""
    if engine.lora.enabled and hf_path == engine.config.pretrain:
        if offload and engine.is_rank_zero:
            print(f"note: {role} is the LoRA run's own frozen base (adapters off): it shares the trained model's "
                  "weights, so there is nothing to offload", flush=True)
        return AdaptersOff(engine)
    build = replace(engine.config.build, lora=LoraConfig())
    copy = TrainingEngine(replace(engine.config, pretrain=hf_path, pretrain_flag=role, build=build), trainable=False,
                          offload=offload, ctx=engine.ctx)
    if copy.vocab_size != engine.vocab_size:
        raise ValueError(f"{role} {hf_path} has a vocabulary of {copy.vocab_size} tokens, the trained "
                         f"model {engine.vocab_size}: the two must share a tokenizer")
    return copy
