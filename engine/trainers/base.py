"""The loop every offline trainer (SFT, RM, DPO, KTO, PRM, KD) shares.

A subclass says how a list of dataset samples becomes micro-batches and what the loss is; this
class owns the rest: deterministic sharding of global batches over data-parallel ranks, gradient
accumulation, evaluation, logging, checkpoints with exact resume, and the final HF export.

Checkpoints store the data position in samples and the LR plan in samples
(``engine.data.position``): a resume under another ``--train_batch_size`` continues at the next
unconsumed sample, with the remaining steps and the LR schedule re-planned for the samples left.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.data.position import DataPosition, SchedulePlan
from engine.runtime.engine import TrainingEngine
from engine.runtime.logging import MetricsLogger, format_metrics
from engine.runtime.optimizer import replan_scheduler
from engine.runtime.schedule import LossFn
from engine.trainers.config import OfflineTrainerConfig, TrainLoopConfig  # noqa: F401  (declared apart: the parsers import no torch)


class OfflineTrainer:
    """Subclasses implement ``make_microbatches`` and ``make_loss_fn`` (and may set ``normaliser_key``)."""

    normaliser_key: str | None = None
    max_tokens: int | None = None  # --use_dynamic_batch_size's --max_tokens_per_gpu (trainers that pack)

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None):
        self.config = config
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        loop = config.loop
        self.steps_per_epoch = len(train_dataset) // loop.train_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(train_dataset)} samples, fewer than --train_batch_size "
                f"({loop.train_batch_size})"
            )
        self.total_steps = self.steps_per_epoch * loop.max_epochs
        # --max_steps stops early without changing the LR schedule, so a stopped run and its
        # resumption follow the same curve as an uninterrupted one.
        self.last_step = min(self.total_steps, loop.max_steps or self.total_steps)
        self.engine = TrainingEngine(config.engine, total_steps=self.total_steps)
        self.position = DataPosition(num_samples=len(train_dataset))
        scheduler = self.engine.scheduler
        self.plan = SchedulePlan.fresh(train_batch_size=loop.train_batch_size, warmup_steps=scheduler.lr_warmup_steps,
                                       decay_steps=scheduler.lr_decay_steps)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): computed once per epoch
        self._check_batch_sizes()
        self.logger = MetricsLogger(config.logging)
        self.history: list[dict] = []
        self.eval_history: list[dict] = []

    # ----- subclass hooks -----------------------------------------------------------------
    def make_microbatches(self, samples: list) -> list[dict]:
        raise NotImplementedError

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        raise NotImplementedError

    def export_config_updates(self) -> dict:
        """Extra fields for the final HF ``config.json`` (collective: every rank calls it)."""
        return {}

    # ----- data placement -----------------------------------------------------------------
    def _check_batch_sizes(self) -> None:
        loop, dp = self.config.loop, self.engine.data_parallel_size
        if self.max_tokens is not None:  # micro-batches by tokens: every rank needs one sample at least
            if loop.train_batch_size < dp:
                raise ValueError(f"--train_batch_size ({loop.train_batch_size}) must be at least the data parallel "
                                 f"size ({dp})")
            return
        if loop.train_batch_size % (loop.micro_train_batch_size * dp):
            raise ValueError(
                f"--train_batch_size ({loop.train_batch_size}) must be divisible by "
                f"--micro_train_batch_size ({loop.micro_train_batch_size}) x data parallel size ({dp})"
            )

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.engine.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.train_dataset), generator=generator).tolist())
        return self._order[1]

    def global_batch_indices(self) -> list[int]:
        """Training-set indices of the next global batch: the next ``--train_batch_size`` samples of
        the epoch's order after ``self.position`` (the same on every rank)."""
        batch_size = self.config.loop.train_batch_size
        epoch, begin = self.position.next_batch(batch_size)
        return self._epoch_order(epoch)[begin : begin + batch_size]

    def rank_samples(self) -> list:
        """This DP rank's share of the next global batch."""
        batch, dp = self.global_batch_indices(), self.engine.data_parallel_size
        share = len(batch) // dp
        mine = batch[self.engine.data_parallel_rank * share : (self.engine.data_parallel_rank + 1) * share]
        return [self.train_dataset[i] for i in mine]

    def step_microbatches(self) -> list[dict]:
        """This rank's micro-batches of the next global batch."""
        return self.make_microbatches(self.rank_samples())

    def split_microbatches(self, samples: list) -> list[list]:
        size = self.config.loop.micro_train_batch_size
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    # ----- loop ---------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        start = self._resume()
        progress = tqdm(
            range(start, self.last_step), initial=start, total=self.last_step,
            desc=type(self).__name__, disable=not self.engine.is_rank_zero,
        )
        for step in progress:
            metrics = self.train_one_step(step)
            self.position.advance(self.config.loop.train_batch_size)
            self.history.append({"step": step + 1, **metrics})
            if (step + 1) % self.config.logging.logging_steps == 0:
                self.logger.log(metrics, step + 1)
                shown = [*list(metrics)[:4], *(k for k in ("aux_loss", "moe/load_cv") if k in metrics)]
                progress.set_postfix_str(format_metrics({k: metrics[k] for k in shown}))
                if self.engine.is_rank_zero:
                    tqdm.write(f"step {step + 1}/{self.last_step} {format_metrics(metrics)}")
            self._maybe_evaluate(step + 1)
            self._maybe_checkpoint(step + 1)
        if self.config.loop.eval_steps < 0 and self.eval_dataset is not None:
            self._evaluate(self.last_step)
        if self.config.loop.save_path:
            self.engine.save_hf(self.config.loop.save_path, config_updates=self.export_config_updates())
        self.logger.close()
        return self.history

    # ----- resume ---------------------------------------------------------------------------
    def _resume(self) -> int:
        """The step to continue after; the data position and the LR plan of the checkpoint, re-planned
        when ``--train_batch_size`` changed."""
        state = self.engine.resume(self.config.checkpoint)
        if state is None:
            return 0
        step, batch_size = state["step"], self.config.loop.train_batch_size
        if "data" not in state:  # saved before positions were: it assumed this batch size throughout
            for _ in range(step):
                self.position.advance(batch_size)
            return step
        self.position = DataPosition.restore(state["data"], num_samples=len(self.train_dataset))
        saved = SchedulePlan(**state["schedule"])
        if saved.train_batch_size == batch_size:
            self.plan = saved
        else:
            self._replan(step, saved)
        return step

    def _replan(self, step: int, saved: SchedulePlan) -> None:
        loop, position = self.config.loop, self.position
        remaining = position.remaining_steps(loop.train_batch_size, loop.max_epochs)
        self.total_steps = step + remaining
        self.last_step = min(self.total_steps, loop.max_steps or self.total_steps)
        self.plan = saved.replanned(train_batch_size=loop.train_batch_size,
                                    planned_samples=position.consumed + remaining * loop.train_batch_size)
        replan_scheduler(self.engine.scheduler, samples_per_step=loop.train_batch_size, consumed_samples=position.consumed,
                         warmup_samples=self.plan.warmup_samples, decay_samples=self.plan.decay_samples)
        if self.engine.is_rank_zero:
            print(f"resume: --train_batch_size {loop.train_batch_size} (the checkpoint's run had "
                  f"{saved.train_batch_size}): continuing at sample {position.consumed_in_epoch} of epoch "
                  f"{position.epoch} ({position.consumed} samples trained), {remaining} more steps; LR schedule "
                  f"re-planned in samples: warmup until sample {self.plan.warmup_samples}, decay until sample "
                  f"{self.plan.decay_samples} (was {saved.decay_samples})", flush=True)

    def train_one_step(self, step: int) -> dict:
        started = time.perf_counter()
        microbatches = self.step_microbatches()
        result = self.engine.train_step(microbatches, self.make_loss_fn(microbatches), normaliser_key=self.normaliser_key)
        elapsed = time.perf_counter() - started
        tokens = torch.tensor(sum(int(b["input_ids"].numel()) for b in microbatches), dtype=torch.float64)
        dist.all_reduce(tokens, group=self._dp_group())
        return {
            **result.metrics,
            "grad_norm": result.grad_norm,
            "lr": self.engine.learning_rate,
            "tokens_per_s": float(tokens) / elapsed,
            "step_time": elapsed,
        }

    def _dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def _maybe_evaluate(self, step: int) -> None:
        eval_steps = self.config.loop.eval_steps
        if self.eval_dataset is not None and eval_steps > 0 and step % eval_steps == 0:
            self._evaluate(step)

    def strided_share(self, dataset, limit: int | None = None) -> list:
        """This DP rank's equal share of ``dataset`` (its first ``limit`` samples), for evaluation:
        the remainder is left out so every rank joins the same collectives."""
        dp, rank = self.engine.data_parallel_size, self.engine.data_parallel_rank
        size = len(dataset) if limit is None else min(limit, len(dataset))
        return [dataset[i] for i in range(rank, size // dp * dp, dp)]

    def _evaluate(self, step: int) -> dict:
        samples = self.strided_share(self.eval_dataset)
        if not samples:
            return {}
        microbatches = self.make_microbatches(samples)
        metrics = self.engine.evaluate(microbatches, self.make_loss_fn(microbatches), normaliser_key=self.normaliser_key)
        self.logger.log(metrics, step, prefix="eval")
        self.eval_history.append({"step": step, **metrics})
        if self.engine.is_rank_zero:
            tqdm.write(f"eval @ step {step}: {format_metrics(metrics)}")
        return metrics

    def _maybe_checkpoint(self, step: int) -> None:
        ckpt = self.config.checkpoint
        if not ckpt.ckpt_path or ckpt.save_steps <= 0 or (step % ckpt.save_steps and step != self.last_step):
            return
        state = {"step": step, "data": self.position.state_dict(), "schedule": self.plan.state_dict()}
        directory = self.engine.save_checkpoint(ckpt, step, state, wait=step == self.last_step)
        if self.config.loop.save_hf_ckpt:
            self.engine.save_hf(directory.parent / f"{directory.name}_hf")
