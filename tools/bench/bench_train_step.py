"""Training-step throughput: the Megatron engine vs HF transformers + plain PyTorch AdamW.

    python -m tools.bench.bench_train_step            # reference workload W, TP=1 and TP=2
    python -m tools.bench.bench_train_step --quick    # a smaller model, fewer steps
    python -m tools.bench.bench_train_step --arch mixtral --tp 1 --ep 1,2   # W's shape as a 4-expert top-2 MoE
    python -m tools.bench.bench_train_step --arch qwen3_moe --tp 1 --ep 2    # as Qwen3-MoE (qk-norm, head_dim 64)
    python -m tools.bench.bench_train_step --arch qwen3 --tp 1               # as Qwen3 (dense, qk-norm)
    python -m tools.bench.bench_train_step --arch deepseek_v3 --tp 1 --ep 2  # as DeepSeek-V3 (MLA, shared expert)
    python -m tools.bench.bench_train_step --arch glm4_moe --tp 1 --ep 2     # as GLM-4.5 (partial rotary)

Both sides train the same Llama-architecture model (workload W of DESIGN.md: hidden 512,
8 layers, 8 heads / 4 KV heads, intermediate 1408, the local tokenizer) on the same batches of
variable-length samples, fp32 on CPU (bf16 on GPU). Reported: real (non-padding) tokens per
second of each and the ratio engine / HF. HF first runs one untimed forward + backward over each
padded shape of the run (``warm_up_shapes``: its first pass over a new shape is not its speed). The
engine runs padded and packed batches. Under expert parallelism the ranks are data-parallel ranks,
each training the same batches: the throughput counted is all ranks' tokens.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from parallel.config import ParallelConfig
from tools.bench.common import print_table, reference_model, run_on_local_ranks


def sample_lengths(num_samples: int, max_len: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(max_len // 4, max_len + 1, (num_samples,), generator=generator).tolist()


def make_samples(lengths: list[int], vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab_size, (n,), generator=generator) for n in lengths]


def padded_batch(samples: list[torch.Tensor], multiple: int = 1) -> dict:
    length = max(len(s) for s in samples)
    length = -(-length // multiple) * multiple
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = s
        mask[i, : len(s) - 1] = 1
    labels = torch.roll(ids, -1, dims=1)
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "position_ids": torch.arange(length).expand_as(ids)}


def packed_batch(samples: list[torch.Tensor], multiple: int = 1) -> dict:
    ids = torch.cat(samples)
    total = -(-len(ids) // multiple) * multiple
    ids = torch.nn.functional.pad(ids, (0, total - len(ids)))
    labels = torch.roll(ids, -1)
    mask = torch.zeros(total)
    positions = torch.zeros(total, dtype=torch.long)
    cu = [0]
    for s in samples:
        start = cu[-1]
        mask[start : start + len(s) - 1] = 1  # the last token of a sample predicts nothing
        positions[start : start + len(s)] = torch.arange(len(s))
        cu.append(start + len(s))
    return {
        "input_ids": ids[None], "labels": labels[None], "loss_mask": mask[None], "position_ids": positions[None],
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }


# ----- HF baseline ---------------------------------------------------------------------------
def _hf_loss(model, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long()).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    return (losses * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()


def warm_up_shapes(model, batches: list[list[torch.Tensor]]) -> None:
    """One untimed forward + backward over each padded shape the timed steps will see. HF's first pass
    over a new shape can be far slower than the next (DeepSeek-V3's ~30x on CPU), and ``--quick`` brings a
    new length every step: timed cold, HF would be measured at its first-pass cost."""
    by_shape = {}
    for samples in batches:
        batch = padded_batch(samples)
        by_shape.setdefault(tuple(batch["input_ids"].shape), batch)
    for batch in by_shape.values():
        _hf_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def hf_tokens_per_second(path: str, batches: list[list[torch.Tensor]], steps: int, warmup: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    warm_up_shapes(model, batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    real_tokens, elapsed = 0, 0.0
    for step in range(warmup + steps):
        batch = padded_batch(batches[step % len(batches)])
        start = time.perf_counter()
        loss = _hf_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            elapsed += time.perf_counter() - start
            real_tokens += sum(len(s) for s in batches[step % len(batches)])
    return real_tokens / elapsed


# ----- Megatron engine -----------------------------------------------------------------------
def _engine_worker(path, layout, packing, batches, steps, warmup, result_file):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    engine = TrainingEngine(
        EngineConfig(
            pretrain=path,
            parallel=ParallelConfig(**layout),
            optim=OptimConfig(learning_rate=1e-5, lr_warmup_ratio=0.0),
        ),
        total_steps=warmup + steps,
    )

    def loss_fn(logits, batch):
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"])
        loss_sum = (losses * batch["loss_mask"]).sum()
        return loss_sum * batch["scale"], {"loss_sum": loss_sum.detach()}

    real_tokens, elapsed = 0, 0.0
    for step in range(warmup + steps):
        samples = batches[step % len(batches)]
        batch = packed_batch(samples) if packing else padded_batch(samples)
        batch["scale"] = 1.0 / float(batch["loss_mask"].sum())
        start = time.perf_counter()
        engine.train_step([batch], loss_fn)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            real_tokens += sum(len(s) for s in samples)
    if torch.distributed.get_rank() == 0:
        torch.save(real_tokens * engine.data_parallel_size / elapsed, result_file)


def engine_tokens_per_second(path, layout, packing, batches, steps, warmup) -> float:
    world = ParallelConfig(**layout).minimum_world_size()
    return run_on_local_ranks(_engine_worker, world, path, layout, packing, batches, steps, warmup)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--tp", default="1,2", help="comma-separated TP sizes for the engine")
    parser.add_argument("--arch", default="llama", choices=("llama", "mixtral", "qwen3", "qwen3_moe", "deepseek_v3", "glm4_moe"),
                        help="W's shape, dense or MoE (Qwen3 / Qwen3-MoE: with their q/k norms; DeepSeek-V3: MLA, "
                             "sigmoid routing, a shared expert, layer 0 dense; GLM-4.5: partial rotary, qk-norm, "
                             "the same MoE)")
    parser.add_argument("--ep", default="", help="comma-separated EP sizes (MoE; TP=1) besides the TP runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.max_len = 3, 2, 64

    with tempfile.TemporaryDirectory() as tmp:
        path = reference_model(tmp, quick=args.quick, arch=args.arch)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).vocab_size
        batches = [
            make_samples(sample_lengths(args.micro_batch_size, args.max_len, seed=i), vocab, seed=i)
            for i in range(args.steps + args.warmup)
        ]
        torch.set_num_threads(os.cpu_count() or 1)
        baseline = hf_tokens_per_second(path, batches, args.steps, args.warmup)
        rows = [("HF transformers + AdamW (padded)", baseline, 1.0)]
        layouts = [{"tensor_model_parallel_size": int(t)} for t in args.tp.split(",") if t]
        layouts += [{"expert_model_parallel_size": int(e)} for e in args.ep.split(",") if e and int(e) > 1]
        for layout in layouts:
            name = " ".join(f"{'TP' if k.startswith('tensor') else 'EP'}={v}" for k, v in layout.items())
            for packing in (False, True):
                tps = engine_tokens_per_second(path, layout, packing, batches, args.steps, args.warmup)
                rows.append((f"Megatron engine {name} {'packed' if packing else 'padded'}", tps, tps / baseline))
    print_table("training step, real tokens/s (higher is better)", ["run", "tokens/s", "ratio vs HF"], rows)


if __name__ == "__main__":
    main()
