"""DPO step throughput: the Megatron engine's DPO trainer vs TRL's ``DPOTrainer``.

    python -m tools.bench.bench_dpo            # reference workload W, engine at TP=1 and TP=2
    python -m tools.bench.bench_dpo --quick    # a smaller model, fewer steps
    python -m tools.bench.bench_dpo --skewed --tp 1   # response lengths spread 1:16: packed vs padded
    python -m tools.bench.bench_dpo --skewed --tp 1 --trainer rm   # a reward-model step (no TRL baseline)

Both sides train the same Llama-architecture model (workload W of DESIGN.md) with a frozen
reference copy on the same synthetic preference pairs (prompt ~48 tokens, responses ~48-96),
the same number of pairs per optimizer step in one micro-batch, fp32 on CPU. A step includes
the reference forward on both sides. Reported: seconds per step and real (non-padding) tokens
of chosen + rejected per second, with the ratios engine / TRL (when the ``bench`` extra, TRL, is
installed) and packed / padded (``--packing_samples``: a micro-batch's sequences in one row).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from tools.bench.common import print_table, reference_model, run_on_local_ranks

WORDS = "the a of to and in is it you that he was for on are with as his they at one have this from".split()


def write_pairs(path: str, num_pairs: int, *, prompt_words: int, response_words: int, seed: int = 0,
                skewed: bool = False) -> str:
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(max(1, n // 16) if skewed else n // 2, n)))

    with open(path, "w") as f:
        for _ in range(num_pairs):
            f.write(json.dumps({"prompt": text(prompt_words) + "\n", "chosen": text(response_words),
                                "rejected": text(response_words)}) + "\n")
    return path


def real_tokens_per_step(model_path: str, data_path: str, pairs_per_step: int, max_len: int) -> float:
    """Mean chosen + rejected tokens of a step, as our data pipeline tokenises the pairs."""
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.preference import PreferenceDataset

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pairs = PreferenceDataset.from_config(DataConfig(dataset=data_path, prompt_key="prompt", max_len=max_len), tokenizer)
    total = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    return total / len(pairs) * pairs_per_step


# ----- TRL baseline --------------------------------------------------------------------------
def trl_seconds_per_step(model_path: str, data_path: str, args) -> float:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs_per_step, gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps, learning_rate=1e-6, beta=0.1, max_length=args.max_len,
            use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=10_000,
            dataloader_num_workers=0, seed=0,
        )
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
            args=config, train_dataset=load_dataset("json", data_files=data_path, split="train"),
            processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[timer],
        )
        trainer.train()
    return sum(timer.times[args.warmup:]) / args.steps


# ----- Megatron engine -----------------------------------------------------------------------
def _engine_worker(model_path, data_path, tp, packing, args, result_file):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.preference import PreferenceDataset
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from engine.trainers.dpo import DPOConfig, DPOTrainer
    from engine.trainers.rm import RewardModelTrainer
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pairs = PreferenceDataset.from_config(DataConfig(dataset=data_path, prompt_key="prompt", max_len=args.max_len),
                                          tokenizer)
    config = OfflineTrainerConfig(
        engine=EngineConfig(pretrain=model_path, parallel=ParallelConfig(tensor_model_parallel_size=tp),
                            optim=OptimConfig(learning_rate=1e-6, lr_warmup_ratio=0.0),
                            build=ModelBuildConfig(value_head=args.trainer == "rm")),
        loop=TrainLoopConfig(train_batch_size=args.pairs_per_step, micro_train_batch_size=args.pairs_per_step,
                             max_steps=args.warmup + args.steps),
    )
    if args.trainer == "rm":
        trainer = RewardModelTrainer(config, pairs, pad_token_id=tokenizer.pad_token_id, packing_samples=packing)
    else:
        trainer = DPOTrainer(config, pairs, dpo=DPOConfig(beta=0.1), pad_token_id=tokenizer.pad_token_id,
                             packing_samples=packing)
    history = trainer.fit()
    if torch.distributed.get_rank() == 0:
        torch.save(sum(h["step_time"] for h in history[args.warmup:]) / args.steps, result_file)


def engine_seconds_per_step(model_path: str, data_path: str, tp: int, packing: bool, args) -> float:
    return run_on_local_ranks(_engine_worker, tp, model_path, data_path, tp, packing, args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs_per_step", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--tp", default="1,2", help="comma-separated TP sizes for the engine")
    parser.add_argument("--skewed", action="store_true", help="response lengths spread 1:16 instead of 1:2")
    parser.add_argument("--trainer", default="dpo", choices=("dpo", "rm"), help="DPO (vs TRL) or a reward-model step")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.pairs_per_step = 2, 1, 4

    with tempfile.TemporaryDirectory() as tmp:
        model_path = reference_model(tmp, quick=args.quick)
        data_path = write_pairs(os.path.join(tmp, "pairs.jsonl"), args.pairs_per_step * (args.warmup + args.steps),
                                prompt_words=48, response_words=192 if args.skewed else 96, skewed=args.skewed)
        tokens = real_tokens_per_step(model_path, data_path, args.pairs_per_step, args.max_len)
        torch.set_num_threads(os.cpu_count() or 1)
        baseline = None
        if args.trainer == "dpo":
            try:
                baseline = trl_seconds_per_step(model_path, data_path, args)
            except ImportError:
                print("TRL is not installed (pip install -e '.[bench]'): no TRL baseline")
        rows = [("TRL DPOTrainer", baseline, tokens / baseline, 1.0, "")] if baseline else []
        for tp in (int(t) for t in args.tp.split(",")):
            padded = None
            for packing in (False, True):
                seconds = engine_seconds_per_step(model_path, data_path, tp, packing, args)
                padded = padded or seconds
                rows.append((f"Megatron engine {args.trainer.upper()} TP={tp} {'packed' if packing else 'padded'}", seconds,
                             tokens / seconds, baseline / seconds if baseline else "", padded / seconds))
    what = "DPO step (policy + reference)" if args.trainer == "dpo" else "reward-model step"
    print_table(f"{what}, fp32{', skewed lengths' if args.skewed else ''}",
                ["run", "s/step", "real tokens/s", "ratio vs TRL", "ratio vs padded"], rows)


if __name__ == "__main__":
    main()
