"""Offline batch inference (OpenRLHF's batch_inference flags): generate, score, select.

    # N samples per prompt with vLLM engines -> {"input", "output"} rows
    python -m engine.cli.batch_inference --eval_task generate --pretrain POLICY_HF --dataset prompts.jsonl \\
        --input_key question --apply_chat_template --best_of_n 4 --temperature 1.0 --generate_max_len 256 \\
        --vllm_num_engines 1 --output_path gen.jsonl [--iter 0 --rollout_batch_size 1024]

    # reward-score {"input", "output"} rows -> adds "reward"; optionally post-process
    python -m engine.cli.batch_inference --eval_task rm --pretrain RM_HF --dataset gen.jsonl \\
        --micro_batch_size 16 --output_path scored.jsonl [--post_processor rs|csft|iter_dpo]

``--post_processor rs`` keeps the best output per input (rejection sampling / best-of-n),
``csft`` rewrites ``input`` with ``--reward_template`` for conditional SFT, ``iter_dpo`` writes
``{"prompt", "chosen", "rejected"}`` pairs (best vs worst per input) for iterative DPO.
"""
from __future__ import annotations

import argparse

from engine.cli.data_args import add_data_args, data_config

TASKS = ("generate", "generate_vllm", "rm")
POST_PROCESSORS = ("rs", "best_of_n", "csft", "iter_dpo")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_task", required=True, choices=TASKS, help="generate (= generate_vllm) | rm")
    parser.add_argument("--pretrain", required=True, help="HF directory: the policy (generate) or reward model (rm)")
    parser.add_argument("--output_path", required=True, help="jsonl file to write")
    parser.add_argument("--seed", type=int, default=42)
    g = parser.add_argument_group("generation (vLLM)")
    g.add_argument("--best_of_n", "--n_samples_per_prompt", dest="best_of_n", type=int, default=1,
                   help="samples per prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--generate_max_len", "--max_new_tokens", dest="generate_max_len", type=int, default=1024)
    g.add_argument("--vllm_num_engines", type=int, default=1)
    g.add_argument("--vllm_tensor_parallel_size", "--tp_size", dest="vllm_tensor_parallel_size", type=int, default=1)
    g.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.9)
    g.add_argument("--enforce_eager", action="store_true")
    g.add_argument("--iter", type=int, default=None, help="with --rollout_batch_size: use prompt slice number ITER")
    g.add_argument("--rollout_batch_size", type=int, default=None, help="prompts per --iter slice")
    g = parser.add_argument_group("reward scoring and selection")
    g.add_argument("--micro_batch_size", type=int, default=16, help="reward-model batch size")
    g.add_argument("--post_processor", choices=POST_PROCESSORS, default=None,
                   help="rs/best_of_n: best output per input; csft: reward-conditioned inputs; iter_dpo: pairs")
    g.add_argument("--reward_template", default=None, help='csft: default "{input} <rm_score>: {reward} "')
    g.add_argument("--normalize_reward", action="store_true", help="standardise rewards before post-processing")
    add_data_args(parser)
    return parser.parse_args(argv)


def _prompt_slice(args, prompts: list) -> list:
    if args.iter is None or args.rollout_batch_size is None:
        return prompts
    if args.iter < 0 or args.rollout_batch_size < 1:
        raise ValueError("--iter must be >= 0 and --rollout_batch_size >= 1")
    size = min(args.rollout_batch_size, len(prompts))
    start = (args.iter * size) % max(len(prompts), 1)  # wrap around the prompt set
    chosen = prompts[start:start + size]
    return chosen + prompts[: size - len(chosen)]


def run_generate(args) -> list[dict]:
    """vLLM engines on Ray (joins ``RAY_ADDRESS`` or an already initialised cluster, else starts one)."""
    import ray
    from transformers import AutoTokenizer

    from engine.data.prompts import PromptDataset
    from engine.inference.batch import generate_rows
    from engine.ray.vllm_engine import SamplingConfig, VLLMEngineConfig, create_engines, shutdown_engines

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.generate_max_len,
                              n_samples_per_prompt=args.best_of_n, seed=args.seed, logprobs=False)
    engine_config = VLLMEngineConfig(
        pretrain=args.pretrain, num_engines=args.vllm_num_engines, tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=args.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.pretrain)
    data = data_config(args)
    prompts = _prompt_slice(args, list(PromptDataset.from_config(data, tokenizer, split=data.train_split)))
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init()
    engines = create_engines(engine_config)
    try:
        return generate_rows(engines, tokenizer, prompts, sampling)
    finally:
        shutdown_engines(engines)
        if started_ray:
            ray.shutdown()


def run_rm(args) -> list[dict]:
    from engine.data.loading import blend_datasets
    from engine.inference import batch

    data = data_config(args)
    rows = blend_datasets(data, split=data.train_split)
    rows = [rows[i] for i in range(len(rows))]
    scorer = batch.RewardScorer(args.pretrain, micro_batch_size=args.micro_batch_size, max_len=args.max_len)
    scored = scorer.score_rows(rows, input_key=args.input_key, output_key=args.output_key)
    if args.normalize_reward:
        scored = batch.normalize_rewards(scored)
    if args.post_processor in ("rs", "best_of_n"):
        return batch.best_of_n(scored)
    if args.post_processor == "csft":
        return batch.conditional_sft_rows(scored, reward_template=args.reward_template or batch.DEFAULT_REWARD_TEMPLATE)
    if args.post_processor == "iter_dpo":
        return batch.iterative_dpo_pairs(scored)
    return scored


def main(argv=None) -> list[dict]:
    from engine.inference.batch import write_jsonl

    args = parse_args(argv)
    if args.post_processor and args.eval_task != "rm":
        raise SystemExit("--post_processor needs --eval_task rm (the rewards it selects by)")
    rows = run_rm(args) if args.eval_task == "rm" else run_generate(args)
    write_jsonl(rows, args.output_path)
    print(f"wrote {len(rows)} rows to {args.output_path}", flush=True)
    return rows


if __name__ == "__main__":
    main()
