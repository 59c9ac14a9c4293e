"""OpenRLHF 0.10+ command lines (dotted flags) run here: engine/cli/openrlhf_dotted.py (parse only).

- Every dotted flag of OpenRLHF 0.11's CLIs (openrlhf/cli/*.py at v0.11.0) is accepted by the job
  here, as a second spelling of the flat flag it renamed, or is one of ``NOT_HERE``: concepts that
  have no flag here, unrecognized as an unknown flat flag is, the message naming the dotted flag.
- Every dotted twin sets exactly what its flat flag sets; the last of the two given wins, as
  for every alias; entries of the OpenRLHF table given dotted print their notice (or refusal)
  naming the dotted spelling.
- OpenRLHF 0.11's examples/scripts (SFT, RM, DPO, PPO with Ray, REINFORCE++ baseline, the reward
  server), embedded verbatim with paths and sizes scaled down, parse to the same job as the 2025
  scripts of tests/test_openrlhf_compat.py (SFT, RM, DPO: the same settings, plus the packing 0.11
  turned on) or as the same settings spelled with 2025's flat names (written out by hand below),
  with one notice line per DeepSpeed-only flag. Their lines that have no concept here are
  dropped from the command and checked to be unrecognized (or refused) on their own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import shlex

import pytest

from engine.cli.openrlhf_dotted import BY_VALUE, RENAMED
from engine.cli.options import OptionError, build_job, build_parser, dotted_flags, foreign_flags, job_flags, parse_job
from tests.test_openrlhf_compat import JOBS, _job_cls, _split, command

# ----- OpenRLHF 0.11's dotted flags (openrlhf/cli/*.py at v0.11.0; its flat ones are 2025's) ---------------------
_RUN = """
    ckpt.output_dir ckpt.save_steps ckpt.save_hf ckpt.disable_ds logger.logging_steps eval.steps ckpt.path ckpt.max_num
    ckpt.max_mem ckpt.load_enable ds.use_universal_ckpt ds.deepcompile train.seed train.full_determinism_enable
    ds.zero_stage ds.param_dtype ds.zpg ds.adam_offload ds.attn_implementation ds.experts_implementation
    ds.grad_accum_dtype ds.overlap_comm data.disable_fast_tokenizer data.dataloader_num_workers ds.tensor_parallel_size
    train.max_epochs ds.ring_attn_size ds.ring_attn_head_stride ds.load_in_4bit ds.lora.rank ds.lora.alpha
    ds.lora.target_modules ds.lora.dropout ds.packing_samples data.max_samples data.max_len logger.wandb.key
    logger.wandb.org logger.wandb.group logger.wandb.project logger.wandb.run_name logger.tensorboard_dir
"""
_OFFLINE = _RUN + """
    train.micro_batch_size train.batch_size model.gradient_checkpointing_enable model.gradient_checkpointing_reentrant
    model.aux_loss_coef model.model_name_or_path muon.lr muon.momentum muon.ns_steps muon.nesterov muon.no_nesterov
    adam.lr adam.betas adam.eps adam.weight_decay data.dataset data.dataset_probs eval.dataset data.dataset_split
    eval.split data.input_template data.apply_chat_template data.tokenizer_chat_template
"""
_PAIRS = "data.prompt_key data.chosen_key data.rejected_key"
_OPTIMIZER = ("optim muon.lr muon.momentum muon.ns_steps muon.nesterov muon.no_nesterov adam.lr adam.betas adam.eps "
              "adam.weight_decay lr_scheduler lr_warmup_ratio min_lr_ratio max_norm").split()
DOTTED_FLAGS = {
    "train_sft": _OFFLINE + """
        ds.use_liger_kernel model.pretrain_mode_enable data.multiturn data.input_key data.output_key
    """,
    "train_rm": _OFFLINE + _PAIRS + """
        ds.value_head_prefix model.compute_fp32_loss_enable model.margin_loss_enable model.loss_type
    """,
    "train_dpo": _OFFLINE + _PAIRS + """
        ref.offload ds.use_liger_kernel model.beta model.ipo_enable model.label_smoothing model.nll_loss_coef
        ref.model_name_or_path
    """,
    "train_ppo_ray": _RUN + " ".join(f"{role}.{name}" for role in ("actor", "critic") for name in _OPTIMIZER) + """
        ref.num_nodes ref.num_gpus_per_node reward.num_nodes reward.num_gpus_per_node train.colocate_actor_ref
        actor.num_nodes actor.num_gpus_per_node critic.num_nodes critic.num_gpus_per_node train.colocate_critic_reward
        train.colocate_all vllm.num_engines vllm.tensor_parallel_size vllm.sync_backend vllm.sync_with_ray
        vllm.enable_prefix_caching vllm.enforce_eager vllm.enable_sleep vllm.gpu_memory_utilization
        algo.advantage.is_correction_enable algo.advantage.is_correction_threshold algo.advantage.is_correction_type
        train.async_enable train.async_queue_size train.partial_rollout_enable ckpt.best_metric_key
        actor.gradient_checkpointing_enable train.enable_ema train.ema_beta ds.use_liger_kernel
        actor.gradient_checkpointing_reentrant ds.enable_sleep train.dynamic_batch_enable rollout.max_tokens_per_gpu
        train.max_tokens_per_gpu train.num_episodes rollout.batch_size rollout.vllm_generate_batch_size
        rollout.micro_batch_size rollout.max_new_tokens actor.eps_clip actor.eps_clip_low_high actor.dual_clip
        critic.value_clip algo.advantage.lambd algo.advantage.gamma train.micro_batch_size train.batch_size
        reward.normalize_enable rollout.top_p rollout.temperature critic.freezing_steps rollout.n_samples_per_prompt
        critic.save_value_network algo.kl.target algo.kl.horizon algo.kl.init_coef actor.policy_loss_type
        algo.kl.estimator actor.aux_loss_coef actor.entropy_coef reward.clip_range algo.advantage.estimator
        algo.kl.use_loss algo.advantage.no_std_norm reward.overlong_buffer_len reward.overlong_penalty_factor
        reward.stop_properly_penalty_coef actor.model_name_or_path reward.model_name_or_path reward.remote_url
        critic.model_name_or_path ds.value_head_prefix ref.offload reward.offload train.agent_func_path
        data.prompt_dataset data.prompt_probs data.prompt_split eval.dataset eval.split eval.temperature
        eval.n_samples_per_prompt data.input_key data.label_key data.input_template data.apply_chat_template
        algo.dynamic_filtering_enable algo.dynamic_filtering_range data.image_key data.max_images_per_prompt
        actor.freeze_visual_encoder
    """,
    "serve_rm": """
        reward.model_name_or_path reward.normalize_enable ds.value_head_prefix data.max_len ds.load_in_4bit
        ds.param_dtype ds.attn_implementation ds.experts_implementation data.disable_fast_tokenizer ds.packing_samples
    """,
}
# Dotted flags whose concept has no flag in that job here: unrecognized, as unknown flat flags are.
_NEW = """
    ds.deepcompile ds.experts_implementation data.dataloader_num_workers ds.tensor_parallel_size
    muon.lr muon.momentum muon.ns_steps muon.nesterov muon.no_nesterov adam.eps eval.dataset
"""
NOT_HERE = {
    "train_sft": _NEW,
    "train_rm": _NEW + " ckpt.disable_ds",  # OpenRLHF's RM had no --disable_ds_ckpt in 2025
    "train_dpo": _NEW,
    "train_ppo_ray": """
        train.async_queue_size ckpt.best_metric_key
        ds.deepcompile ds.experts_implementation data.dataloader_num_workers ds.tensor_parallel_size
        rollout.max_tokens_per_gpu rollout.vllm_generate_batch_size
        reward.stop_properly_penalty_coef ref.offload reward.offload eval.split
        data.image_key data.max_images_per_prompt actor.freeze_visual_encoder
        actor.optim actor.muon.lr actor.muon.momentum actor.muon.ns_steps actor.muon.nesterov actor.muon.no_nesterov
        actor.adam.eps critic.optim critic.muon.lr critic.muon.momentum critic.muon.ns_steps critic.muon.nesterov
        critic.muon.no_nesterov critic.adam.betas critic.adam.eps critic.adam.weight_decay critic.lr_scheduler
        critic.lr_warmup_ratio critic.min_lr_ratio critic.max_norm
    """,
    "serve_rm": "ds.experts_implementation ds.packing_samples",
}
REQUIRED = {"train_sft": ["--pretrain", "m", "--dataset", "d.jsonl"], "train_rm": ["--pretrain", "m", "--dataset", "d"],
            "train_dpo": ["--pretrain", "m", "--dataset", "d"], "train_ppo_ray": ["--pretrain", "m", "--prompt_data", "p"],
            "serve_rm": ["--reward_pretrain", "rm"]}


def _parse(cli: str, words: list[str]):
    """The CLI's own parse (its plain-field settings) and its notice lines' flags (stderr)."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        job = importlib.import_module(f"engine.cli.{cli}").parse_args(words)
    notes = [line for line in err.getvalue().splitlines() if line.startswith("note: --")]
    return job, sorted(line.split()[1].rstrip(":") for line in notes)


def _unrecognized(cli: str, words: list[str]) -> str:
    """argparse's error for ``words`` after the job's required flags."""
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        importlib.import_module(f"engine.cli.{cli}").parse_args(REQUIRED[cli] + words)
    return err.getvalue()


# ----- the table ----------------------------------------------------------------------------------------------

def test_every_twin_stands_for_a_flag_here():
    """No entry of the table names a flat flag that no CLI has (a typo would silently add nothing)."""
    names = set()
    for cli in JOBS:
        job_cls = _job_cls(cli)
        names |= {s[2:] for f in job_flags(job_cls) for s in f.option_strings} | {e.flag for e in foreign_flags(job_cls)}
    assert {flat for flat in RENAMED.values()} | {flat for flat, _ in BY_VALUE.values()} <= names
    assert not set(RENAMED) & set(BY_VALUE)


@pytest.mark.parametrize("cli", sorted(DOTTED_FLAGS))
def test_every_openrlhf_011_flag_is_a_twin_or_not_here(cli):
    accepted, missing = set(dotted_flags(_job_cls(cli))), set(NOT_HERE[cli].split())
    flags = DOTTED_FLAGS[cli].split()
    assert {flag for flag in flags if flag not in accepted} == missing
    for flag in sorted(missing):  # what an unknown flat flag gets: argparse's error, naming it
        assert f"unrecognized arguments: --{flag}" in _unrecognized(cli, [f"--{flag}", "1"]), flag


@pytest.mark.parametrize("cli", sorted(JOBS))
def test_each_twin_sets_what_its_flat_flag_sets(cli):
    """Every dotted twin of an option: the same job as the flat flag with the same value (and the
    last of the two given wins, as for the options' own aliases)."""
    from tests.test_options import _needs, _other_value

    job_cls = _job_cls(cli)
    parser, required = build_parser(job_cls), _required(job_cls)
    by_name = {name: flag for flag in job_flags(job_cls) for name in (flag.flag, *flag.aliases)}
    checked = 0
    for dotted, flat in dotted_flags(job_cls).items():
        if flat not in by_name or dotted in BY_VALUE:
            continue
        flag = by_name[flat]
        value, needs = _other_value(flag), _needs(flag)
        ours = build_job(job_cls, vars(parser.parse_args(required + needs + [f"--{flat}", *value])))
        assert build_job(job_cls, vars(parser.parse_args(required + needs + [f"--{dotted}", *value]))) == ours, dotted
        if value and flag.default not in (None, (), dataclasses.MISSING):  # given twice: the last wins
            again = [f"--{dotted}", *value, f"--{flat}", *_default_words(flag)]
            assert build_job(job_cls, vars(parser.parse_args(required + needs + again))) == \
                build_job(job_cls, vars(parser.parse_args(required + needs))), dotted
        checked += 1
    assert checked >= {"train_ppo_ray": 100, "serve_rm": 4, "batch_inference": 20}.get(cli, 40)


def _required(job_cls) -> list[str]:
    from tests.test_options import _required_words

    return _required_words(job_cls)


def _default_words(flag) -> list[str]:
    default = flag.default
    return [str(v) for v in default] if isinstance(default, tuple) else [str(default)]


def test_entries_given_dotted_name_the_dotted_flag(capsys):
    from engine.cli import serve_rm, train_ppo_ray, train_sft

    base = REQUIRED["train_sft"]
    assert _parse("train_sft", base + ["--ds.zero_stage", "3", "--ds.overlap_comm"])[1] == ["--ds.overlap_comm",
                                                                                           "--ds.zero_stage"]
    with pytest.raises(OptionError, match=r"^--train\.full_determinism_enable: not supported: deterministic"):
        train_sft.parse_args(base + ["--train.full_determinism_enable"])
    assert train_ppo_ray.parse_args(REQUIRED["train_ppo_ray"] + ["--ckpt.save_hf"]).models.save_hf_ckpt
    # --ds.ring_attn_size is 2025's --ring_attn_size: every RL role's context-parallel size.
    job = train_ppo_ray.parse_args(REQUIRED["train_ppo_ray"] + ["--ds.ring_attn_size", "2"])
    assert {getattr(job, role).parallel.context_parallel_size for role in ("actor", "critic", "ref", "reward")} == {2}
    # A valued 0.10+ flag for a 2025 switch: bf16 is --bf16, fp16 is 2025's no --bf16 (the default here).
    bf16, fp16 = (train_sft.parse_args(base + ["--ds.param_dtype", d]) for d in ("bf16", "fp16"))
    assert bf16 == train_sft.parse_args(base + ["--bf16"]) and fp16 == train_sft.parse_args(base)
    assert _parse("serve_rm", ["--reward.model_name_or_path", "rm", "--ds.param_dtype", "bf16", "--ds.attn_implementation",
                               "eager"])[1] == ["--ds.param_dtype"]  # eager: 2025 without --flash_attn, no notice
    capsys.readouterr()
    with pytest.raises(SystemExit):
        serve_rm.parse_args(["--reward_pretrain", "rm", "--ds.param_dtype", "fp32"])
    assert "argument --ds.param_dtype: invalid choice: 'fp32'" in capsys.readouterr().err
    # The trained model's settings: per role in train_ppo_ray, per model elsewhere, as in 0.10+.
    assert "unrecognized arguments: --actor.adam.lr" in _unrecognized("train_sft", ["--actor.adam.lr", "1e-6"])
    assert "unrecognized arguments: --adam.lr" in _unrecognized("train_ppo_ray", ["--adam.lr", "1e-6"])
    # OpenRLHF's CLIs only: its LoRA combiner takes --ds.param_dtype; this project's own tools take no dotted name.
    from tools.convert.hf_to_mcore import ToMcoreJob
    from tools.convert.lora_combiner import CombinerJob

    combiner = ["--model_path", "m", "--lora_path", "a", "--output_path", "o"]
    assert parse_job(CombinerJob, combiner + ["--ds.param_dtype", "bf16"]) == parse_job(CombinerJob, combiner + ["--bf16"])
    assert dotted_flags(ToMcoreJob) == {}
    # --help names the flat flags only, and says in one line that the dotted ones are accepted.
    help_text = build_parser(_job_cls("train_ppo_ray")).format_help()
    assert "--vllm.num_engines" not in help_text and "--vllm_num_engines" in help_text
    assert "dotted names of these flags are accepted" in help_text


# ----- OpenRLHF 0.11's examples/scripts: the argument lists, verbatim ---------------------------------------------
SCRIPTS = {
    # train_sft.sh
    "train_sft": r"""
   --data.max_len 2048 \
   --data.dataset Open-Orca/OpenOrca \
   --data.input_key question \
   --data.output_key response \
   --train.batch_size 256 \
   --train.micro_batch_size 2 \
   --data.max_samples 500000 \
   --model.model_name_or_path meta-llama/Meta-Llama-3-8B \
   --ckpt.output_dir ./checkpoint/llama3-8b-sft \
   --ckpt.save_steps -1 \
   --logger.logging_steps 1 \
   --eval.steps -1 \
   --ds.zero_stage 2 \
   --train.max_epochs 1 \
   --ds.param_dtype bf16 \
   --ds.attn_implementation flash_attention_2 \
   --adam.lr 5e-6 \
   --ckpt.load_enable \
   --ds.packing_samples \
   --model.gradient_checkpointing_enable
""",
    # train_rm.sh
    "train_rm": r"""
   --ckpt.output_dir ./checkpoint/llama3-8b-rm \
   --ckpt.save_steps -1 \
   --logger.logging_steps 1 \
   --eval.steps -1 \
   --train.batch_size 256 \
   --train.micro_batch_size 1 \
   --model.model_name_or_path OpenRLHF/Llama-3-8b-sft-mixture \
   --ds.param_dtype bf16 \
   --train.max_epochs 1 \
   --data.max_len 8192 \
   --ds.zero_stage 3 \
   --adam.lr 9e-6 \
   --data.dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku \
   --data.apply_chat_template \
   --data.chosen_key chosen \
   --data.rejected_key rejected \
   --ds.attn_implementation flash_attention_2 \
   --ckpt.load_enable \
   --ds.packing_samples \
   --model.gradient_checkpointing_enable
""",
    # train_dpo_llama.sh
    "train_dpo": r"""
   --ckpt.output_dir ./checkpoint/llama3-8b-dpo \
   --ckpt.save_steps -1 \
   --logger.logging_steps 1 \
   --eval.steps -1 \
   --train.batch_size 256 \
   --train.micro_batch_size 1 \
   --model.model_name_or_path OpenRLHF/Llama-3-8b-sft-mixture \
   --ds.param_dtype bf16 \
   --train.max_epochs 1 \
   --data.max_len 8192 \
   --ds.zero_stage 3 \
   --adam.lr 5e-7 \
   --model.beta 0.1 \
   --data.dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku \
   --data.apply_chat_template \
   --data.chosen_key chosen \
   --data.rejected_key rejected \
   --ds.attn_implementation flash_attention_2 \
   --ckpt.load_enable \
   --ds.packing_samples \
   --model.gradient_checkpointing_enable
""",
    # train_ppo_ray_hybrid_engine.sh (after `python3 -m openrlhf.cli.train_ppo_ray`)
    "ppo": r"""
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node 8 \
   --reward.num_nodes 1 \
   --reward.num_gpus_per_node 8 \
   --critic.num_nodes 1 \
   --critic.num_gpus_per_node 8 \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node 8 \
   --vllm.num_engines 4 \
   --vllm.tensor_parallel_size 2 \
   --train.colocate_all \
   --vllm.gpu_memory_utilization 0.5 \
   --actor.model_name_or_path OpenRLHF/Llama-3-8b-sft-mixture \
   --reward.model_name_or_path OpenRLHF/Llama-3-8b-rm-700k \
   --ckpt.output_dir /openrlhf/examples/test_scripts/final/llama3-8b-rlhf \
   --ckpt.path /openrlhf/examples/test_scripts/ckpt/llama3-8b-rlhf \
   --ckpt.save_hf \
   --train.batch_size 128 \
   --rollout.batch_size 1024 \
   --rollout.n_samples_per_prompt 1 \
   --train.max_epochs 1 \
   --data.max_len 2048 \
   --data.max_samples 100000 \
   --ds.zero_stage 3 \
   --ds.param_dtype bf16 \
   --actor.adam.lr 5e-7 \
   --critic.adam.lr 9e-6 \
   --algo.kl.init_coef 0.01 \
   --data.prompt_dataset OpenRLHF/prompt-collection-v0.1 \
   --data.input_key context_messages \
   --data.apply_chat_template \
   --reward.normalize_enable \
   --actor.gradient_checkpointing_enable \
   --ds.packing_samples \
   --vllm.sync_backend nccl \
   --vllm.enforce_eager \
   --vllm.enable_sleep \
   --ds.enable_sleep \
   --train.dynamic_batch_enable \
   --train.max_tokens_per_gpu 16384 \
   --algo.advantage.is_correction_enable
""",
    # train_reinforce_baseline_hybrid_engine.sh: its CKPT_ARGS, ROLLOUT_ARGS, ENGINE_ARGS, OPTIMIZER_ARGS and
    # LOG_ARGS arrays in that order, commented-out lines left out, ${...} as they are
    "reinforce": r"""
   --actor.model_name_or_path ${MODEL_PATH}
   --ckpt.load_enable
   --ckpt.output_dir ${SAVE_PATH}
   --ckpt.path "${SAVE_PATH}/ckpt"
   --ckpt.save_hf
   --ckpt.max_num 3
   --ckpt.save_steps 10
   --train.agent_func_path ${AGENT_FUNC_PATH}
   --data.prompt_dataset ${DATASET_PATH}
   --data.input_key prompt
   --data.label_key label
   --data.max_len 74240
   --rollout.max_new_tokens 64000
   --data.apply_chat_template
   --ds.packing_samples
   --rollout.batch_size 128
   --rollout.n_samples_per_prompt 8
   --train.batch_size 1024
   --algo.dynamic_filtering_enable
   --algo.dynamic_filtering_range 0.0 1.0
   --train.dynamic_batch_enable
   --train.max_tokens_per_gpu 16192
   --rollout.max_tokens_per_gpu 32768
   --train.micro_batch_size 1
   --rollout.micro_batch_size 8
   --data.max_samples 128000
   --train.max_epochs 1
   --train.num_episodes 1
   --ref.num_nodes 1
   --ref.num_gpus_per_node 4
   --actor.num_nodes 1
   --actor.num_gpus_per_node 4
   --vllm.num_engines 2
   --vllm.tensor_parallel_size 2
   --vllm.gpu_memory_utilization 0.7
   --train.colocate_all
   --ds.enable_sleep
   --vllm.sync_backend nccl
   --vllm.enforce_eager
   --ds.zero_stage 3
   --actor.gradient_checkpointing_enable
   --ds.ring_attn_size 2
   --ds.ring_attn_head_stride 2
   --ds.param_dtype bf16
   --algo.advantage.estimator reinforce_baseline
   --actor.adam.lr 5e-7
   --actor.entropy_coef 0.0
   --algo.kl.init_coef 1e-5
   --algo.kl.use_loss
   --algo.kl.estimator k2
   --algo.advantage.is_correction_enable
   --algo.advantage.is_correction_type icepop
   --logger.tensorboard_dir ${SAVE_PATH}/runs
   --logger.logging_steps 1
   --eval.steps -1
""",
    # serve_remote_rm.sh
    "serve_rm": r"""
    --reward.model_name_or_path OpenRLHF/Llama-3-8b-rm-700k \
    --port 5000 \
    --ds.param_dtype bf16 \
    --ds.attn_implementation flash_attention_2 \
    --reward.normalize_enable \
    --data.max_len 8192 \
    --batch_size 16
""",
}
CLI = {"ppo": "train_ppo_ray", "reinforce": "train_ppo_ray"}

# Paths and sizes scaled down (one node, one GPU per role, one engine); None: the line dropped, because
# its concept has no flag here (unrecognized: NOT_HERE) or is refused here.
_ROLES_SCALED = {"vllm.num_engines": "1", "vllm.tensor_parallel_size": "1",
                 "train.dynamic_batch_enable": None, "train.max_tokens_per_gpu": None}
SCALED = {
    "train_sft": {"model.model_name_or_path": "model", "data.dataset": "orca.jsonl", "ckpt.output_dir": "out",
                  "train.batch_size": "4", "data.max_samples": "4", "data.max_len": "64"},
    "train_rm": {"model.model_name_or_path": "model", "data.dataset": "prefs.jsonl", "ckpt.output_dir": "out",
                 "train.batch_size": "4", "data.max_len": "64"},
    "train_dpo": {"model.model_name_or_path": "model", "data.dataset": "prefs.jsonl", "ckpt.output_dir": "out",
                  "train.batch_size": "4", "data.max_len": "64"},
    "ppo": {**_ROLES_SCALED, **{f"{role}.num_gpus_per_node": "1" for role in ("ref", "reward", "critic", "actor")},
            "actor.model_name_or_path": "sft", "reward.model_name_or_path": "rm", "ckpt.output_dir": "out",
            "ckpt.path": "ckpt", "train.batch_size": "2", "rollout.batch_size": "2", "data.max_len": "64",
            "data.max_samples": "2", "data.prompt_dataset": "prompts.jsonl"},
    "reinforce": {**_ROLES_SCALED, "ref.num_gpus_per_node": "1", "actor.num_gpus_per_node": "2",
                  "actor.model_name_or_path": "model", "ckpt.output_dir": "out", "ckpt.path": "out/ckpt",
                  "train.agent_func_path": None, "data.prompt_dataset": "math.jsonl", "data.max_len": "96",
                  "rollout.max_new_tokens": "32", "rollout.batch_size": "2", "rollout.n_samples_per_prompt": "2",
                  "train.batch_size": "4", "algo.dynamic_filtering_range": None, "rollout.max_tokens_per_gpu": None,
                  "rollout.micro_batch_size": "2", "data.max_samples": "4", "actor.entropy_coef": None,
                  "algo.advantage.is_correction_type": None, "logger.tensorboard_dir": "out/runs"},
    "serve_rm": {"reward.model_name_or_path": "rm"},
}
# The same scaled settings in 2025's flat names, written out by hand (the oracle of the RL scripts).
FLAT_2025 = {
    "ppo": """
        --ref_num_nodes 1 --ref_num_gpus_per_node 1 --reward_num_nodes 1 --reward_num_gpus_per_node 1
        --critic_num_nodes 1 --critic_num_gpus_per_node 1 --actor_num_nodes 1 --actor_num_gpus_per_node 1
        --vllm_num_engines 1 --vllm_tensor_parallel_size 1 --colocate_all_models --vllm_gpu_memory_utilization 0.5
        --pretrain sft
        --reward_pretrain rm --save_path out --ckpt_path ckpt --train_batch_size 2 --rollout_batch_size 2
        --n_samples_per_prompt 1 --max_epochs 1 --max_len 64 --max_samples 2 --zero_stage 3 --bf16
        --actor_learning_rate 5e-7 --critic_learning_rate 9e-6 --init_kl_coef 0.01 --prompt_data prompts.jsonl
        --input_key context_messages --apply_chat_template --normalize_reward --gradient_checkpointing
        --packing_samples --vllm_sync_backend nccl --enforce_eager --vllm_enable_sleep --deepspeed_enable_sleep
        --vllm_is_correction --save_hf_ckpt
    """,
    "reinforce": """
        --pretrain model --load_checkpoint --save_path out --ckpt_path out/ckpt --max_ckpt_num 3 --save_steps 10
        --prompt_data math.jsonl --input_key prompt --label_key label --max_len 96 --generate_max_len 32
        --apply_chat_template --packing_samples --rollout_batch_size 2 --n_samples_per_prompt 2 --train_batch_size 4
        --dynamic_filtering --micro_train_batch_size 1 --micro_rollout_batch_size 2 --max_samples 4 --max_epochs 1
        --num_episodes 1 --ref_num_nodes 1 --ref_num_gpus_per_node 1 --actor_num_nodes 1 --actor_num_gpus_per_node 2
        --vllm_num_engines 1 --vllm_tensor_parallel_size 1 --vllm_gpu_memory_utilization 0.7 --colocate_all_models
        --deepspeed_enable_sleep --vllm_sync_backend nccl --enforce_eager --zero_stage 3 --gradient_checkpointing
        --ring_attn_size 2 --ring_head_stride 2 --bf16 --advantage_estimator reinforce_baseline --actor_learning_rate 5e-7
        --init_kl_coef 1e-5 --use_kl_loss --kl_estimator k2 --vllm_is_correction --use_tensorboard out/runs
        --logging_steps 1 --eval_steps -1 --save_hf_ckpt
    """,
}
NOTICES = {"train_sft": ["--ds.attn_implementation", "--ds.zero_stage"],
           "train_rm": ["--ds.attn_implementation", "--ds.zero_stage"],
           "train_dpo": ["--ds.attn_implementation", "--ds.zero_stage"],
           "ppo": ["--ds.zero_stage"], "reinforce": ["--ds.zero_stage"],
           "serve_rm": ["--ds.attn_implementation", "--ds.param_dtype"]}


def command_011(name: str) -> list[str]:
    """The 0.11 example's words with ``SCALED`` values (None: the line dropped); every scaled flag must
    be one the example has."""
    pairs = _split(shlex.split(SCRIPTS[name].replace("\\\n", " ")))
    scaled = SCALED[name]
    assert not set(scaled) - {flag for flag, _ in pairs}, f"{name}: the example has no {set(scaled) - dict(pairs).keys()}"
    return [w for flag, values in pairs if scaled.get(flag, "") is not None
            for w in (f"--{flag}", *([scaled[flag]] if flag in scaled else values))]


@pytest.mark.parametrize("name", ["train_sft", "train_rm", "train_dpo"])
def test_offline_011_examples_are_the_2025_examples(name):
    """0.11's SFT / RM / DPO scripts are the 2025 ones renamed, plus --ds.packing_samples."""
    job, notes = _parse(name, command_011(name))
    assert notes == NOTICES[name]
    scaled_2025 = {RENAMED.get(flag, flag): value for flag, value in SCALED[name].items()}
    assert job == _parse(name, command(name, scaled_2025, extra=("--packing_samples",)))[0]


@pytest.mark.parametrize("name", ["ppo", "reinforce", "serve_rm"])
def test_rl_and_server_011_examples_are_their_2025_spelling(name):
    cli = CLI.get(name, name)
    job, notes = _parse(cli, command_011(name))
    assert notes == NOTICES[name]
    if name == "serve_rm":  # the example's 2025 spelling: tests/test_openrlhf_compat.py's serve_remote_rm.sh
        flat = command("serve_rm", {"reward_pretrain": "rm"})
    else:
        flat = FLAT_2025[name].split()
    assert job == _parse(cli, flat)[0]
    if name == "reinforce":  # the actor's grid: ring attention over its 2 ranks, as 0.11's --ds.ring_attn_size 2
        assert (job.actor.parallel.context_parallel_size, job.ppo.advantage.estimator) == (2, "reinforce_baseline")
    # The lines left out: unrecognized (no concept here) or refused, each on its own.
    pairs = dict(_split(shlex.split(SCRIPTS[name].replace("\\\n", " "))))
    dropped = [flag for flag, value in SCALED[name].items() if value is None and flag in NOT_HERE[cli].split()]
    for flag in dropped:
        words = [f"--{flag}", *pairs[flag]]
        assert f"unrecognized arguments: {' '.join(words)}" in _unrecognized(cli, words), flag
