"""Training checkpoints: model, optimizer, LR schedule, data position and RNG, resumable.

Saved in the sharded Megatron format of ``models.mcore_checkpoint`` under
``<ckpt_path>/global_step<N>``: complete directories only (written aside and renamed), the
newest ``--max_ckpt_num`` kept. Resume takes the newest checkpoint that verifies (sizes and
CRC-32 of every file against its manifest); a truncated, half-written or corrupt one is named and
skipped in favour of the previous. ``--load_checkpoint`` with no usable checkpoint says so and
starts fresh, or with ``--require_checkpoint`` is an error. A checkpoint records the layout it was
written at and resumes at any other (``engine.runtime.resume_layout``: everything reshards but the
per-rank RNG, which is re-seeded there, said in one line).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch.distributed as dist

from engine.runtime.async_checkpoint import BackgroundWriter
from engine.runtime.config import CheckpointConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.runtime.resume_layout import current_layout, describe_layout, reseed, restore_rng, rng_state, same_layout
from models.heads import is_value_model
from models.hf_checkpoint import CheckpointError
from models.lora import has_lora
from models.mcore_async_save import begin_save_sharded
from models.mcore_checkpoint import (
    RANK_STATE_DIR,
    load_common_state,
    load_rank_state,
    load_sharded,
    read_meta,
    save_sharded,
    verify_checkpoint,
)

_STEP_DIR = re.compile(r"^global_step(\d+)$")
# Optimizer states in the canonical per-parameter layout: a resume may change TP / PP / DP
# (megatron-core 0.16.1 rejects its default 'fully_sharded_model_space' format at save time).
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_directories(ckpt_path: str | Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under ``ckpt_path``, oldest first (partial ones excluded)."""
    root = Path(ckpt_path)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_valid_checkpoint(ckpt_path: str | Path, *, group=None) -> Path | None:
    """The newest checkpoint under ``ckpt_path`` whose files match their manifest; each one
    skipped is named. ``group``: collective, the ranks share the checksum reading and agree."""
    for _, directory in reversed(step_directories(ckpt_path)):
        try:
            verify_checkpoint(directory, group=group)
            return directory
        except CheckpointError as exc:
            if group is None or dist.get_rank(group) == 0:
                print(f"warning: skipping unusable checkpoint {directory}: {exc}", flush=True)
    return None


def resume_directory(config: CheckpointConfig, *, group=None) -> Path | None:
    """The checkpoint ``--load_checkpoint`` resumes from; None (said in one line) when there is none
    usable, an error naming the path with ``--require_checkpoint``."""
    if not config.load_checkpoint:
        return None
    directory = latest_valid_checkpoint(config.ckpt_path, group=group)
    if directory is None:
        message = no_checkpoint_message(config.ckpt_path)
        if config.require_checkpoint:
            raise CheckpointError(f"--require_checkpoint: {message}")
        if group is None or dist.get_rank(group) == 0:
            print(f"--load_checkpoint: {message}: starting from scratch", flush=True)
    return directory


def no_checkpoint_message(ckpt_path: str | Path) -> str:
    found = step_directories(ckpt_path)
    if not Path(ckpt_path).is_dir():
        return f"--ckpt_path {ckpt_path} does not exist"
    if not found:
        return f"--ckpt_path {ckpt_path} holds no checkpoint (no global_step<N> directory)"
    return f"--ckpt_path {ckpt_path} holds no usable checkpoint ({len(found)} found, none complete and intact)"


def check_resumable(config: CheckpointConfig, *, subdirectory: str | None = None) -> None:
    """Before any rank starts: with ``--require_checkpoint``, a ``--ckpt_path`` without a complete
    checkpoint (by file sizes; the ranks then compare checksums) is a ValueError naming it."""
    if not config.require_checkpoint:
        return
    root = Path(config.ckpt_path) / subdirectory if subdirectory else Path(config.ckpt_path)
    for _, directory in reversed(step_directories(root)):
        try:
            verify_checkpoint(directory, checksums=False)
            return
        except CheckpointError:
            continue
    raise ValueError(f"--require_checkpoint: {no_checkpoint_message(root)}")


def save_training_checkpoint(
    config: CheckpointConfig,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    adapter,
    hf_source_dir,
    extra_models: dict | None = None,
    writer: BackgroundWriter | None = None,
) -> Path:
    """Collectively save everything needed to resume after ``step``; rotate old checkpoints.
    ``extra_models``: more models of the same grid saved alongside (an EMA), under their names.
    With ``--async_save`` and a ``writer``, the state is snapshotted and written in the background:
    the directory appears (and the rotation runs) once the writer is done (``engine.runtime.async_checkpoint``)."""
    directory = Path(config.ckpt_path) / f"global_step{step}"
    model_sd = _trained_part(model)
    extra = {name: other.sharded_state_dict(prefix=f"{name}.") for name, other in (extra_models or {}).items()}
    state_dict = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_OPTIMIZER_FORMAT),
                  **extra}
    small_files = dict(
        adapter=adapter,
        hf_source_dir=hf_source_dir,
        padded_vocab_size=model.vocab_size,
        extra_meta={"step": step, "value_head": is_value_model(model), "extra_models": sorted(extra),
                    "trained_only": has_lora(model), "layout": current_layout()},
        common_state={"scheduler": scheduler.state_dict(), "trainer": trainer_state},
        rank_state={"rng": rng_state()},
    )
    if config.async_save and writer is not None:
        writer.wait()  # one checkpoint in flight
        writer.start(begin_save_sharded(state_dict, directory, **small_files), published=lambda: _rotate(config))
        return directory
    save_sharded(state_dict, directory, **small_files)
    _rotate(config)
    return directory


def _rotate(config: CheckpointConfig) -> None:
    """Collective: the newest ``--max_ckpt_num`` checkpoints are kept."""
    if dist.get_rank() == 0:
        for _, old in step_directories(config.ckpt_path)[: -config.max_ckpt_num]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_training_checkpoint(directory: Path, *, model, optimizer, scheduler, extra_models: dict | None = None,
                             seed: int = 42) -> dict:
    """Restore model, optimizer, schedule and RNG from ``directory``, under this run's layout whatever
    the checkpoint's (``engine.runtime.resume_layout``: at another layout the RNG is re-seeded from
    ``seed`` and the step, and rank 0 says so); return the trainer state. ``extra_models`` the
    checkpoint holds are restored too; the names it lacks are listed under ``"missing_extra_models"``
    of the returned state."""
    _materialise_optimizer_state(optimizer)
    model_sd = _trained_part(model)
    meta = read_meta(directory)
    saved = set(meta.get("extra_models", []))
    extra = {name: other for name, other in (extra_models or {}).items() if name in saved}
    state = load_sharded(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIMIZER_FORMAT),
         **{name: other.sharded_state_dict(prefix=f"{name}.") for name, other in extra.items()}},
        directory,
    )
    missing, unexpected = model.load_state_dict(state["model"], strict=not has_lora(model))
    assert not unexpected and not (set(missing) & set(model_sd)), (missing, unexpected)
    for name, other in extra.items():
        other.load_state_dict({key.removeprefix(f"{name}."): value for key, value in state[name].items()}, strict=True)
    optimizer.load_state_dict(state["optimizer"])
    common = load_common_state(directory)
    scheduler.load_state_dict(common["scheduler"])
    _resume_rng(directory, meta, seed=seed)
    return {**common["trainer"], "missing_extra_models": sorted(set(extra_models or {}) - saved)}


def _resume_rng(directory: Path, meta: dict, *, seed: int) -> None:
    """Each rank's own RNG state at the checkpoint's layout; at another, every rank re-seeded (said once)."""
    now = current_layout()
    saved_ranks = len(list((Path(directory) / RANK_STATE_DIR).glob("*.pt")))
    if same_layout(meta.get("layout"), now, saved_ranks=saved_ranks):
        restore_rng(load_rank_state(directory)["rng"])
        return
    used = reseed(seed, int(meta.get("step", 0)))
    if dist.get_rank() == 0:
        print(f"note: {directory} was written at {describe_layout(meta.get('layout'))}, this run is "
              f"{describe_layout(now)}: model, optimizer, schedule and data position are resharded; per-rank RNG "
              f"states do not carry over to another layout: every rank re-seeded with --seed + step = {used}",
              flush=True)


def _trained_part(model) -> dict:
    """The model's sharded state dict, or with LoRA only its trained tensors (adapters, a value head):
    the frozen base is the run's --pretrain, so a checkpoint is MBs and resumes exactly."""
    state = model.sharded_state_dict()
    if not has_lora(model):
        return state
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {key: value for key, value in state.items() if key in trained}


def _materialise_optimizer_state(optimizer) -> None:
    """Create Adam's state tensors so a checkpoint can be loaded into them.

    Without Apex / Transformer Engine, megatron-core 0.16.1 reads Adam's ``step`` from the
    per-parameter state, which torch creates only at the first step: a fresh optimizer cannot
    describe itself for loading. Megatron's own dummy-step initialiser fills it (the values are
    overwritten by the load).
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()
