"""The main job on a built-in tiny default: no downloads, a few minutes on a 2-core CPU box.

    python -m engine.cli.demo [--workdir runs/demo] [--tensor_model_parallel_size 2] [--rl_steps 30]

1. builds a tiny Llama-architecture model and a locally trained tokenizer;
2. writes a synthetic verifiable task (two-number addition) as jsonl;
3. supervised-fine-tunes the model with Megatron TP=2 on two CPU processes (loss printed);
4. runs GRPO on Ray: a TP=2 Megatron actor, a vLLM engine resharded from the actor's weights
   before every rollout, and the task's rule-based reward (``engine/tasks/arithmetic.py``),
   printing the reward curve;
5. saves HF checkpoints of both stages and shows the final model's greedy answers.

``--task calculator_tool`` runs the multi-turn version (``engine/tasks/calculator_tool.py``): the
prompts are products ("7*8="), the SFT data demonstrates both turns (the tool call ``calc(7*8)``,
then the answer after the tool's output), and GRPO runs with ``--agent_task calculator_tool``:
each trajectory is the model's tool call, the tool's output (masked from the loss), the answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.cli.options import group, parse_job, run_cli
from parallel.options import option


@dataclass(kw_only=True)
class DemoOptions:
    """The demo's sizes."""

    workdir: str = option("runs/demo", help="where the model, data, logs and checkpoints go")
    tensor_model_parallel_size: int = option(2, help="TP of the SFT stage and of the GRPO actor")
    max_epochs: int = option(6, help="SFT epochs")
    rl_steps: int = option(30, help="GRPO rollouts (0 skips RL)")
    task: Literal["addition", "calculator_tool"] = option(
        "addition", help="addition (one turn) | calculator_tool (multi-turn: a tool call, the tool's output, the answer)")


@dataclass(kw_only=True)
class DemoJob:
    demo: DemoOptions = group(title="demo", factory=DemoOptions)


def parse_args(argv=None) -> DemoOptions:
    return parse_job(DemoJob, argv, description=__doc__).demo


def _tiny_model(workdir: Path) -> str:
    from models.tiny import build_tiny_model

    model = workdir / "tiny-llama"
    if not (model / "config.json").exists():
        build_tiny_model("llama", model, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=4)
    return str(model)


def prepare_calculator(workdir: Path) -> tuple[str, str, str]:
    """The tiny model, the SFT demonstrations of both turns, and the RL prompts (with labels)."""
    from engine.tasks.arithmetic import write_jsonl
    from engine.tasks.calculator_tool import make_rows, sft_rows
    from models.tiny import EOS

    model = _tiny_model(workdir)
    sft, prompts = workdir / "calculator_sft", workdir / "calculator"
    write_jsonl(sft_rows(make_rows(512, seed=0), eos=EOS), sft / "train.jsonl")
    write_jsonl(sft_rows(make_rows(32, seed=1), eos=EOS), sft / "test.jsonl")
    write_jsonl(make_rows(1024, seed=2), prompts / "train.jsonl")
    return model, str(sft), str(prompts)


def prepare(workdir: Path) -> tuple[str, str]:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    model = _tiny_model(workdir)
    data = workdir / "addition"
    write_jsonl(make_rows(1024, max_operand=9, seed=0), data / "train.jsonl")
    write_jsonl(make_rows(64, max_operand=9, seed=1), data / "test.jsonl")
    return model, str(data)


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    if args.task == "calculator_tool":
        model, data, prompts = prepare_calculator(workdir)
    else:
        model, data = prepare(workdir)
        prompts = data
    from engine.cli import train_sft

    sft_out = workdir / "sft"
    train_sft.main([
        # The RL stage prompts with the raw "3+4=": no template (train_sft's default is OpenRLHF's).
        "--pretrain", model, "--dataset", f"json@{data}", "--input_key", "prompt", "--output_key", "answer",
        "--input_template", "", "--eval_split", "test", "--max_len", "48" if args.task == "calculator_tool" else "32",
        "--tensor_model_parallel_size", str(args.tensor_model_parallel_size),
        "--train_batch_size", "64", "--micro_train_batch_size", "16", "--max_epochs", str(args.max_epochs),
        "--learning_rate", "3e-3", "--lr_warmup_ratio", "0.05", "--logging_steps", "8",
        "--use_tensorboard", str(workdir / "tensorboard"), "--save_path", str(sft_out),
    ])
    print(f"\nSFT model (HF format): {sft_out}")
    final = sft_out
    if args.rl_steps > 0:
        final = workdir / "grpo"
        history = _grpo(args, str(sft_out), prompts, final)
        rewards = [h["reward"] for h in history]
        print("\nGRPO reward per rollout: " + " ".join(f"{r:.2f}" for r in rewards))
        if len(rewards) >= 6:
            print(f"mean reward of the first 3 rollouts {sum(rewards[:3]) / 3:.2f}, of the last 3 {sum(rewards[-3:]) / 3:.2f}")
        print(f"GRPO model (HF format): {final}")
    if args.task == "addition":
        _show_answers(str(final))
    else:
        print("tool use per rollout (agent/tool_use): " + " ".join(f"{h['agent/tool_use']:.2f}" for h in history)
              if args.rl_steps > 0 else "")
    print(f"\nWhere to look: SFT curves in {workdir / 'tensorboard'}" + (
        f"; GRPO reward per rollout in {_run_dir(args) / 'reward.png'}, every rollout's metrics in "
        f"{_run_dir(args) / 'metrics.jsonl'}, the engines' logs in {_run_dir(args) / 'ray_logs'}"
        if args.rl_steps > 0 else ""))


def _grpo(args, model: str, data: str, out: Path) -> list[dict]:
    from engine.cli import train_ppo_ray
    from engine.tasks import arithmetic

    if args.task == "calculator_tool":  # the environment rewards; each turn up to 10 tokens
        task = ["--agent_task", "calculator_tool", "--max_turns", "3", "--max_len", "64", "--generate_max_len", "10"]
    else:
        task = ["--remote_rm_url", arithmetic.__file__, "--generate_max_len", "6"]
    return train_ppo_ray.main([
        "--pretrain", model, "--prompt_data", f"json@{data}", "--input_key", "prompt", "--label_key", "label",
        *task, "--advantage_estimator", "grpo", "--n_samples_per_prompt", "8",
        # 8 optimizer steps per rollout (256 samples, batches of 32, two epochs): the sampled
        # accuracy after SFT (~0.5, greedy ~0.9) climbs towards the greedy one within 30 rollouts.
        "--rollout_batch_size", "32", "--train_batch_size", "32", "--micro_train_batch_size", "32",
        "--max_epochs", "2", "--micro_rollout_batch_size", "64",
        "--max_steps", str(args.rl_steps),
        "--learning_rate", "2e-4", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant", "--init_kl_coef", "0",
        "--actor_num_gpus_per_node", str(args.tensor_model_parallel_size),
        "--actor_tensor_model_parallel_size", str(args.tensor_model_parallel_size),
        "--enforce_eager", "--vllm_dtype", "float32", "--save_path", str(out),
        "--use_tensorboard", str(Path(args.workdir) / "tensorboard_grpo"), "--run_dir", str(_run_dir(args)),
    ])


def _run_dir(args) -> Path:
    return Path(args.workdir) / "grpo_run"


def _show_answers(path: str) -> None:
    """Greedy answers of the trained model with HF transformers: the checkpoint really works."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for prompt in ("3+4=", "8+9=", "5+0="):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(f"  {prompt}{tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")


if __name__ == "__main__":
    run_cli(main)
