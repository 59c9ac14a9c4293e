"""LoRA SFT step: the Megatron engine with LoRA vs its full fine-tuning, and vs HF transformers + PEFT.

    python -m tools.bench.bench_lora            # reference workload W, TP=1
    python -m tools.bench.bench_lora --quick    # a smaller model, fewer steps

All three train the same model on the same padded batches of variable-length samples (fp32 on
CPU), in one run. Reported: real tokens per second, and the bytes of optimizer state (Adam's two
moments, plus the distributed optimizer's fp32 main copies where it keeps them) after the steps.
Ratios: LoRA / full fine-tuning on the engine, and engine LoRA / HF + PEFT LoRA.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from tools.bench.bench_train_step import make_samples, padded_batch, sample_lengths
from tools.bench.common import print_table, reference_model, run_on_local_ranks

TARGETS = ("all-linear",)


def _state_bytes(states) -> int:
    return sum(t.numel() * t.element_size() for s in states for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def hf_peft(path: str, batches, steps: int, warmup: int, rank: int) -> tuple[float, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, elapsed = 0, 0.0
    for step in range(warmup + steps):
        batch = padded_batch(batches[step % len(batches)])
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long()).logits
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        ((losses * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            elapsed += time.perf_counter() - start
            tokens += sum(len(s) for s in batches[step % len(batches)])
    return tokens / elapsed, _state_bytes(optimizer.state.values())


def _engine_worker(path, lora_rank, batches, steps, warmup, result_file):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from models.lora import LoraConfig

    build = ModelBuildConfig(lora=LoraConfig(lora_rank=lora_rank, lora_alpha=2 * max(lora_rank, 1),
                                             target_modules=TARGETS))
    engine = TrainingEngine(EngineConfig(pretrain=path, optim=OptimConfig(learning_rate=1e-4, lr_warmup_ratio=0.0),
                                         build=build), total_steps=warmup + steps)

    def loss_fn(logits, batch):
        loss_sum = (tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"]) * batch["loss_mask"]).sum()
        return loss_sum * batch["scale"], {"loss_sum": loss_sum.detach()}

    tokens, elapsed = 0, 0.0
    for step in range(warmup + steps):
        samples = batches[step % len(batches)]
        batch = padded_batch(samples)
        batch["scale"] = 1.0 / float(batch["loss_mask"].sum())
        start = time.perf_counter()
        engine.train_step([batch], loss_fn)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            tokens += sum(len(s) for s in samples)
    inner = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    state = sum(_state_bytes(opt.optimizer.state.values()) for opt in inner)
    if torch.distributed.get_rank() == 0:
        torch.save((tokens / elapsed, state), result_file)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--lora_rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.max_len = 3, 1, 64
    with tempfile.TemporaryDirectory() as tmp:
        path = reference_model(tmp, quick=args.quick)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).vocab_size
        batches = [make_samples(sample_lengths(args.micro_batch_size, args.max_len, seed=i), vocab, seed=i)
                   for i in range(args.steps + args.warmup)]
        full = run_on_local_ranks(_engine_worker, 1, path, 0, batches, args.steps, args.warmup)
        lora = run_on_local_ranks(_engine_worker, 1, path, args.lora_rank, batches, args.steps, args.warmup)
        torch.set_num_threads(1)  # as the engine's one rank; more threads on the shared 2-core box thrash
        peft = hf_peft(path, batches, args.steps, args.warmup, args.lora_rank)
    rows = [("engine full fine-tuning", full[0], full[1] / 2**20, 1.0, 1.0),
            (f"engine LoRA r={args.lora_rank}", lora[0], lora[1] / 2**20, lora[0] / full[0], lora[1] / full[1]),
            (f"HF + PEFT LoRA r={args.lora_rank}", peft[0], peft[1] / 2**20, peft[0] / full[0], peft[1] / full[1])]
    print_table("SFT step, real tokens/s and optimizer state", ["run", "tokens/s", "optimizer MiB",
                                                               "speed vs full", "state vs full"], rows)
    print(f"\nengine LoRA vs HF + PEFT LoRA: {lora[0] / peft[0]:.2f}x tokens/s, "
          f"{lora[1] / max(peft[1], 1):.2f}x optimizer state")


if __name__ == "__main__":
    main()
