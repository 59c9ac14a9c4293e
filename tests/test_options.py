"""Every CLI flag maps to exactly one config field and back (engine/cli/options.py).

For every job: the parser's option strings are exactly the flags generated from the job's option
fields plus its CLI's entries of the OpenRLHF table (engine/cli/openrlhf_compat.py), which are not
fields; every option field of the job's configs is a flag or deliberately excluded; and setting
any one flag to a non-default value changes that field, and no other option field, in the job
the CLI builds. An OpenRLHF entry changes nothing and prints its notice, is refused naming the
flag, or (a fan-out) changes exactly the fields of the flags it stands for. Errors name the flag
as the user typed it (role prefixes, renamed groups).
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from engine.cli.options import OptionError, build_job, build_parser, foreign_flags, job_flags, parse_job, unwrap_optional
from engine.ray.rollout_backends import register_rollout_backend
from engine.rl.policy_losses.registry import PolicyLoss, register_policy_loss
from parallel.options import option_info

JOBS = {
    "engine.cli.train_sft": "SFTJob", "engine.cli.train_rm": "RMJob", "engine.cli.train_dpo": "DPOJob",
    "engine.cli.train_kto": "KTOJob", "engine.cli.train_prm": "PRMJob", "engine.cli.train_kd": "KDJob",
    "engine.cli.train_ppo_ray": "PPOJob", "engine.cli.serve_rm": "ServeRMJob",
    "engine.cli.batch_inference": "BatchInferenceJob", "engine.cli.demo": "DemoJob",
    "tools.convert.hf_to_mcore": "ToMcoreJob", "tools.convert.mcore_to_hf": "ToHFJob",
    "tools.convert.lora_combiner": "CombinerJob", "tools.plan.cli": "PlanJob", "tools.doctor": "DoctorJob",
}
REQUIRED = {"hf_path": "hf", "save_path": "out", "load_path": "mcore", "model_path": "base", "lora_path": "adapter",
            "pretrain": "model", "dataset": "d.jsonl", "actor_ckpt": "ckpt", "prompts": "p.jsonl",
            "prompt_data": "p.jsonl", "teacher_model": "teacher",
            "placeholder_token": "k", "reward_pretrain": "rm", "output_path": "out.jsonl", "eval_task": "generate"}
# Values that a generic rule would make invalid, and flags that only make sense with another.
SPECIAL = {"recompute_modules": "mlp", "target_modules": "q_proj", "eval_steps": "4",
           "input_template": "Q: {}", "ema_beta": "0.5", "dataset_probs": "1.0", "prompt_data_probs": "1.0", "top_k": "5",
           "train_batch_size": "4", "policy_loss_type": "options_test_loss", "rollout_backend": "options_test_backend",
           "agent_task": "calculator_tool"}
# --policy_loss_type's other valid value: a loss registered here (only "ppo" is shipped)
register_policy_loss("options_test_loss")(type("OptionsTestLoss", (PolicyLoss,), {}))
# --rollout_backend's: a backend registered by name only (never started by these tests)
register_rollout_backend("options_test_backend", "tests.hf_rollout_backend:BACKEND")
NEEDS = {"tokenizer_chat_template": ["--apply_chat_template"], "multiturn": ["--apply_chat_template"],
         "load_checkpoint": ["--ckpt_path", "c"], "require_checkpoint": ["--load_checkpoint", "--ckpt_path", "c"],
         "ema_beta": ["--enable_ema"], "doctor_every": ["--enforce_eager"],
         "vllm_is_correction_type": ["--vllm_is_correction", "--vllm_is_truncated_threshold", "0.5", "5.0"],
         "cispo_eps_clip_low": ["--policy_loss_type", "cispo"], "cispo_eps_clip_high": ["--policy_loss_type", "cispo"],
         "overlong_penalty_factor": ["--overlong_buffer_len", "4"],
         "sequence_parallel": ["--tensor_model_parallel_size", "2"], "load_in_4bit": ["--lora_rank", "4"],
         "decoder_first_pipeline_num_layers": ["--pipeline_model_parallel_size", "2"],
         "decoder_last_pipeline_num_layers": ["--pipeline_model_parallel_size", "2"],
         "recompute_num_layers": ["--recompute_granularity", "full"],
         "recompute_modules": ["--recompute_granularity", "selective"],
         "dynamic_filtering": ["--n_samples_per_prompt", "2"], "engine_health_timeout_s": ["--max_engine_restarts", "1"],
         "max_staleness": ["--async_train"], "partial_rollout": ["--async_train", "--max_staleness", "1"],
         "partial_rollout_chunk": ["--async_train", "--max_staleness", "1", "--partial_rollout"],
         "use_dynamic_batch_size": ["--max_tokens_per_gpu", "64"], "max_tokens_per_gpu": ["--use_dynamic_batch_size"],
         "dynamic_filtering_reward_range": ["--dynamic_filtering", "--n_samples_per_prompt", "2"],
         **{flag: ["--agent_task", "guess_number"] for flag in ("max_turns", "agent_step_timeout", "agent_fail_fast",
                                                                                  "turn_rewards")}}


def _job(module: str):
    return getattr(importlib.import_module(module), JOBS[module])


ROLES = ("actor", "critic", "ref", "reward")


def _unprefixed(flag) -> str:
    return flag.flag.removeprefix(f"{flag.group}_") if flag.group in ROLES else flag.flag


def _needs(flag) -> list[str]:
    """The flags ``flag`` only makes sense with (a role's own, under its prefix)."""
    prefix = f"{flag.group}_" if flag.group in ROLES else ""
    return [f"--{prefix}{w[2:]}" if w.startswith("--") else w for w in NEEDS.get(_unprefixed(flag), [])]


def _other_value(flag) -> list[str]:
    """Command-line words giving ``flag`` a valid value other than its default."""
    name = _unprefixed(flag)
    if name in SPECIAL:
        return [SPECIAL[name]]
    tp, default = unwrap_optional(flag.type), flag.default
    if tp is bool:
        return []
    if get_origin(tp) is Literal:
        return [next(str(c) for c in get_args(tp) if c != default)]
    if get_origin(tp) is tuple:
        return ["0.25", "0.5"] if default is None else [str(v / 2) for v in default]
    if tp is int:
        return [str(2 if default is None else (default * 2 if default > 0 else default + 1))]
    if tp is float:
        return [str(2.0 if default is None else (default / 2 if default else 0.25))]
    return ["x"]


def _required_words(job_cls) -> list[str]:
    return [w for f in job_flags(job_cls) if f.default is dataclasses.MISSING for w in (f"--{f.flag}", REQUIRED[f.flag])]


def _option_values(job, flags) -> dict:
    def get(path):
        obj = job
        for part in path:
            obj = getattr(obj, part)
        return obj

    return {f.dest: get(f.path) for f in flags}


def _all_option_fields(cls, path=()) -> set[str]:
    hints, out = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if option_info(f) is not None:
            out.add(".".join(path + (f.name,)))
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out |= _all_option_fields(tp, path + (f.name,))
    return out


def _excluded(job_cls) -> set[str]:
    from engine.cli.options import GROUP, GroupInfo

    return {f"{f.name}.{path}" for f in dataclasses.fields(job_cls)
            for path in (f.metadata.get(GROUP) or GroupInfo()).exclude}


def test_every_cli_has_a_job():
    clis = {".".join(p.with_suffix("").parts) for folder in ("engine/cli", "tools/convert", "tools/plan")
            for p in Path(folder).glob("*.py") if "def main(" in p.read_text()} | {"tools.doctor"}
    assert clis == set(JOBS)


@pytest.mark.parametrize("module", sorted(JOBS))
def test_flags_and_fields_map_one_to_one(module):
    from engine.cli.options import dotted_flags

    job_cls = _job(module)
    flags = job_flags(job_cls)  # raises if two fields would share a flag
    parser = build_parser(job_cls)
    parsed = {s for action in parser._actions for s in action.option_strings if s not in ("-h", "--help")}
    fields, foreign = {s for f in flags for s in f.option_strings}, {f"--{e.flag}" for e in foreign_flags(job_cls)}
    dotted = {f"--{name}" for name in dotted_flags(job_cls)}  # OpenRLHF 0.10+'s spellings of the same flags
    assert parsed == fields | foreign | dotted and not fields & foreign
    # ... and back: every option field of the job's configs is a flag unless the job excludes it.
    assert _all_option_fields(job_cls) == {f.dest for f in flags} | _excluded(job_cls)


@pytest.mark.parametrize("module", sorted(JOBS))
def test_each_flag_sets_its_field_and_nothing_else(module):
    job_cls = _job(module)
    flags = job_flags(job_cls)
    parser = build_parser(job_cls)
    required = _required_words(job_cls)
    base = _option_values(build_job(job_cls, vars(parser.parse_args(required))), flags)
    for flag in flags:
        if flag.default is dataclasses.MISSING:
            continue
        needs = _needs(flag)
        words = required + needs + [f"--{flag.flag}", *_other_value(flag)]
        values = _option_values(build_job(job_cls, vars(parser.parse_args(words))), flags)
        changed = {dest for dest in values if values[dest] != base[dest]}
        expected_changes = {flag.dest} | {f.dest for f in flags if f"--{f.flag}" in needs}
        assert changed == expected_changes, (module, flag.flag, changed)
        for alias in flag.aliases:
            again = build_job(job_cls, vars(parser.parse_args(required + needs + [f"--{alias}", *_other_value(flag)])))
            assert _option_values(again, flags)[flag.dest] == values[flag.dest], alias
        for alias, value in flag.value_aliases:
            aliased = build_job(job_cls, vars(parser.parse_args(required + [f"--{alias}"])))
            assert _option_values(aliased, flags)[flag.dest] == value, alias


def _foreign_value(entry, *, refused: bool) -> list[str]:
    """Command-line words after an OpenRLHF entry: an accepted value, or (``refused``) one it refuses."""
    if entry.type is None:
        return []
    if entry.accepted and not refused:
        return [str(entry.accepted[0])]
    return {int: ["8"], float: ["0.5"], str: ["x"]}[entry.type] * (2 if entry.nargs else 1)


@pytest.mark.parametrize("module", sorted(JOBS))
def test_each_openrlhf_flag_is_acted_on_or_refused(module, capsys):
    job_cls = _job(module)
    flags = job_flags(job_cls)
    required = _required_words(job_cls)
    base = _option_values(parse_job(job_cls, required), flags)
    capsys.readouterr()
    by_flag = {f.flag: f for f in flags}
    for entry in foreign_flags(job_cls):
        typed = f"--{entry.flag}"
        if entry.fans_out_to:  # an alias of several flags: exactly their fields change
            values = _option_values(parse_job(job_cls, required + [typed, "2"]), flags)
            assert {d for d in values if values[d] != base[d]} == {by_flag[t].dest for t in entry.fans_out_to}
            continue
        if entry.refused:
            with pytest.raises(OptionError, match=rf"^{typed}\b.*not supported"):
                parse_job(job_cls, required + [typed, *_foreign_value(entry, refused=True)])
            if not entry.accepted:
                continue
        # A notice: the job is the one without the flag, and one line names it.
        assert _option_values(parse_job(job_cls, required + [typed, *_foreign_value(entry, refused=False)]),
                              flags) == base, entry.flag
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"note: {typed}")]
        assert len(lines) == 1 and entry.says in lines[0], (entry.flag, lines)


def test_errors_name_the_flag_the_user_typed():
    from engine.cli import train_ppo_ray, train_sft

    base = ["--pretrain", "m", "--prompt_data", "p.jsonl"]
    with pytest.raises(OptionError, match=r"--critic_sequence_parallel needs --critic_tensor_model_parallel_size > 1"):
        train_ppo_ray.parse_args([*base, "--critic_sequence_parallel"])
    with pytest.raises(OptionError, match=r"--prompt_data_probs has 2 values but --prompt_data names 1"):
        train_ppo_ray.parse_args([*base, "--prompt_data_probs", "0.5,0.5"])
    job = train_ppo_ray.parse_args([*base, "--reward_pretrain", "rm", "--reward_num_gpus_per_node", "3",
                                    "--reward_tensor_model_parallel_size", "2"])
    with pytest.raises(OptionError, match=r"world size 3 is not divisible by --reward_tensor_model_parallel_size \(2\)"):
        train_ppo_ray.role_configs(job, total_steps=1)
    with pytest.raises(OptionError, match=r"--sequence_parallel needs --tensor_model_parallel_size > 1"):
        train_sft.parse_args(["--pretrain", "m", "--dataset", "d.jsonl", "--sequence_parallel"])
    with pytest.raises(SystemExit):  # a flag the job does not read is refused, not ignored
        train_sft.parse_args(["--pretrain", "m", "--dataset", "d.jsonl", "--chosen_key", "c"])


def test_rl_clip_flags_reach_the_loss_settings():
    """--eps_clip_low_high and --dual_clip were parsed-nowhere settings before; they reach the loss now."""
    from engine.cli import train_ppo_ray
    from engine.rl.ppo_trainer import PPOTrainer

    job = train_ppo_ray.parse_args(["--pretrain", "m", "--prompt_data", "p.jsonl", "--eps_clip_low_high", "0.2", "0.28",
                                    "--dual_clip", "3", "--use_kl_estimator_k3"])
    trainer = PPOTrainer.__new__(PPOTrainer)  # only what train_settings reads
    trainer.config, trainer.sampling, trainer.ptx, trainer.reference = job.ppo, job.sampling, None, None
    trainer.kl_controller = type("K", (), {"value": 0.0})()
    trainer.tokenizer = type("T", (), {"pad_token_id": 0, "eos_token_id": 1})()
    settings = trainer.train_settings(step=3)
    assert (settings.eps_clip, settings.eps_clip_high, settings.dual_clip) == (0.2, 0.28, 3.0)
    assert settings.kl_estimator == "k3" and settings.seed == job.models.seed + 3
    default = train_ppo_ray.parse_args(["--pretrain", "m", "--prompt_data", "p.jsonl"])
    assert default.ppo.kl_estimator == "k1"  # one default, the config's
