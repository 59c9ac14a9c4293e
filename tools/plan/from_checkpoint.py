"""``--from_checkpoint CKPT``: plan the layouts a training checkpoint can resume at on a cluster.

A training checkpoint (``<ckpt_path>/global_stepN``, an RL run's ``<ckpt_path>/actor/global_stepN``)
carries what the planner needs: the model's HF config (``hf/``), whether it is a value model, and the
layout it was written at (``meta.json``; checkpoints from before layouts were recorded lack it). It
resumes at any layout the model splits evenly over (``--load_checkpoint`` reshards the model,
optimizer state, EMA and adapters; the RNG is re-seeded at another layout), so the layouts proposed
are the planner's own search for that model and job, with the checkpoint's layout marked where it
is among them.

The job is the one given with ``--job``, else told from where the checkpoint sits: an ``actor``
checkpoint with a ``critic`` beside it is ppo, without one grpo; a value model is rm; else sft (a
dpo / kto checkpoint looks like an sft one: pass ``--job``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from models.hf_checkpoint import CheckpointError
from models.mcore_checkpoint import COMMON_STATE, HF_DIR, verify_checkpoint

_STEP = re.compile(r"^global_step(\d+)$")
_SHORT = (("tensor_model_parallel_size", "tp"), ("pipeline_model_parallel_size", "pp"),
          ("context_parallel_size", "cp"), ("expert_model_parallel_size", "ep"))


def _newest_step(root: Path) -> Path | None:
    """The newest complete checkpoint under a ``--ckpt_path`` (by file sizes)."""
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name)))
    for _, directory in reversed(steps):
        try:
            verify_checkpoint(directory, checksums=False)
            return directory
        except CheckpointError:
            continue
    return None


def checkpoint_directory(path: str) -> Path:
    """A checkpoint itself, or the newest complete one of a ``--ckpt_path`` (an RL run's: its actor's)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--from_checkpoint {path}: no such directory")
    if (root / "meta.json").exists():
        verify_checkpoint(root, checksums=False)
        return root
    for candidate in (root, root / "actor"):
        if candidate.is_dir() and (found := _newest_step(candidate)) is not None:
            return found
    raise ValueError(f"--from_checkpoint {path}: neither a checkpoint (global_stepN) nor a --ckpt_path holding a "
                     "complete one")


def infer_job(directory: Path, meta: dict) -> tuple[str, str]:
    """(job, why) from where the checkpoint sits and what it holds."""
    role = directory.parent.name
    if role == "actor":
        critic = directory.parent.parent / "critic"
        return ("ppo", "an RL actor checkpoint with a critic beside it") if critic.is_dir() else (
            "grpo", "an RL actor checkpoint without a critic")
    if role == "critic":
        return "ppo", "an RL critic checkpoint"
    if meta.get("value_head"):
        return "rm", "a value-model checkpoint"
    return "sft", "an offline policy checkpoint (dpo / kto look the same: pass --job)"


def _saved_batch(directory: Path) -> dict:
    """The batch sizes the checkpoint's run trained with, as far as it recorded them."""
    path = directory / COMMON_STATE
    if not path.exists():
        return {}
    trainer = torch.load(path, weights_only=False).get("trainer", {})
    out = {}
    if "schedule" in trainer:
        out["train_batch_size"] = trainer["schedule"]["train_batch_size"]
    if "prompts" in trainer:
        out["rollout_batch_size"] = trainer["prompts"]["rollout_batch_size"]
    return out


def read_checkpoint(path: str, *, job: str | None) -> dict:
    """What the planner takes from a checkpoint: its model (``hf/``), job and layout."""
    directory = checkpoint_directory(path)
    meta = verify_checkpoint(directory, checksums=False)
    inferred, why = infer_job(directory, meta)
    return {
        "path": str(directory), "step": meta.get("step"), "model_type": meta.get("model_type"),
        "hf_dir": str(directory / HF_DIR), "job": job or inferred, "job_from": "--job" if job else why,
        "lora_only": bool(meta.get("trained_only")), "saved_layout": meta.get("layout"),
        "saved_batch": _saved_batch(directory),
    }


def is_saved_layout(label_parts: dict, saved: dict | None, world_size: int) -> bool:
    """Whether a planned layout (``tp``, ``pp``, ``cp``, ``ep``) is the one the checkpoint was written at."""
    if not saved or saved.get("world_size") != world_size:
        return False
    return all(saved.get(long) == label_parts[short] for long, short in _SHORT)


def describe(info: dict) -> str:
    saved = info["saved_layout"]
    layout = (" x ".join(f"{short.upper()}{saved[long]}" for long, short in _SHORT) + f" x DP{saved['data_parallel_size']}"
              f" ({saved['world_size']} ranks)") if saved else "an unrecorded layout"
    lines = [f"checkpoint {info['path']} (step {info['step']}, {info['model_type']}), written at {layout}; "
             f"job {info['job']} ({info['job_from']})"]
    if info["saved_batch"]:
        lines.append("its run's batch: " + ", ".join(f"--{k} {v}" for k, v in info["saved_batch"].items()) +
                     " (the plan uses this command line's)")
    if info["lora_only"]:
        lines.append("a LoRA checkpoint: adapters only, the base model is the run's --pretrain")
    lines.append("--load_checkpoint resumes it at any layout below: model, optimizer state, EMA and adapters "
                 "reshard; the RNG is re-seeded at another layout (docs/guarantees.md)")
    return "\n".join(lines)
