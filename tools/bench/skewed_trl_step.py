"""TRL's row of ``bench_rl_step --skewed``: TRL 1.16's ``GRPOTrainer`` scoring and training the same
skewed rollout (``skewed_rl_step.skewed_samples``), with generation taken out.

TRL's own seam for a rollout made elsewhere, ``rollout_func``, hands it the pre-made token ids; the
rest of its step is TRL's: ``_generate_and_score_completions`` pads the rollout (prompts left,
completions right, every micro-batch to the rollout's longest), computes rewards (random: they only
set the advantages) and advantages; its ``train`` loop splits the rollout into micro-batches of
``--micro_batch_size`` samples (``per_device_train_batch_size``, gradient accumulation over the rest)
and takes one optimizer step per rollout. TRL scores the old log-probs only when it will reuse them
(``num_iterations`` > 1, misaligned steps, vLLM); with one step per rollout it takes its loss's
detached log-probs instead, so the scoring forward that our modes run is added here with TRL's own
call (``_get_per_token_logps_and_entropies`` on ``per_device_train_batch_size`` chunks, as its code
does when it needs them) and shown as its own column. Two ranks (DP=2 over accelerate's gloo), one
thread each, fp32, as our modes run.
"""
from __future__ import annotations

import statistics
import time

import torch

NUM_GENERATIONS = 4  # samples per prompt group: only how TRL groups rewards, the samples are the same


def _trainer_class(seconds: dict):
    """GRPOTrainer that scores the old log-probs of each rollout and clocks its phases."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds["step"].append(time.perf_counter() - self.started)

    class ScoringGRPOTrainer(GRPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(StepClock())

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            if "old_per_token_logps" not in output:
                scoring = time.perf_counter()
                output["old_per_token_logps"] = self._old_log_probs(output)
                seconds["score"].append(time.perf_counter() - scoring)
            seconds["rollout"].append(time.perf_counter() - started)
            return output

        @torch.no_grad()
        def _old_log_probs(self, output) -> torch.Tensor:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            return self._get_per_token_logps_and_entropies(
                self.model, ids, mask, output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size)[0]

    return ScoringGRPOTrainer


def _rollout_func(samples):
    """This rank's contiguous half of the rollout, as our fixed micro-batches shard it."""
    prompts, responses = samples

    def rollout(prompt_texts, trainer):
        rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
        share = len(prompts) // world
        assert len(prompt_texts) == share, (len(prompt_texts), share)
        rows = slice(rank * share, (rank + 1) * share)
        return {"prompt_ids": prompts[rows], "completion_ids": responses[rows], "logprobs": None}

    return rollout


def _random_reward(prompts, completions, **kwargs):
    return torch.randn(len(completions)).tolist()


def trl_worker(model_path: str, args, result_file: str) -> None:
    """On each of two spawned ranks: warm-up + measured TRL steps; rank 0 saves the median phases."""
    import os
    import tempfile

    from datasets import Dataset
    from trl import GRPOConfig

    from tools.bench.skewed_rl_step import skewed_samples

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's warning
    torch.set_num_threads(1)
    prompts, responses, _ = skewed_samples(args.skewed_samples, args.generate_max_len)
    world = int(os.environ["WORLD_SIZE"])
    per_rank_micro_batches = args.skewed_samples // (world * args.micro_batch_size)
    seconds: dict[str, list[float]] = {"step": [], "rollout": [], "score": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, seed=0, report_to="none", save_strategy="no",
            logging_steps=1, max_steps=args.warmup_steps + args.steps, learning_rate=1e-6,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.0, num_iterations=1,
            per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=per_rank_micro_batches,
            num_generations=NUM_GENERATIONS, max_completion_length=args.generate_max_len, dataloader_num_workers=0,
        )
        # One row per prompt group; a rollout takes them all, the rollout_func supplies the samples.
        dataset = Dataset.from_list([{"prompt": str(i)} for i in range(args.skewed_samples // NUM_GENERATIONS)])
        trainer = _trainer_class(seconds)(
            model=model_path, reward_funcs=_random_reward, args=config, train_dataset=dataset,
            rollout_func=_rollout_func((prompts, responses)))
        trainer.train()
    if int(os.environ["RANK"]) == 0:
        measured = {k: statistics.median(v[args.warmup_steps:]) for k, v in seconds.items()}
        torch.save({"score": measured["score"], "train": measured["step"] - measured["rollout"],
                    "step": measured["step"], "rollouts": len(seconds["rollout"])}, result_file)
    # accelerate's gloo group, left open, holds the rank at exit for minutes
    torch.distributed.destroy_process_group()


def run_trl(model_path: str, args) -> dict | None:
    """TRL's median phases on two local ranks, or None (printed) where TRL is not installed."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:  # importing it here would cost minutes on a loaded box
        print("TRL is not installed (pip install -e '.[bench]'): the TRL row is skipped")
        return None
    from tools.bench.common import run_on_local_ranks

    return run_on_local_ranks(trl_worker, 2, model_path, args)
