"""OpenRLHF's flags that are not options here, each declared once with what this engine does about it.

Users bring OpenRLHF command lines (DeepSpeed launches of ``openrlhf.cli.*``). A flag whose
concept exists here is an option or an alias of the config field (``--actor_learning_rate``,
``--prompt_split``, ``--wandb_org``, ...); every other flag of OpenRLHF's CLIs (as of commit
c1970206, 2025-03-31) is an entry of :data:`TABLE`, one of:

- a **notice**: accepted; one line on rank 0 / the driver says what this engine does instead
  (``--zero_stage 3``: the distributed optimizer shards Adam states over DP; TP / PP shard the
  weights). The notice is the action: nothing else changes;
- a **refusal**: an error naming the flag and why (``--use_ms``, ...); ``accepted``
  values are what this engine does anyway and pass with the notice;
- a **fan-out**: one OpenRLHF flag that is several options here (``--ring_attn_size`` sets every
  RL role's context-parallel size).

``engine/cli/options.py`` adds the entries of a job's CLI (the job module's name) to its parser
and acts on them; a flag that is both an option and an entry is an error when the parser is
built. ``tests/test_openrlhf_compat.py`` holds OpenRLHF's flag lists and checks that every one is
an option, an alias or an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OFFLINE = ("train_sft", "train_rm", "train_dpo", "train_kto", "train_prm", "train_kd")
TRAINERS = (*OFFLINE, "train_ppo_ray")
RL = ("train_ppo_ray",)
EVERY = (*TRAINERS, "batch_inference", "serve_rm")
ROLES = ("actor", "critic", "ref", "reward")


@dataclass(frozen=True)
class Foreign:
    """One OpenRLHF flag that is not an option of the CLIs in ``clis``."""

    flag: str  # without "--"
    clis: tuple[str, ...]
    says: str  # notice: what this engine does instead; refusal: why not, and what to use
    type: type | None = None  # None: a switch (store_true)
    nargs: str | None = None
    refused: bool = False
    accepted: tuple[Any, ...] = ()  # refused flags: values that are what this engine does (the notice is printed)
    fans_out_to: tuple[str, ...] = ()  # flags here that take the value (the entry is then an alias of all of them)

    def __post_init__(self) -> None:
        assert not (self.fans_out_to and (self.refused or self.accepted)), self.flag
        assert not self.accepted or self.refused, self.flag

    def refuses(self, value: Any) -> bool:
        return self.refused and value not in self.accepted

    def line(self, value: Any, typed: str | None = None) -> str:
        """The notice (or, for a refused value, the error) naming the flag as typed (``typed``: the
        spelling given, e.g. OpenRLHF 0.10+'s ``--ds.zero_stage``; with its value for a switch given
        by value, ``--ds.param_dtype bf16``)."""
        name = typed or f"--{self.flag}"
        shown = name if self.type is None else f"{name} {_show(value)}"
        return f"{shown}: {'not supported: ' if self.refuses(value) else ''}{self.says}"


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _zero(parallel_flags: str) -> str:
    return ("this engine shards optimizer state over data-parallel ranks (Megatron distributed optimizer) at "
            f"any stage; use {parallel_flags} to shard the weights")


_OFFLINE_GRID = "--tensor_model_parallel_size / --pipeline_model_parallel_size"
_RL_GRID = "--{actor,critic,ref,reward}_tensor_model_parallel_size / ..._pipeline_model_parallel_size"

TABLE: tuple[Foreign, ...] = (
    # ----- DeepSpeed and the launcher ------------------------------------------------------------
    Foreign("zero_stage", OFFLINE, _zero(_OFFLINE_GRID), type=int),
    Foreign("zero_stage", RL, _zero(_RL_GRID), type=int),
    Foreign("zero_stage", ("batch_inference",), "no DeepSpeed here: generation runs on vLLM engines, reward "
            "scoring on one HF model", type=int),
    Foreign("local_rank", (*TRAINERS, "batch_inference"), "set by the deepspeed launcher; this engine reads "
            "LOCAL_RANK (and RANK / WORLD_SIZE) from the environment, as torchrun and deepspeed set them", type=int),
    Foreign("zpg", TRAINERS, "optimizer state is sharded over all data-parallel ranks (Megatron distributed "
            "optimizer); there are no ZeRO++ partition groups", type=int),
    Foreign("grad_accum_dtype", TRAINERS, "gradients accumulate and are reduced in fp32 (Megatron DDP main "
            "grads) whatever the parameter dtype", type=str),
    Foreign("overlap_comm", TRAINERS, "the data-parallel gradient reduction runs after the backward pass "
            "(Megatron DDP without overlap)"),
    Foreign("actor_init_on_gpu", RL, "every rank builds its own model shard directly on its device"),
    Foreign("disable_ds_ckpt", ("train_sft", "train_dpo", "train_ppo_ray"), "at each --save_steps this engine "
            "writes its resumable Megatron checkpoint (plus HF weights with --save_hf_ckpt where offered); there "
            "is no HF-only checkpointing"),
    Foreign("use_ds_universal_ckpt", TRAINERS, "Megatron checkpoints reload under any TP / PP / DP layout "
            "without a conversion step"),
    Foreign("max_ckpt_mem", TRAINERS, "old checkpoints are removed by count (--max_ckpt_num), not by size",
            type=int),
    # ----- kernels and precision -----------------------------------------------------------------
    Foreign("flash_attn", EVERY, "the attention kernel is chosen automatically: flash-attn for fp16 / bf16 on "
            "CUDA when installed, else PyTorch SDPA (CPU: SDPA), ring attention under context parallelism"),
    Foreign("gradient_checkpointing_use_reentrant", TRAINERS, "--gradient_checkpointing is Megatron's full "
            "recompute of every layer, which has no reentrant switch"),
    Foreign("use_liger_kernel", ("train_sft", "train_dpo", "train_kto", "train_prm", "train_kd", "train_ppo_ray"),
            "Liger patches HF modules; Megatron-core layers run their own (unfused on CPU) kernels"),
    Foreign("torch_compile", TRAINERS, "the model is not torch.compile'd (Megatron-core layers run eagerly)"),
    Foreign("compute_fp32_loss", ("train_rm",), "the reward model loss is always computed in fp32"),
    Foreign("bf16", ("serve_rm",), "the reward model scores in its checkpoint's dtype (bf16 for a bf16 "
            "checkpoint); the flag does not cast"),
    Foreign("bf16", ("batch_inference",), "generation runs in --vllm_dtype (auto: the checkpoint's dtype); "
            "reward scoring in the checkpoint's dtype"),
    Foreign("full_determinism", (*TRAINERS, "batch_inference"), "deterministic kernels are not forced (runs "
            "repeat for a --seed and layout on CPU)", refused=True),
    # ----- models and heads ----------------------------------------------------------------------
    Foreign("disable_fast_tokenizer", EVERY, "tokenizers load as transformers' AutoTokenizer default (the fast "
            "tokenizer when the model has one)", refused=True),
    Foreign("load_in_4bit", ("serve_rm",), "4-bit loading of the served reward model (QLoRA trains with "
            "--load_in_4bit; merge its adapter with tools.convert.lora_combiner and serve the result)",
            refused=True),
    Foreign("use_ms", EVERY, "ModelScope hub downloads: download the model and pass its directory", refused=True),
    # ----- algorithms and data -------------------------------------------------------------------
    Foreign("loss", ("train_rm",), "the pairwise loss is -logsigmoid(r_chosen - r_rejected [- margin with "
            "--margin_loss]), which is OpenRLHF's 'sigmoid' and, without margins, also its 'logexp' loss", type=str),
    Foreign("perf", RL, "per-phase times are always logged (time/generate, time/train, ...)"),
    Foreign("vllm_sync_with_ray", RL, "weights travel over --vllm_sync_backend groups (gloo / nccl / cuda_ipc); "
            "Ray's collective library is not used"),
    Foreign("ring_attn_size", RL, "alias of every role's context-parallel size", type=int,
            fans_out_to=tuple(f"{role}_context_parallel_size" for role in ROLES)),
)


# Not a flag but its absence: OpenRLHF exports to ./ckpt by default, this engine only where --save_path says.
NO_SAVE_PATH = "no --save_path: the trained model will not be exported (OpenRLHF's default was ./ckpt)"


def entries_for(cli: str) -> tuple[Foreign, ...]:
    """The entries of one CLI (a module name under engine/cli); at most one per flag."""
    entries = tuple(entry for entry in TABLE if cli in entry.clis)
    names = [entry.flag for entry in entries]
    assert len(names) == len(set(names)), f"{cli}: an OpenRLHF flag declared twice"
    return entries
