"""GRPO on a long-tailed workload: the synchronous loop vs fully asynchronous rollouts.

    python -m tools.bench.bench_long_tail              # the demo's tiny model, four loops (each starts its stack)
    python -m tools.bench.bench_long_tail --steps 12 --loops sync partial   # two loops, longer

The workload: the demo's tiny Llama (random weights) on its addition prompts, ``--rollout_batch_size``
prompts x ``--n_samples_per_prompt`` samples per rollout, the arithmetic reward. The response
lengths get a long tail from the stop tokens: besides EOS, ``--stop_tokens`` ids spread over the
vocabulary end a response, so on an untrained model each token stops it with probability about
``stop_tokens / vocab``: lengths are geometric, most responses short, a few running to
``--generate_max_len`` (the rollout's mean length and the fraction cut at the cap are printed). A
synchronous rollout waits for its longest sample; that wait is what the asynchronous loops hide.

The loops, in one run, one after the other on the same Ray cluster (a one-rank Megatron actor and
one vLLM engine, fp32, as ``engine.cli.train_ppo_ray`` runs them):

* the synchronous loop (generate, score, train, sync);
* ``--async_train``: the next rollout generated while the actor trains (one step ahead);
* ``--async_train --max_staleness 2``: the rollout stream, generation up to two versions ahead;
* the same with ``--partial_rollout``: at a weight sync unfinished samples stop and resume on
  the new weights from their token ids (chunks of ``--partial_rollout_chunk`` tokens).

The asynchronous loops run with ``--vllm_is_correction`` (their samples are off-policy). Each
rollout is timed end to end (``time/step``: waiting for or generating the rollout, scoring,
training, the weight sync); the table shows the medians over the rollouts after
``--warmup_steps`` (and before the last two, which have nothing left to generate ahead), the
response tokens per second, and each loop's speed-up over the synchronous
loop measured in the same run. On a shared box the numbers move with the load (printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from tools.bench.common import print_table

REPO = Path(__file__).resolve().parents[2]
PHASES = ("generate", "generate_wait", "score", "train", "sync")
# Every loop runs this many rollouts past the measured ones, unmeasured: the last rollouts of an
# asynchronous loop have nothing left to generate ahead (up to 2 with --max_staleness 2) and
# would time training alone.
TAIL = 2
#: ``--loops`` key: (the table's label, the loop's flags)
LOOPS = {
    "sync": ("synchronous", ()),
    "async": ("--async_train", ("--async_train", "--vllm_is_correction")),
    "stale2": ("--async_train --max_staleness 2", ("--async_train", "--max_staleness", "2", "--vllm_is_correction")),
    "partial": ("--max_staleness 2 --partial_rollout", ("--async_train", "--max_staleness", "2", "--partial_rollout",
                                                         "--vllm_is_correction")),
}


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout_batch_size", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--n_samples_per_prompt", type=int, default=4)
    parser.add_argument("--generate_max_len", type=int, default=192, help="the tail's cap")
    parser.add_argument("--stop_tokens", type=int, default=10,
                        help="ids besides EOS that end a response (the tail's shape: more, shorter)")
    parser.add_argument("--partial_rollout_chunk", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="measured rollouts per loop")
    parser.add_argument("--loops", nargs="+", choices=list(LOOPS), default=list(LOOPS),
                        help="which loops to run: sync, --async_train, --max_staleness 2, the same with "
                             "--partial_rollout (sync is the ratios' baseline)")
    return parser.parse_args(argv)


def stop_token_ids(tokenizer, count: int) -> tuple[int, ...]:
    """EOS and ``count`` ordinary ids spread evenly over the vocabulary (not the special tokens)."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    step = max(1, len(ordinary) // max(1, count))
    return (tokenizer.eos_token_id, *ordinary[step // 2::step][:count])


def _argv(model: str, data: str, run_dir: Path, args, extra: tuple[str, ...]) -> list[str]:
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    chunk = ("--partial_rollout_chunk", str(args.partial_rollout_chunk)) if "--partial_rollout" in extra else ()
    return [
        "--run_dir", str(run_dir), "--pretrain", model, "--prompt_data", f"json@{data}", "--input_key", "prompt",
        "--label_key", "label", "--remote_rm_url", str(REPO / "engine" / "tasks" / "arithmetic.py"),
        "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--n_samples_per_prompt", str(args.n_samples_per_prompt), "--rollout_batch_size", str(args.rollout_batch_size),
        "--train_batch_size", str(samples), "--micro_train_batch_size", str(samples),
        "--micro_rollout_batch_size", str(samples), "--generate_max_len", str(args.generate_max_len),
        "--max_steps", str(args.warmup_steps + args.steps + TAIL), "--learning_rate", "1e-6", "--lr_warmup_ratio", "0",
        "--lr_scheduler", "constant", "--enforce_eager", "--vllm_dtype", "float32", "--seed", "0", *extra, *chunk,
    ]


def run_loop(model: str, data: str, run_dir: Path, args, extra: tuple[str, ...], stops: tuple[int, ...]) -> dict:
    """Median seconds per phase and per rollout, response tokens per second, the tail's shape."""
    from engine.cli import train_ppo_ray

    job = train_ppo_ray.parse_args(_argv(model, data, run_dir, args, extra))
    history = train_ppo_ray.build_and_fit(job, sampling_overrides={"stop_token_ids": stops})
    measured = history[args.warmup_steps:args.warmup_steps + args.steps]
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    result = {phase: statistics.median(h.get(f"time/{phase}", 0.0) for h in measured) for phase in PHASES}
    result["step"] = statistics.median(h["time/step"] for h in measured)
    tokens = sum(h["response_length"] * samples for h in measured)
    result["tokens/s"] = tokens / sum(h["time/step"] for h in measured)
    result["mean length"] = statistics.mean(h["response_length"] for h in measured)
    result["at cap"] = statistics.mean(h["truncated_ratio"] for h in measured)
    result["staleness"] = max(h.get("rollout/staleness", 0) for h in measured)
    return result


def main(argv=None) -> None:
    import ray

    from engine.cli import demo
    from models.sources import ModelSource

    args = _parse_args(argv)
    print(f"load average before: {os.getloadavg()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_long_tail_"))
    model, data = demo.prepare(workdir)
    stops = stop_token_ids(ModelSource.open(model).tokenizer(), args.stop_tokens)
    print(f"workload: GRPO {args.rollout_batch_size} prompts x {args.n_samples_per_prompt} samples, "
          f"responses up to {args.generate_max_len} tokens, stop ids {list(stops)}; "
          f"{args.warmup_steps} warm-up + {args.steps} measured rollouts per loop", flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        results = {LOOPS[key][0]: run_loop(model, data, workdir / f"run{i}", args, LOOPS[key][1], stops)
                   for i, key in enumerate(args.loops)}
    finally:
        ray.shutdown()
    base = results.get("synchronous")
    rows = [(name, r["step"], *(r[p] for p in PHASES), r["mean length"], r["at cap"], r["staleness"], r["tokens/s"],
             base["step"] / r["step"] if base else "-") for name, r in results.items()]
    print_table("GRPO on a long-tailed workload, end to end per rollout (median seconds over the measured rollouts; "
                "generate_wait: async, the wait for the rollout the stream generated)",
                ["loop", "rollout s", *(f"{p} s" for p in PHASES), "mean length", "at cap", "max staleness",
                 "tokens/s", "sync s / this"], rows)
    if base:
        for name, r in results.items():
            if name != "synchronous":
                print(f"{name} / synchronous: {base['step'] / r['step']:.2f}x rollouts per second, "
                      f"{r['tokens/s'] / base['tokens/s']:.2f}x tokens per second")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
