"""OpenRLHF command lines run here (engine/cli/openrlhf_compat.py and the aliases of the configs).

- Every flag of OpenRLHF's CLIs at commit c1970206 (2025-03-31) is an option or alias here, or an
  entry of the OpenRLHF table (a notice, a fan-out or a refusal): none is "unrecognized".
- The command lines of OpenRLHF's examples/scripts (SFT, RM, DPO and PPO-Ray, and the KTO, PRM,
  KD, reward-server and rejection-sampling ones for parsing), embedded verbatim, with model /
  data / save paths replaced by tiny local ones and sizes scaled to one optimizer step on CPU
  (``SCALED``), parse to exactly the job our own flag names give for the same settings, print one
  notice per DeepSpeed-only flag, and -- SFT, RM, DPO, PPO -- run a step that logs a finite loss
  and writes the HF checkpoint to ``--save_path``. The PPO run starts from the SFT run's model
  and scores with the RM run's model, as OpenRLHF's pipeline does.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import shlex
from pathlib import Path

import pytest

from engine.cli.options import foreign_flags, job_flags

# ----- OpenRLHF's flags (openrlhf/cli/*.py at c1970206) ------------------------------------------------------
OPENRLHF_FLAGS = {
    "train_sft": """
        save_path save_steps save_hf_ckpt disable_ds_ckpt logging_steps eval_steps ckpt_path max_ckpt_num
        max_ckpt_mem load_checkpoint use_ds_universal_ckpt micro_train_batch_size train_batch_size max_norm
        gradient_checkpointing torch_compile seed full_determinism local_rank zero_stage bf16 zpg
        adam_offload flash_attn use_liger_kernel grad_accum_dtype overlap_comm
        gradient_checkpointing_use_reentrant disable_fast_tokenizer max_epochs aux_loss_coef pretrain
        learning_rate lr_warmup_ratio pretrain_mode lr_scheduler l2 adam_betas ring_attn_size
        ring_head_stride load_in_4bit lora_rank lora_alpha target_modules lora_dropout packing_samples
        dataset dataset_probs train_split eval_split multiturn input_key output_key input_template
        apply_chat_template tokenizer_chat_template max_samples max_len use_wandb wandb_org wandb_group
        wandb_project wandb_run_name use_tensorboard use_ms
    """,
    "train_rm": """
        save_path save_steps logging_steps eval_steps ckpt_path max_ckpt_num max_ckpt_mem load_checkpoint
        use_ds_universal_ckpt max_norm gradient_checkpointing torch_compile seed full_determinism local_rank
        zero_stage bf16 zpg adam_offload flash_attn grad_accum_dtype overlap_comm
        gradient_checkpointing_use_reentrant disable_fast_tokenizer pretrain value_head_prefix
        ring_attn_size ring_head_stride load_in_4bit lora_rank lora_alpha lora_dropout target_modules
        max_epochs aux_loss_coef compute_fp32_loss margin_loss learning_rate lr_warmup_ratio
        micro_train_batch_size train_batch_size loss l2 adam_betas packing_samples dataset dataset_probs
        prompt_key chosen_key rejected_key input_template apply_chat_template tokenizer_chat_template
        train_split eval_split max_samples max_len use_wandb wandb_org wandb_group wandb_project
        wandb_run_name use_tensorboard use_ms
    """,
    "train_dpo": """
        save_path save_steps save_hf_ckpt disable_ds_ckpt logging_steps eval_steps ckpt_path max_ckpt_num
        max_ckpt_mem use_ds_universal_ckpt micro_train_batch_size train_batch_size load_checkpoint max_norm
        gradient_checkpointing torch_compile seed full_determinism disable_fast_tokenizer local_rank
        zero_stage bf16 ref_offload learning_rate lr_warmup_ratio zpg adam_offload flash_attn
        use_liger_kernel grad_accum_dtype overlap_comm gradient_checkpointing_use_reentrant max_epochs l2
        beta ipo label_smoothing aux_loss_coef nll_loss_coef adam_betas ring_attn_size ring_head_stride
        load_in_4bit lora_rank lora_alpha target_modules lora_dropout packing_samples pretrain ref_pretrain
        dataset dataset_probs train_split eval_split prompt_key chosen_key rejected_key input_template
        apply_chat_template max_samples max_len use_wandb wandb_org wandb_group wandb_project wandb_run_name
        use_tensorboard use_ms
    """,
    "train_kto": """
        save_path save_steps logging_steps eval_steps ckpt_path max_ckpt_num max_ckpt_mem load_checkpoint
        use_ds_universal_ckpt max_norm micro_train_batch_size train_batch_size gradient_checkpointing
        torch_compile seed full_determinism disable_fast_tokenizer local_rank zero_stage bf16 ref_offload
        zpg adam_offload flash_attn use_liger_kernel grad_accum_dtype overlap_comm
        gradient_checkpointing_use_reentrant load_in_4bit lora_rank lora_alpha target_modules lora_dropout
        max_epochs beta pretrain learning_rate lr_warmup_ratio l2 aux_loss_coef adam_betas
        desirable_loss_weight undesirable_loss_weight dataset dataset_probs train_split eval_split input_key
        output_key label_key input_template apply_chat_template max_len max_samples use_wandb wandb_org
        wandb_group wandb_project wandb_run_name use_tensorboard use_ms
    """,
    "train_prm": """
        save_path save_steps logging_steps eval_steps ckpt_path max_ckpt_num max_ckpt_mem load_checkpoint
        use_ds_universal_ckpt max_norm gradient_checkpointing torch_compile seed full_determinism local_rank
        zero_stage bf16 zpg adam_offload flash_attn use_liger_kernel grad_accum_dtype overlap_comm
        gradient_checkpointing_use_reentrant disable_fast_tokenizer load_in_4bit lora_rank lora_alpha
        lora_dropout target_modules pretrain max_epochs aux_loss_coef learning_rate lr_warmup_ratio
        micro_train_batch_size train_batch_size lr_scheduler l2 adam_betas placeholder_token reward_tokens
        packing_samples dataset dataset_probs train_split eval_split input_key label_key max_samples max_len
        use_wandb wandb_org wandb_group wandb_project wandb_run_name use_ms
    """,
    "train_kd": """
        save_path save_steps logging_steps eval_steps ckpt_path max_ckpt_num max_ckpt_mem load_checkpoint
        use_ds_universal_ckpt micro_train_batch_size train_batch_size max_norm gradient_checkpointing
        torch_compile seed full_determinism local_rank zero_stage bf16 zpg adam_offload flash_attn
        use_liger_kernel aux_loss_coef grad_accum_dtype overlap_comm gradient_checkpointing_use_reentrant
        disable_fast_tokenizer load_in_4bit lora_rank lora_alpha target_modules lora_dropout pretrain
        teacher_model max_epochs kd_coef learning_rate lr_warmup_ratio pretrain_mode lr_scheduler l2
        adam_betas teacher_offload dataset dataset_probs train_split eval_split input_key output_key
        input_template apply_chat_template max_samples max_len use_wandb wandb_org wandb_group wandb_project
        wandb_run_name use_tensorboard use_ms
    """,
    "train_ppo_ray": """
        ref_num_nodes ref_num_gpus_per_node reward_num_nodes reward_num_gpus_per_node colocate_actor_ref
        actor_num_nodes actor_num_gpus_per_node critic_num_nodes critic_num_gpus_per_node
        colocate_critic_reward colocate_all_models vllm_num_engines vllm_tensor_parallel_size
        vllm_sync_backend vllm_sync_with_ray enable_prefix_caching enforce_eager vllm_enable_sleep
        vllm_gpu_memory_utilization eval_steps save_steps logging_steps ckpt_path save_hf_ckpt
        disable_ds_ckpt max_ckpt_num max_ckpt_mem load_checkpoint use_ds_universal_ckpt local_rank
        zero_stage gradient_checkpointing torch_compile bf16 enable_ema zpg adam_offload actor_init_on_gpu
        flash_attn use_liger_kernel grad_accum_dtype overlap_comm gradient_checkpointing_use_reentrant
        disable_fast_tokenizer deepspeed_enable_sleep packing_samples load_in_4bit lora_rank lora_alpha
        target_modules lora_dropout save_path num_episodes rollout_batch_size micro_rollout_batch_size
        max_epochs prompt_max_len generate_max_len max_len max_samples max_norm l2 ptx_coef eps_clip
        value_clip lambd gamma micro_train_batch_size train_batch_size normalize_reward top_p temperature
        seed full_determinism freezing_actor_steps n_samples_per_prompt save_value_network
        actor_learning_rate critic_learning_rate lr_warmup_ratio kl_target init_kl_coef kl_estimator
        aux_loss_coef adam_betas reward_clip_range advantage_estimator use_kl_loss no_advantage_std_norm
        ring_attn_size ring_head_stride pretrain reward_pretrain remote_rm_url critic_pretrain
        value_head_prefix ref_reward_offload prompt_data prompt_data_probs prompt_split pretrain_data
        pretrain_data_probs pretrain_split input_key label_key input_template apply_chat_template use_wandb
        wandb_org wandb_group wandb_project wandb_run_name use_tensorboard perf use_ms
    """,
    "serve_rm": """
        reward_pretrain normalize_reward value_head_prefix max_len port host load_in_4bit bf16 flash_attn
        disable_fast_tokenizer batch_size use_ms
    """,
    "batch_inference": """
        eval_task zero_stage local_rank bf16 flash_attn disable_fast_tokenizer micro_batch_size seed
        full_determinism pretrain value_head_prefix dataset dataset_probs dataset_split input_key output_key
        apply_chat_template input_template max_len max_samples output_path prompt_max_len max_new_tokens
        greedy_sampling top_p temperature repetition_penalty best_of_n post_processor tp_size max_num_seqs
        enable_prefix_caching iter rollout_batch_size normalize_reward reward_template enable_csft
        csft_prompt use_ms
    """,
}
JOBS = {"train_sft": "SFTJob", "train_rm": "RMJob", "train_dpo": "DPOJob", "train_kto": "KTOJob", "train_prm": "PRMJob",
        "train_kd": "KDJob", "train_ppo_ray": "PPOJob", "serve_rm": "ServeRMJob", "batch_inference": "BatchInferenceJob"}

# ----- OpenRLHF's examples/scripts at c1970206: the argument lists, verbatim ---------------------------------
SCRIPTS = {
    # train_sft_llama.sh
    "train_sft": r"""
   --max_len 2048 \
   --dataset Open-Orca/OpenOrca \
   --input_key question \
   --output_key response \
   --train_batch_size 256 \
   --micro_train_batch_size 2 \
   --max_samples 500000 \
   --pretrain meta-llama/Meta-Llama-3-8B \
   --save_path ./checkpoint/llama3-8b-sft \
   --save_steps -1 \
   --logging_steps 1 \
   --eval_steps -1 \
   --zero_stage 2 \
   --max_epochs 1 \
   --bf16 \
   --flash_attn \
   --learning_rate 5e-6 \
   --load_checkpoint \
   --gradient_checkpointing
""",
    # train_rm_llama.sh
    "train_rm": r"""
   --save_path ./checkpoint/llama3-8b-rm \
   --save_steps -1 \
   --logging_steps 1 \
   --eval_steps -1 \
   --train_batch_size 256 \
   --micro_train_batch_size 1 \
   --pretrain OpenRLHF/Llama-3-8b-sft-mixture \
   --bf16 \
   --max_epochs 1 \
   --max_len 8192 \
   --zero_stage 3 \
   --learning_rate 9e-6 \
   --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku \
   --apply_chat_template \
   --chosen_key chosen \
   --rejected_key rejected \
   --flash_attn \
   --load_checkpoint \
   --gradient_checkpointing
""",
    # train_dpo_llama.sh
    "train_dpo": r"""
   --save_path ./checkpoint/llama3-8b-dpo \
   --save_steps -1 \
   --logging_steps 1 \
   --eval_steps -1 \
   --train_batch_size 256 \
   --micro_train_batch_size 1 \
   --pretrain OpenRLHF/Llama-3-8b-sft-mixture \
   --bf16 \
   --max_epochs 1 \
   --max_len 8192 \
   --zero_stage 3 \
   --learning_rate 5e-7 \
   --beta 0.1 \
   --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku \
   --apply_chat_template \
   --chosen_key chosen \
   --rejected_key rejected \
   --flash_attn \
   --load_checkpoint \
   --gradient_checkpointing
""",
    # train_ppo_llama_ray.sh (after `ray job submit ... -- python3 -m openrlhf.cli.train_ppo_ray`)
    "train_ppo_ray": r"""
   --ref_num_nodes 1 \
   --ref_num_gpus_per_node 2 \
   --reward_num_nodes 1 \
   --reward_num_gpus_per_node 2 \
   --critic_num_nodes 1 \
   --critic_num_gpus_per_node 2 \
   --actor_num_nodes 1 \
   --actor_num_gpus_per_node 2 \
   --vllm_num_engines 2 \
   --vllm_tensor_parallel_size 2 \
   --colocate_critic_reward \
   --colocate_actor_ref \
   --pretrain OpenRLHF/Llama-3-8b-sft-mixture \
   --reward_pretrain OpenRLHF/Llama-3-8b-rm-mixture \
   --save_path /openrlhf/examples/checkpoint/llama3-8b-rlhf \
   --micro_train_batch_size 16 \
   --train_batch_size 128 \
   --micro_rollout_batch_size 32 \
   --rollout_batch_size 1024 \
   --max_samples 100000 \
   --max_epochs 1 \
   --prompt_max_len 1024 \
   --generate_max_len 1024 \
   --zero_stage 3 \
   --bf16 \
   --actor_learning_rate 5e-7 \
   --critic_learning_rate 9e-6 \
   --init_kl_coef 0.01 \
   --prompt_data OpenRLHF/prompt-collection-v0.1 \
   --input_key context_messages \
   --apply_chat_template \
   --normalize_reward \
   --packing_samples \
   --adam_offload \
   --flash_attn \
   --gradient_checkpointing \
   --load_checkpoint \
   --use_wandb {wandb_token}
""",
    # train_kto_llama.sh
    "train_kto": r"""
   --save_path ./checkpoint/llama3-8b-kto \
   --save_steps -1 \
   --logging_steps 1 \
   --eval_steps -1 \
   --train_batch_size 64 \
   --micro_train_batch_size 1 \
   --pretrain OpenRLHF/Llama-3-8b-sft-mixture \
   --bf16 \
   --max_epochs 1 \
   --max_len 8192 \
   --zero_stage 3 \
   --learning_rate 5e-7 \
   --dataset Dylan2048/ultrafeedback-unpaired-preferences \
   --input_key instruction \
   --output_key response \
   --label_key score \
   --flash_attn \
   --beta 0.1 \
   --max_samples 1024 \
   --gradient_checkpointing
""",
    # train_prm_mistral.sh
    "train_prm": r"""
   --save_path ./checkpoint/mistal-7b-prm \
   --save_steps 500 \
   --logging_steps 1 \
   --eval_steps 100 \
   --train_batch_size 256 \
   --micro_train_batch_size 8 \
   --pretrain mistralai/Mistral-7B-v0.1  \
   --bf16 \
   --max_epochs 1 \
   --max_len 8192 \
   --zero_stage 3 \
   --learning_rate 1e-6 \
   --dataset zhuzilin/Math-Shepherd \
   --input_key input \
   --label_key value \
   --flash_attn \
   --load_checkpoint \
   --gradient_checkpointing \
   --packing_samples \
   --wandb_group prm \
   --placeholder_token ки \
   --reward_tokens + -
""",
    # train_knowledge_distillation.sh
    "train_kd": r"""
   --max_len 2048 \
   --dataset Open-Orca/OpenOrca \
   --input_key question \
   --output_key response \
   --train_batch_size 256 \
   --micro_train_batch_size 2 \
   --max_samples 500000 \
   --pretrain meta-llama/Meta-Llama-3-8B-Instruct \
   --teacher_model meta-llama/Meta-Llama-3-70B-Instruct \
   --save_path ./checkpoint/llama3-8b-kd \
   --save_steps -1 \
   --logging_steps 1 \
   --eval_steps -1 \
   --zero_stage 3 \
   --max_epochs 1 \
   --bf16 \
   --flash_attn \
   --kd_coef 0.4 \
   --learning_rate 5e-6 \
   --teacher_offload \
   --gradient_checkpointing
""",
    # serve_remote_rm.sh
    "serve_rm": r"""
    --reward_pretrain OpenRLHF/Llama-3-8b-rm-700k \
    --port 5000 \
    --bf16 \
    --flash_attn \
    --normalize_reward \
    --max_len 8192 \
    --batch_size 16
""",
    # train_rejection_sampling_llama.sh: the generation step (its "--temperature 0.9" line has no backslash)
    "batch_inference": r"""
   --eval_task generate_vllm \
   --pretrain $POLICY_MODEL_PATH \
   --bf16 \
   --max_new_tokens 2048 \
   --prompt_max_len 2048 \
   --dataset OpenRLHF/prompt-collection-v0.1 \
   --input_key context_messages \
   --apply_chat_template \
   --temperature 0.9
   --zero_stage 0 \
   --best_of_n 4 \
   --enable_prefix_caching \
   --tp_size 4 \
   --max_num_seqs 64 \
   --iter $iter \
   --rollout_batch_size $ROLLOUT_BATCH_SIZE \
   --output_path $GENERATE_OUTPUT
""",
}
# Which example lines are DeepSpeed-only / not-applicable notices (the rest are options or aliases here).
NOTICES = {
    "train_sft": {"zero_stage", "flash_attn"},
    "train_rm": {"zero_stage", "flash_attn"},
    "train_dpo": {"zero_stage", "flash_attn"},
    "train_ppo_ray": {"zero_stage", "flash_attn"},
    "train_kto": {"zero_stage", "flash_attn"},
    "train_prm": {"zero_stage", "flash_attn"},
    "train_kd": {"zero_stage", "flash_attn"},
    "serve_rm": {"bf16", "flash_attn"},
    "batch_inference": {"bf16", "zero_stage"},
}


def _job_cls(cli: str):
    return getattr(importlib.import_module(f"engine.cli.{cli}"), JOBS[cli])


def _split(words: list[str]) -> list[tuple[str, list[str]]]:
    """``[(flag, values)]`` of a command line of ``--flag [values...]`` words."""
    out: list[tuple[str, list[str]]] = []
    for word in words:
        if word.startswith("--"):
            out.append((word[2:], []))
        else:
            out[-1][1].append(word)
    return out


def command(cli: str, scaled: dict[str, str | None] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The example's words with ``scaled`` values (None: the flag dropped); every scaled flag must
    be one the example has, or be new in ``extra``."""
    pairs = _split(shlex.split(SCRIPTS[cli].replace("\\\n", " ")))
    scaled = dict(scaled or {})
    missing = set(scaled) - {flag for flag, _ in pairs}
    assert not missing, f"{cli}: the example has no {missing}"
    words: list[str] = []
    for flag, values in pairs:
        if flag in scaled and scaled[flag] is None:
            continue
        words += [f"--{flag}", *([scaled[flag]] if flag in scaled else values)]
    return words + list(extra)


def in_our_names(cli: str, words: list[str]) -> list[str]:
    """The same settings with this engine's canonical flags: aliases renamed, fan-outs expanded,
    notices dropped."""
    job_cls = _job_cls(cli)
    canonical = {alias: flag.flag for flag in job_flags(job_cls) for alias in flag.aliases}
    foreign = {entry.flag: entry for entry in foreign_flags(job_cls)}
    out: list[str] = []
    for flag, values in _split(words):
        if flag in foreign:
            out += [w for target in foreign[flag].fans_out_to for w in (f"--{target}", *values)]
            continue
        out += [f"--{canonical.get(flag, flag)}", *values]
    return out


def parse_both(cli: str, words: list[str]):
    """The job of the OpenRLHF words (checking its notices: one line per notice flag) and the job
    of our flag names for the same settings, which must be equal."""
    parse = importlib.import_module(f"engine.cli.{cli}").parse_args  # with the CLI's own plain-field settings
    with contextlib.redirect_stderr(io.StringIO()) as err:
        job = parse(words)
    notes = [line for line in err.getvalue().splitlines() if line.startswith("note: ")]
    assert sorted(line.split()[1].rstrip(":") for line in notes) == sorted(f"--{flag}" for flag in NOTICES[cli]), notes
    with contextlib.redirect_stderr(io.StringIO()) as err:
        ours = parse(in_our_names(cli, words))
    assert "note: " not in err.getvalue()
    assert job == ours
    return job


# ----- every OpenRLHF flag is handled -------------------------------------------------------------------------

@pytest.mark.parametrize("cli", sorted(OPENRLHF_FLAGS))
def test_every_openrlhf_flag_is_an_option_an_alias_or_an_entry(cli):
    job_cls = _job_cls(cli)
    options = {s[2:] for flag in job_flags(job_cls) for s in flag.option_strings}
    entries = {entry.flag for entry in foreign_flags(job_cls)}
    unknown = [flag for flag in OPENRLHF_FLAGS[cli].split() if flag not in options | entries]
    assert not unknown, f"{cli}: OpenRLHF flags neither options nor table entries: {unknown}"


PLACEHOLDERS = {"train_ppo_ray": {"use_wandb": None}, "batch_inference": {"iter": "0", "rollout_batch_size": "2048"}}


@pytest.mark.parametrize("cli", sorted(SCRIPTS))
def test_example_command_lines_parse_with_their_notices(cli):
    job = parse_both(cli, command(cli, PLACEHOLDERS.get(cli)))
    if cli == "train_ppo_ray":  # the alias and OpenRLHF's defaults
        assert job.optim.learning_rate == 5e-7 and job.models.critic_learning_rate == 9e-6
        assert job.ppo.advantage.reward_clip_range == (-10.0, 10.0)
        assert job.checkpoint.ckpt_path == "./ckpt/checkpoints_ppo_ray" and job.checkpoint.load_checkpoint
    if cli == "train_sft":  # plain-text inputs get OpenRLHF's default template
        assert job.data.template == "User: {}\nAssistant: " and job.trainer.checkpoint.ckpt_path == "./ckpt/checkpoints_sft"


def test_refused_and_default_spellings(capsys):
    from engine.cli import batch_inference, train_ppo_ray, train_rm, train_sft
    from engine.cli.options import OptionError

    base = ["--pretrain", "m", "--dataset", "d.jsonl"]
    lora = train_sft.parse_args([*base, "--lora_rank", "16", "--lora_alpha", "32", "--target_modules", "q_proj", "v_proj"])
    assert lora.trainer.engine.build.lora.target_modules == ("q_proj", "v_proj")
    assert train_sft.parse_args([*base, "--lora_rank", "8", "--load_in_4bit"]).trainer.engine.build.lora.load_in_4bit
    with pytest.raises(OptionError, match=r"--load_in_4bit .* needs --lora_rank > 0"):
        train_sft.parse_args([*base, "--load_in_4bit"])
    assert train_rm.parse_args([*base, "--value_head_prefix", "value_head"]).trainer.engine.build.value_head_prefix \
        == "value_head"
    with pytest.raises(SystemExit):  # a policy has no value head to name
        train_sft.parse_args([*base, "--value_head_prefix", "value_head"])
    assert "unrecognized arguments: --value_head_prefix value_head" in capsys.readouterr().err
    # OpenRLHF's `--input_template ""` (rejection sampling's SFT step): no template at all.
    assert train_sft.parse_args([*base, "--input_template", ""]).data.template is None
    assert train_sft.parse_args([*base, "--apply_chat_template"]).data.template is None
    # One OpenRLHF --ring_attn_size is every RL role's context-parallel size.
    job = train_ppo_ray.parse_args(["--pretrain", "m", "--prompt_data", "p", "--ring_attn_size", "2"])
    assert {getattr(job, role).parallel.context_parallel_size for role in ("actor", "critic", "ref", "reward")} == {2}
    greedy = batch_inference.parse_args(["--eval_task", "generate", "--pretrain", "m", "--dataset", "d",
                                         "--output_path", "o", "--greedy_sampling", "--dataset_split", "test"])
    assert greedy.sampling.temperature == 0.0 and greedy.data.train_split == "test"


def _rm_losses(rank, world_size):
    import torch
    import torch.distributed as dist

    from engine.trainers.rm import rm_loss_fn

    dist.init_process_group("gloo")
    values = torch.tensor([[2.0, 1.0], [0.5, 3.0]]).view(2, 2, 1)  # one pair: r_chosen 1.0, r_rejected 0.5
    batch = {"last_index": torch.tensor([1, 0]), "margin": torch.tensor([2.0])}
    return [rm_loss_fn(1.0, None, margin_loss=m)(values, batch)[0].item() for m in (False, True)]


def test_rm_margins_enter_the_loss_only_with_margin_loss():
    from tests.dist_harness import run_distributed

    plain, with_margin = run_distributed(_rm_losses, 1, timeout=120)[0]
    assert plain == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))  # OpenRLHF: margins need --margin_loss
    assert with_margin == pytest.approx(-math.log(1 / (1 + math.exp(1.5))))


# ----- SFT -> RM, DPO -> PPO: one step each ---------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A vLLM-loadable tiny Llama and the examples' data shapes: OpenOrca-like question / response
    rows, chat-message preference pairs, chat-message prompts."""
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("openrlhf")
    build_tiny_model("llama", root / "model", seed=0, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2)
    sums = [(a, b) for a in range(4) for b in range(4)]

    def turn(role, content):
        return {"role": role, "content": content}

    def write(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("orca.jsonl", [{"question": f"{a}+{b}=", "response": str(a + b)} for a, b in sums])
    write("prefs.jsonl", [{"chosen": [turn("user", f"{a}+{b}="), turn("assistant", str(a + b))],
                           "rejected": [turn("user", f"{a}+{b}="), turn("assistant", str(a + b + 1))]} for a, b in sums])
    write("prompts.jsonl", [{"context_messages": [turn("user", f"{a}+{b}=")]} for a, b in sums])
    return root


def _offline_step(cli: str, workdir: Path, scaled: dict, extra: tuple[str, ...] = ()) -> Path:
    """Parse (notices, the same job as our names) and run the example scaled to one optimizer step
    of 4 samples; OpenRLHF's relative defaults (--ckpt_path ./ckpt/...) resolve in ``workdir``.
    --use_tensorboard (an OpenRLHF flag too) records the step's loss."""
    out, tensorboard = workdir / cli, workdir / f"tb_{cli}"
    words = command(cli, {"save_path": str(out), "train_batch_size": "4", "max_len": "64", **scaled},
                    extra=(*extra, "--use_tensorboard", str(tensorboard)))
    parse_both(cli, words)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        importlib.import_module(f"engine.cli.{cli}").main(words)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), f"no HF checkpoint at {out}"
    losses = _scalars(tensorboard, "train/loss")
    assert len(losses) == 1 and math.isfinite(losses[0]), losses
    return out


def _scalars(directory: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def sft_model(workdir) -> Path:
    return _offline_step("train_sft", workdir, {"dataset": str(workdir / "orca.jsonl"), "max_samples": "4",
                                                "pretrain": str(workdir / "model")})


def test_sft_example_runs_a_step(sft_model):
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(sft_model).config.model_type == "llama"


@pytest.fixture(scope="module")
def rm_model(workdir, sft_model) -> Path:
    return _offline_step("train_rm", workdir, {"dataset": str(workdir / "prefs.jsonl"), "pretrain": str(sft_model)},
                         extra=("--max_samples", "4"))


def test_rm_example_runs_a_step(rm_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(rm_model)  # with the reward statistics the trainer measured
    assert config.num_labels == 1 and math.isfinite(config.mean) and config.std >= 0


def test_dpo_example_runs_a_step(workdir, sft_model):
    _offline_step("train_dpo", workdir, {"dataset": str(workdir / "prefs.jsonl"), "pretrain": str(sft_model)},
                  extra=("--max_samples", "4"))


def test_ppo_example_runs_a_rollout(workdir, sft_model, rm_model, ray_cluster):
    from engine.cli import train_ppo_ray

    out = workdir / "ppo"
    sizes = {f"{role}_num_gpus_per_node": "1" for role in ("ref", "reward", "critic", "actor")}
    words = command("train_ppo_ray", {
        **sizes, "vllm_num_engines": "1", "vllm_tensor_parallel_size": "1",
        "pretrain": str(sft_model), "reward_pretrain": str(rm_model), "save_path": str(out),
        "micro_train_batch_size": "2", "train_batch_size": "2", "micro_rollout_batch_size": "2",
        "rollout_batch_size": "2", "max_samples": "2", "prompt_max_len": "32", "generate_max_len": "6",
        "prompt_data": str(workdir / "prompts.jsonl"), "use_wandb": None,
    }, extra=("--enforce_eager", "--vllm_dtype", "float32"))  # vLLM on CPU as tests/test_ppo_e2e.py runs it
    parse_both("train_ppo_ray", words)
    history = train_ppo_ray.main(words)
    assert len(history) == 1, history
    assert all(math.isfinite(history[0][k]) for k in ("reward", "actor/policy_loss", "critic/value_loss", "kl"))
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), f"no HF checkpoint at {out}"
