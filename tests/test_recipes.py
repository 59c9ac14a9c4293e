"""Every recipe in scripts/recipes/ still fits, as its header says, and launches a valid job.

The header's ``# plan:`` line is run through the planner: the layout must fit and the stated peak
memory and step time must be what the planner prints now. The script itself runs with ``sbatch``
and ``ray`` stand-ins on PATH that record what they were given; the trainer command line it builds
must parse with the trainer's own parser (every flag known, every value valid)."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.dist_harness import run_distributed

RECIPES = sorted(Path("scripts/recipes").glob("*.sh"))
RECORDER = """#!/usr/bin/env bash
{ env | grep -E '^(TRAINER|PRETRAIN|DATASET|TP|PP|CP|TRAIN_BATCH_SIZE|MICRO_TRAIN_BATCH_SIZE|MAX_LEN|LEARNING_RATE|\
PROMPT_DATA|REMOTE_RM_URL|REWARD_PRETRAIN|ADVANTAGE_ESTIMATOR|ACTOR_NUM_NODES|ACTOR_TP|ACTOR_PP|VLLM_NUM_ENGINES|VLLM_TP|\
N_SAMPLES_PER_PROMPT|ROLLOUT_BATCH_SIZE|PROMPT_MAX_LEN|GENERATE_MAX_LEN)=' | sed 's/^/ENV /'
  printf 'ARG %s\\n' "$0" "$@"; } > "$RECORD"
"""
OFFLINE_ENV = {"PRETRAIN": "--pretrain", "DATASET": "--dataset", "TP": "--tensor_model_parallel_size",
               "PP": "--pipeline_model_parallel_size", "CP": "--context_parallel_size",
               "TRAIN_BATCH_SIZE": "--train_batch_size", "MICRO_TRAIN_BATCH_SIZE": "--micro_train_batch_size",
               "MAX_LEN": "--max_len", "LEARNING_RATE": "--learning_rate"}
RL_ENV = {"PRETRAIN": "--pretrain", "PROMPT_DATA": "--prompt_data", "REMOTE_RM_URL": "--remote_rm_url",
          "REWARD_PRETRAIN": "--reward_pretrain", "ADVANTAGE_ESTIMATOR": "--advantage_estimator",
          "ACTOR_NUM_NODES": "--actor_num_nodes", "ACTOR_TP": "--actor_tensor_model_parallel_size",
          "ACTOR_PP": "--actor_pipeline_model_parallel_size", "VLLM_NUM_ENGINES": "--vllm_num_engines",
          "VLLM_TP": "--vllm_tensor_parallel_size", "N_SAMPLES_PER_PROMPT": "--n_samples_per_prompt",
          "ROLLOUT_BATCH_SIZE": "--rollout_batch_size", "TRAIN_BATCH_SIZE": "--train_batch_size",
          "MICRO_TRAIN_BATCH_SIZE": "--micro_train_batch_size", "PROMPT_MAX_LEN": "--prompt_max_len",
          "GENERATE_MAX_LEN": "--generate_max_len"}


def _header(recipe: Path) -> tuple[list[str], float, float]:
    text = recipe.read_text()
    plan = re.search(r"^# plan: (.+)$", text, re.M).group(1)
    stated = re.search(r"^# planner: peak ([\d.]+) GB per GPU .*step ~([\d.]+) s", text, re.M)
    return shlex.split(plan), float(stated.group(1)), float(stated.group(2))


def _plan(_rank, _world, argv):
    from tools.plan.cli import parse_args, run

    return run(parse_args(argv + ["--json"]))


def test_there_is_a_recipe_for_each_case_of_the_issue():
    names = {p.name for p in RECIPES}
    assert {"llama3_70b_sft.slurm.sh", "llama3_70b_dpo.slurm.sh", "llama3_70b_ppo.ray.sh", "llama3_70b_grpo.slurm.sh",
            "mixtral_8x7b_sft_ep.slurm.sh", "llama3_8b_ppo_1node.ray.sh", "qwen3_8b_grpo_1node.ray.sh",
            "qwen3_30b_a3b_grpo_2nodes.ray.sh", "qwen3_235b_a22b_grpo.slurm.sh", "moonlight_16b_a3b_grpo_1node.ray.sh",
            "deepseek_v3_grpo.slurm.sh", "glm45_air_grpo.slurm.sh"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_fits_as_its_header_says(recipe):
    argv, peak_gb, step_s = _header(recipe)
    plan = run_distributed(_plan, world_size=1, args=(argv,), timeout=300)[0]
    assert plan["fits"], plan["reasons"]
    assert abs(plan["peak_bytes"] / 1e9 - peak_gb) <= 0.15, (plan["peak_bytes"] / 1e9, peak_gb)
    assert abs(plan["step_seconds"] - step_s) <= 0.1 * step_s, (plan["step_seconds"], step_s)


def _recorded(recipe: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "ray"):
        (bin_dir / tool).write_text(RECORDER)
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "record"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}
    subprocess.run(["bash", str(recipe)], check=True, env=env, timeout=60)
    lines = record.read_text().splitlines()
    variables = dict(line[4:].split("=", 1) for line in lines if line.startswith("ENV "))
    return variables, [line[4:] for line in lines if line.startswith("ARG ")]


def _trainer_argv(variables: dict, args: list[str]) -> tuple[str, list[str]]:
    if args[0].endswith("/ray"):  # ray job submit --working-dir . -- python -m MODULE FLAGS...
        module_at = args.index("-m") + 1
        return args[module_at], args[module_at + 1:]
    script = next(i for i, a in enumerate(args) if a.endswith(".sbatch"))
    rl = args[script].endswith("train_ppo_ray.sbatch")
    mapping = RL_ENV if rl else OFFLINE_ENV
    argv = [w for var, flag in mapping.items() if var in variables for w in (flag, variables[var])]
    module = "engine.cli.train_ppo_ray" if rl else f"engine.cli.train_{variables['TRAINER']}"
    return module, argv + args[script + 1:]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_launches_a_command_its_trainer_accepts(recipe, tmp_path):
    module, argv = _trainer_argv(*_recorded(recipe, tmp_path))
    job = importlib.import_module(module).parse_args(argv)
    plan_argv, _, _ = _header(recipe)
    stated = dict(zip(plan_argv[::2], plan_argv[1::2]))
    parallel = job.actor.parallel if hasattr(job, "actor") else job.trainer.engine.parallel
    # The script's layout is the one its header planned.
    assert parallel.tensor_model_parallel_size == int(stated["--tensor_model_parallel_size"])
    assert parallel.pipeline_model_parallel_size == int(stated["--pipeline_model_parallel_size"])
    assert parallel.expert_model_parallel_size == int(stated.get("--expert_model_parallel_size", 1))
    for flag in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):  # an uneven split
        assert getattr(parallel, flag) == (int(stated[f"--{flag}"]) if f"--{flag}" in stated else None), flag


def test_the_qwen3_moe_recipe_replays_the_routing_under_full_recompute(tmp_path):
    """The 2-node Qwen3-30B-A3B recipe needs full recompute and replays the engines' routing (accepted:
    the recomputed routers replay their own micro-batch, tests/test_router_replay.py)."""
    from engine.cli import train_ppo_ray

    module, argv = _trainer_argv(*_recorded(Path("scripts/recipes/qwen3_30b_a3b_grpo_2nodes.ray.sh"), tmp_path))
    job = importlib.import_module(module).parse_args(argv)
    assert job.ppo.router_replay and job.build.recompute_granularity == "full"
    train_ppo_ray.check_router_replay(job, num_experts=128)
