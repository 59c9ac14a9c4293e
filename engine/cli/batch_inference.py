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

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from engine.cli.options import group, parse_job, run_cli
from engine.data.config import DataConfig
from engine.ray.config import VLLMEngineConfig
from engine.rl.rollout import SamplingConfig
from parallel.options import option


@dataclass(kw_only=True)
class BatchTask:
    """What to run and where the rows go."""

    eval_task: Literal["generate", "generate_vllm", "rm"] = option(help="generate (= generate_vllm) | rm")
    pretrain: str = option(help="the policy (generate) or reward model (rm): HF directory or Megatron checkpoint")
    output_path: str = option(help="jsonl file to write")
    seed: int = option(1234, help="sampling seed")
    iter: int | None = option(None, help="with --rollout_batch_size: use prompt slice number ITER")
    rollout_batch_size: int | None = option(None, help="prompts per --iter slice")
    enable_csft: bool = option(False, help="conditional SFT: generate with --csft_prompt after every prompt")
    csft_prompt: str = option("<rm_score>: 5.00", help="the score the generations are conditioned on (OpenRLHF's)")

    def __post_init__(self) -> None:
        if (self.iter is not None and self.iter < 0) or (self.rollout_batch_size is not None
                                                          and self.rollout_batch_size < 1):
            raise ValueError("--iter must be >= 0 and --rollout_batch_size >= 1")


@dataclass(kw_only=True)
class RewardScoring:
    """Reward scoring (--eval_task rm) and selection."""

    micro_batch_size: int = option(16, help="reward-model batch size")
    post_processor: Literal["rs", "best_of_n", "csft", "iter_dpo"] | None = option(
        None, help="rs/best_of_n: best output per input; csft: reward-conditioned inputs; iter_dpo: pairs")
    reward_template: str | None = option(None, help='csft: default "{input} <rm_score>: {reward} "')
    normalize_reward: bool = option(False, help="standardise rewards before post-processing")
    value_head_prefix: str = option("score", help="the reward model's head tensor is <prefix>.weight (OpenRLHF's)")


@dataclass(kw_only=True)
class BatchInferenceJob:
    task: BatchTask = group(title="task")
    sampling: SamplingConfig = group(title="generation (vLLM)", rename={"n_samples_per_prompt": "best_of_n"},
                                     aliases={"n_samples_per_prompt": ("n_samples_per_prompt",),
                                              "max_new_tokens": ("max_new_tokens",)},
                                     value_aliases={"temperature": {"greedy_sampling": 0.0}}, factory=SamplingConfig)
    vllm: VLLMEngineConfig = group(title="generation (vLLM)", exclude=("enable_sleep_mode",),
                                   aliases={"tensor_parallel_size": ("tp_size",)}, factory=VLLMEngineConfig)
    scoring: RewardScoring = group(title="reward scoring and selection", factory=RewardScoring)
    data: DataConfig = group(title="data", aliases={"train_split": ("dataset_split",)},
                             exclude=("chosen_key", "rejected_key", "prompt_key", "eval_split", "pretrain_mode",
                                      "packing_samples", "multiturn"))

    derived: ClassVar[dict[str, str]] = {"sampling.seed": "task.seed", "vllm.seed": "task.seed",
                                         "data.seed": "task.seed", "vllm.pretrain": "task.pretrain"}


def parse_args(argv=None) -> BatchInferenceJob:
    return parse_job(BatchInferenceJob, argv, description=__doc__, overrides={"sampling.logprobs": False})


def _prompt_slice(task: BatchTask, prompts: list) -> list:
    if task.iter is None or task.rollout_batch_size is None:
        return prompts
    size = min(task.rollout_batch_size, len(prompts))
    start = (task.iter * size) % max(len(prompts), 1)  # wrap around the prompt set
    chosen = prompts[start:start + size]
    return chosen + prompts[: size - len(chosen)]


def run_generate(job: BatchInferenceJob) -> list[dict]:
    """vLLM engines on Ray (joins ``RAY_ADDRESS`` or an already initialised cluster, else starts one)."""
    import ray
    from transformers import AutoTokenizer

    from engine.data.prompts import PromptDataset
    from engine.inference.batch import conditioned_prompts, generate_rows
    from engine.inference.hf_model import hf_model_dir
    from engine.ray.cluster import join_cluster
    from engine.ray.vllm_engine import create_engines, shutdown_engines

    with hf_model_dir(job.task.pretrain, flag="--pretrain", value_head=False) as hf_path:
        tokenizer = AutoTokenizer.from_pretrained(hf_path)
        prompts = _prompt_slice(job.task, list(PromptDataset.from_config(job.data, tokenizer,
                                                                         split=job.data.train_split)))
        if job.task.enable_csft:
            prompts = conditioned_prompts(prompts, tokenizer, job.task.csft_prompt)
        started_ray = not ray.is_initialized()
        if started_ray:
            join_cluster()
        engines = create_engines(replace(job.vllm, pretrain=hf_path))
        try:
            return generate_rows(engines, tokenizer, prompts, job.sampling)
        finally:
            shutdown_engines(engines)
            if started_ray:
                ray.shutdown()


def run_rm(job: BatchInferenceJob) -> list[dict]:
    from engine.data.loading import blend_datasets
    from engine.inference import batch

    data, scoring = job.data, job.scoring
    rows = blend_datasets(data, split=data.train_split)
    rows = [rows[i] for i in range(len(rows))]
    scorer = batch.RewardScorer(job.task.pretrain, micro_batch_size=scoring.micro_batch_size, max_len=data.max_len,
                                value_head_prefix=scoring.value_head_prefix)
    scored = scorer.score_rows(rows, input_key=data.input_key, output_key=data.output_key)
    if scoring.normalize_reward:
        scored = batch.normalize_rewards(scored)
    if scoring.post_processor in ("rs", "best_of_n"):
        return batch.best_of_n(scored)
    if scoring.post_processor == "csft":
        return batch.conditional_sft_rows(scored,
                                          reward_template=scoring.reward_template or batch.DEFAULT_REWARD_TEMPLATE)
    if scoring.post_processor == "iter_dpo":
        return batch.iterative_dpo_pairs(scored)
    return scored


def main(argv=None) -> list[dict]:
    job = parse_args(argv)  # first: --help imports nothing heavy
    from engine.inference.batch import write_jsonl

    if job.scoring.post_processor and job.task.eval_task != "rm":
        raise SystemExit("--post_processor needs --eval_task rm (the rewards it selects by)")
    rows = run_rm(job) if job.task.eval_task == "rm" else run_generate(job)
    write_jsonl(rows, job.task.output_path)
    print(f"wrote {len(rows)} rows to {job.task.output_path}", flush=True)
    return rows


if __name__ == "__main__":
    run_cli(main)
