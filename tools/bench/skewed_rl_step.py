"""``bench_rl_step --skewed``: scoring + training of a rollout whose responses spread 1:20 in length,
with token-budget micro-batches (``--use_dynamic_batch_size --max_tokens_per_gpu N``) vs fixed ones.

Workload W's model on two local ranks (DP=2, one thread each), as the actor role runs them
(``MegatronRoleWorker``): one rollout of ``--skewed_samples`` samples, prompts of 8-16 tokens,
responses spread evenly from ``--generate_max_len / 20`` to ``--generate_max_len`` tokens (random ids:
generation is not measured), shuffled. Each step scores the rollout's log-probs (the old-log-prob
forward) and takes one optimizer step on it (GRPO's policy loss, one step per rollout). The modes:

* fixed micro-batches of ``--micro_batch_size`` samples, right-padded (the default layout);
* the same, each packed into one row (``--packing_samples``);
* ``--use_dynamic_batch_size --max_tokens_per_gpu N``: micro-batches of at most N tokens, packed,
  balanced over the two ranks by tokens.

The modes take turns step by step on the same ranks (a shared box's load moves all of them alike);
the table shows the median seconds and real (prompt + response) tokens per second of scoring +
training, and each row's tokens/s over TRL's. TRL's row (``tools/bench/skewed_trl_step.py``, when
TRL is installed: ``pip install -e '.[bench]'``; otherwise it is skipped, and says so): TRL 1.16's
``GRPOTrainer`` on the same model and samples, generation taken out (its ``rollout_func`` hands it
the pre-made ids), the old-log-prob forward with its own call, one optimizer step per rollout over
micro-batches of ``--micro_batch_size`` samples, each padded to the longest sample of the rank's
share of the rollout as TRL pads them; on the same two ranks, one thread each, run right after ours (not interleaved: TRL's
``train`` loop owns its steps).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

MODES = ("fixed, padded", "fixed, --packing_samples", "--use_dynamic_batch_size")
TRL_ROW = "TRL GRPOTrainer (fixed, padded)"


def skewed_samples(num_samples: int, max_response: int, seed: int = 0):
    """Prompt and response token ids: responses spread evenly over [max_response / 20, max_response]
    tokens, shuffled; and the generator that drew them (the advantages come next from it)."""
    g = torch.Generator().manual_seed(seed)
    shortest = max(1, max_response // 20)
    lengths = torch.linspace(shortest, max_response, num_samples).round().long()[torch.randperm(num_samples, generator=g)]
    prompts = [torch.randint(3, 400, (int(torch.randint(8, 17, (1,), generator=g)),), generator=g).tolist()
               for _ in range(num_samples)]
    responses = [torch.randint(3, 400, (int(n),), generator=g).tolist() for n in lengths]
    return prompts, responses, g


def skewed_experience(num_samples: int, max_response: int, seed: int = 0):
    """``skewed_samples`` as an Experience with random advantages."""
    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    prompts, responses, g = skewed_samples(num_samples, max_response, seed)
    experience = Experience.from_rollout(build_rollout_batch(prompts, responses, pad_id=0))
    mask = experience.action_mask
    return experience.with_fields(advantages=torch.randn(mask.shape, generator=g) * mask)


def _mode_settings(mode: str, args) -> tuple[dict, object]:
    from engine.rl.train_losses import TrainSettings

    budget = args.max_tokens_per_gpu if mode == "--use_dynamic_batch_size" else None
    packed = mode != "fixed, padded"
    settings = TrainSettings(train_batch_size=args.skewed_samples, micro_train_batch_size=args.micro_batch_size,
                             max_epochs=1, seed=0, packing_samples=packed, max_tokens_per_gpu=budget)
    return {"packed": packed, "max_tokens": budget}, settings


def _worker(model_path: str, args, result_file: str) -> None:
    import torch.distributed as dist

    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = EngineConfig(pretrain=model_path, parallel=ParallelConfig(),
                          optim=OptimConfig(learning_rate=1e-6, lr_warmup_ratio=0.0))
    worker = MegatronRoleWorker(RoleConfig(name="actor", engine=config, num_ranks=world, trainable=True), rank)
    worker.engine = TrainingEngine(config)
    experience = skewed_experience(args.skewed_samples, args.generate_max_len)
    seconds = {mode: {"score": [], "train": []} for mode in MODES}
    for step in range(args.warmup_steps + args.steps):
        for mode in MODES:
            layout, settings = _mode_settings(mode, args)
            dist.barrier()
            started = time.perf_counter()
            worker.compute_log_probs(experience, args.micro_batch_size, **layout)
            dist.barrier()
            scored = time.perf_counter()
            worker.train(experience, "policy", settings)
            dist.barrier()
            if step >= args.warmup_steps:
                seconds[mode]["score"].append(scored - started)
                seconds[mode]["train"].append(time.perf_counter() - scored)
    if rank == 0:
        torch.save({"seconds": {m: {k: statistics.median(v) for k, v in s.items()} for m, s in seconds.items()},
                    "tokens": int(sum(experience.lengths)), "lengths": experience.lengths}, result_file)


def run_skewed(model_path: str, args) -> None:
    from tools.bench.common import print_table, run_on_local_ranks
    from tools.bench.skewed_trl_step import run_trl

    result = run_on_local_ranks(_worker, 2, model_path, args)
    # printed now too: TRL's run takes minutes more, and ours should outlive its failure
    print("ours, score + train s: " + ", ".join(f"{mode} {p['score'] + p['train']:.3g}"
                                                for mode, p in result["seconds"].items()), flush=True)
    trl = run_trl(model_path, args)  # right after ours, same ranks and threads (None without TRL)
    tokens, lengths = result["tokens"], result["lengths"]
    responses = [n for n in skewed_experience(args.skewed_samples, args.generate_max_len).action_mask.sum(1).int().tolist()]
    print(f"rollout: {len(lengths)} samples, {tokens} real tokens, responses {min(responses)}-{max(responses)} tokens; "
          f"micro-batches: {args.micro_batch_size} samples (fixed) or <= {args.max_tokens_per_gpu} tokens (budget); "
          "DP=2, one thread per rank")
    phases_of = dict(result["seconds"])
    if trl is not None:
        phases_of[TRL_ROW] = trl
    # each real token scored once and trained once
    rates = {mode: 2 * tokens / (p["score"] + p["train"]) for mode, p in phases_of.items()}
    trl_rate = rates.get(TRL_ROW)
    rows = [(mode, p["score"], p["train"], p["score"] + p["train"], rates[mode],
             rates[mode] / trl_rate if trl_rate else "-") for mode, p in phases_of.items()]
    print_table("scoring + training one skewed rollout (median seconds over the measured steps)",
                ["micro-batches", "score s", "train s", "score + train s", "tokens/s", "vs TRL tokens/s"], rows)
    budget = rates["--use_dynamic_batch_size"]
    print(f"token budget / fixed padded: {budget / rates['fixed, padded']:.2f}x tokens/s; "
          f"token budget / fixed packed: {budget / rates['fixed, --packing_samples']:.2f}x tokens/s")
