"""The actor's training step with each policy loss: GSPO / CISPO (and the entropy bonus) vs PPO's.

    python -m tools.bench.bench_policy_losses            # workload W's model, one GRPO step's batch
    python -m tools.bench.bench_policy_losses --quick    # a small model (smoke run)

One Megatron actor rank trains on one rollout of W's shape (4 prompts x 4 samples, 128-token
responses of ragged length, one optimizer step of micro-batches of 4) with ``--policy_loss_type``
ppo, gspo and cispo, and ppo with ``--entropy_coef``; the runs take turns step by step (the box's
load moves them alike) and the table shows the median seconds per step and the ratio to PPO's.
The losses differ only in per-token arithmetic (GSPO adds one per-sequence sum), so the goal is
a ratio within noise of 1. The loss function alone (forward + backward from one micro-batch's
logits, 20 interleaved repeats) is timed too: its extra milliseconds over PPO's, as a share of
PPO's step, is the cost the step ratio hides in the box's noise.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from tools.bench.common import print_table, reference_model, run_on_local_ranks

RUNS = {"ppo": {}, "gspo": {"eps_clip": 3e-4, "eps_clip_high": 4e-4}, "cispo": {},
        "ppo --entropy_coef 0.001": {"entropy_coef": 1e-3}}


def _rollout(vocab: int, num_samples: int, max_len: int, seed: int = 0):
    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(num_samples)]
    responses = [torch.randint(3, vocab, (int(torch.randint(max_len // 4, max_len + 1, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(num_samples)]
    batch = build_rollout_batch(prompts, responses, pad_id=0)
    advantages = torch.randn(num_samples, 1, generator=g).expand_as(batch.action_mask) * batch.action_mask
    return Experience.from_rollout(batch).with_fields(advantages=advantages.contiguous())


def _worker(path, num_samples, max_len, steps, warmup, result_file):
    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.rl.train_settings import TrainSettings
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    config = EngineConfig(pretrain=path, parallel=ParallelConfig(),
                          optim=OptimConfig(learning_rate=1e-7, lr_warmup_ratio=0.0, lr_scheduler="constant"))
    actor = MegatronRoleWorker(RoleConfig(name="actor", engine=config, num_ranks=1, trainable=True), 0)
    actor.engine = TrainingEngine(config, total_steps=(steps + warmup) * len(RUNS))
    experience = _rollout(actor.engine.adapter.vocab_size, num_samples, max_len)
    current = actor.compute_log_probs(experience, 4).values
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    experience = experience.with_fields(old_log_probs=(current + noise) * experience.action_mask)
    seconds = {name: [] for name in RUNS}
    for step in range(warmup + steps):
        for name, extra in RUNS.items():
            settings = TrainSettings(train_batch_size=num_samples, micro_train_batch_size=4, max_epochs=1, seed=step,
                                     policy_loss_type=name.split()[0], max_response_len=max_len, **extra)
            start = time.perf_counter()
            actor.train(experience, "policy", settings)
            if step >= warmup:
                seconds[name].append(time.perf_counter() - start)
    step = {name: statistics.median(values) for name, values in seconds.items()}
    torch.save({"step": step, "loss": _loss_only(actor, experience, max_len)}, result_file)


def _loss_only(actor, experience, max_len: int, repeats: int = 20) -> dict[str, float]:
    """Median seconds of the loss function alone (forward and backward from the logits of one
    micro-batch of 4): what each loss adds, without the model's noise."""
    from engine.rl.policy_losses.aggregation import Aggregation, StepCounts, annotate_microbatches
    from engine.rl.train_losses import LossGroups, make_loss_fn
    from engine.rl.train_settings import TrainSettings

    ctx = actor.engine.ctx
    groups = LossGroups(tp_group=ctx.tp_group, cp_group=ctx.cp_group, dp_group=ctx.dp_group)
    micro = experience.microbatches(0, 4, 4)[0]
    vocab = actor.engine.adapter.vocab_size
    logits = torch.randn(*micro["labels"].shape, vocab, generator=torch.Generator().manual_seed(2))
    seconds = {name: [] for name in RUNS}
    for _ in range(repeats):
        for name, extra in RUNS.items():
            settings = TrainSettings(train_batch_size=4, micro_train_batch_size=4, max_epochs=1, seed=0,
                                     policy_loss_type=name.split()[0], max_response_len=max_len, **extra)
            [batch] = annotate_microbatches([micro], mode=settings.loss_agg_mode)
            counts = StepCounts(num_tokens=int(batch["action_mask"].sum()), num_sequences=4)
            aggregation = Aggregation.for_step(settings.loss_agg_mode, counts, num_microbatches=1, data_parallel_size=1)
            leaf = logits.clone().requires_grad_(True)
            start = time.perf_counter()
            loss, _ = make_loss_fn("policy", settings, aggregation=aggregation, groups=groups)(leaf, batch)
            loss.backward()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, short responses, few steps")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per loss")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--generate_max_len", type=int, default=128)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.generate_max_len = 3, 32
    with tempfile.TemporaryDirectory() as tmp:
        path = reference_model(tmp, quick=args.quick)
        medians = run_on_local_ranks(_worker, 1, path, 16, args.generate_max_len, args.steps, args.warmup)
    step, loss = medians["step"], medians["loss"]
    rows = [(f"--policy_loss_type {name}", step[name], step[name] / step["ppo"], loss[name] * 1e3,
             loss[name] / loss["ppo"], (loss[name] - loss["ppo"]) / step["ppo"]) for name in RUNS]
    print_table("actor training step, one rollout (16 samples), medians (lower is better)",
                ["run", "s/step", "ratio vs ppo", "loss fn ms", "loss fn ratio", "extra loss time / ppo step"], rows)


if __name__ == "__main__":
    main()
