"""Where a model starts from: an HF directory or a Megatron checkpoint, told apart in one place.

    source = ModelSource.open(path, flag="--reward_pretrain")    # errors name the flag
    source.check_role(value_head=True, trainable=False)          # a reward model needs its head
    adapter = source.adapter()
    tokenizer = source.tokenizer()                                # config and tokenizer: hf_dir
    model = build_model(adapter, parallel, build)
    source.load_weights(model, adapter)                           # under any TP / PP / EP layout

A Megatron checkpoint is a directory in ``models.mcore_checkpoint``'s format: what
``tools.convert.hf_to_mcore`` writes, or a training checkpoint ``<ckpt_path>/global_stepN``. Of
a training checkpoint only the model is read; its optimizer, LR schedule, data position and
RNG stay on disk (continuing a run is ``--load_checkpoint``'s job, not a start's). The layout
it was written with does not matter: megatron-core's ``dist_checkpointing`` reshards on load,
and the vocabulary padding follows the loading layout (padded rows are ``allow_shape_mismatch``
tensors in megatron-core's sharded state dict: read where they overlap, zeros beyond).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.hf_checkpoint import CheckpointError
from models.manifest import MANIFEST
from models.mcore_checkpoint import HF_DIR, META, verify_checkpoint

HF, MEGATRON = "hf", "megatron"


def _looks_like_hub_id(path: str) -> bool:
    """``org/name``: resolved by HF (cache or hub), not a local path."""
    return not os.path.isabs(path) and not path.startswith(".") and path.count("/") == 1


def _hf_value_head(hf_dir: Path) -> bool | None:
    """Whether an HF directory holds a value-head model (``*ForSequenceClassification``, as
    reward models and critics are exported), a causal LM (False), or None when the config does
    not say."""
    try:
        architectures = json.loads((hf_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return True
    if any(a.endswith("ForCausalLM") for a in architectures):
        return False
    return None


@dataclass(frozen=True)
class ModelSource:
    """A model directory a job starts from, and what kind it is."""

    path: str
    kind: Literal["hf", "megatron"]
    flag: str = "--pretrain"  # the flag that named it, for error messages
    meta: dict = field(default_factory=dict)  # a Megatron checkpoint's meta.json

    @classmethod
    def open(cls, path: str | os.PathLike, *, flag: str = "--pretrain") -> ModelSource:
        """Tell an HF directory (or hub id) from a Megatron checkpoint; ValueError naming ``flag``
        for a path that is neither, CheckpointError for an incomplete or corrupt checkpoint."""
        path = str(path)
        directory = Path(path)
        if not directory.exists():
            if _looks_like_hub_id(path):
                return cls(path, HF, flag)
            raise ValueError(f"{flag} {path}: no such directory")
        if not directory.is_dir():
            raise ValueError(f"{flag} {path}: not a directory (expected an HF model directory or a Megatron "
                             "checkpoint)")
        if (directory / MANIFEST).exists() or (directory / META).exists() or any(directory.glob("*.distcp")):
            try:
                # Sizes only: a source is opened by the launcher and by every rank, and checksums read
                # the whole checkpoint (a resume and the converters compare them).
                meta = verify_checkpoint(directory, checksums=False)
            except CheckpointError as exc:
                raise CheckpointError(f"{flag} {path}: {exc}") from exc
            if meta.get("trained_only"):
                raise ValueError(f"{flag} {path} is a LoRA training checkpoint: it holds the adapters only. Resume "
                                 "the run with --load_checkpoint, or start from its --save_path adapter merged by "
                                 "tools.convert.lora_combiner")
            return cls(path, MEGATRON, flag, meta)
        if (directory / "config.json").is_file():
            return cls(path, HF, flag)
        raise ValueError(cls._neither_message(directory, flag))

    @staticmethod
    def _neither_message(directory: Path, flag: str) -> str:
        if (directory / "adapter_config.json").is_file():
            return (f"{flag} {directory} is a LoRA adapter, not a model: merge it into its base with "
                    f"python -m tools.convert.lora_combiner --model_path BASE --lora_path {directory} --output_path OUT")
        steps = sorted((p for p in directory.glob("global_step*") if p.is_dir() and p.name[11:].isdigit()),
                       key=lambda p: int(p.name[11:]))
        if steps:
            return (f"{flag} {directory} is a --ckpt_path directory, not a model: pass one of its checkpoints "
                    f"(e.g. {steps[-1]}), or resume the run with --ckpt_path {directory} --load_checkpoint")
        return (f"{flag} {directory} is neither an HF model directory (no config.json) nor a Megatron checkpoint "
                f"(no {MANIFEST}; written by tools.convert.hf_to_mcore or as <ckpt_path>/global_stepN)")

    # ----- what it is ---------------------------------------------------------------------
    @property
    def is_megatron(self) -> bool:
        return self.kind == MEGATRON

    @property
    def hf_dir(self) -> str:
        """The directory with the HF config and tokenizer files (for a hub id: the id)."""
        return str(Path(self.path) / HF_DIR) if self.is_megatron else self.path

    @property
    def value_head(self) -> bool | None:
        """True: a value-head model (reward model / critic); False: a causal LM; None: unknown."""
        if self.is_megatron:
            return bool(self.meta.get("value_head", False))
        return _hf_value_head(Path(self.path)) if Path(self.path).is_dir() else None

    @property
    def reward_statistics(self) -> tuple[float, float] | None:
        """``(mean, std)`` of the rewards, which the reward-model trainer saves in config.json; None
        when the config has none (a causal LM, an RM trained elsewhere) or is not on disk."""
        try:
            config = json.loads((Path(self.hf_dir) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        mean, std = config.get("mean"), config.get("std")
        if mean is None or std is None:
            return None
        return float(mean), float(std)

    def describe(self) -> str:
        if not self.is_megatron:
            return f"{self.flag} {self.path}"
        step = self.meta.get("step")
        return f"{self.flag} {self.path} (Megatron checkpoint{f' of step {step}' if step is not None else ''})"

    def check_role(self, *, value_head: bool, trainable: bool) -> None:
        """Refuse a value-head model where a causal LM is needed, and a causal LM as a frozen
        value model (a reward model); a trained one (critic, reward model being trained) may
        start from a causal LM with a fresh value head."""
        has_head = self.value_head
        if has_head and not value_head:
            raise ValueError(f"{self.describe()} is a value-head model (reward model / critic), "
                             "not a causal LM: this role needs a policy")
        if has_head is False and value_head and not trainable:
            raise ValueError(f"{self.describe()} is a causal LM without a value head: a reward model "
                             "must have been trained as one (engine.cli.train_rm)")

    def adapter(self):
        from models.registry import load_adapter

        try:
            return load_adapter(self.hf_dir)
        except ValueError as exc:
            raise ValueError(f"{self.describe()}: {exc}") from exc

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.hf_dir)

    # ----- weights ------------------------------------------------------------------------
    def load_weights(self, model, adapter, *, progress: bool = False) -> None:
        """Fill ``model`` (this rank's chunk, any layout) from the source. A value-head model from a
        causal LM starts with a fresh head (said once); a value-head checkpoint without its head is
        an error naming the file and the tensor."""
        from models.heads import is_value_model

        new_head = is_value_model(model) and self.value_head is False
        if new_head and progress:
            print(f"note: {self.describe()} is a causal LM: the value head starts fresh", flush=True)
        if not self.is_megatron:
            from models.weights import load_hf_weights

            load_hf_weights(model, adapter, self.path, progress=progress, new_value_head=new_head)
            return
        self._load_megatron(model)

    def _load_megatron(self, model) -> None:
        from models.heads import is_value_model
        from models.lora import is_lora_name
        from models.mcore_checkpoint import load_sharded

        # Adapters are not part of a base model's checkpoint: they keep their fresh initialisation.
        sharded = {k: v for k, v in model.sharded_state_dict().items() if not is_lora_name(k)}
        fresh_head = is_value_model(model) and not self.value_head
        if fresh_head:
            # The checkpoint's output_layer is an LM head (or absent when tied to the embedding):
            # megatron-core would read its first row into the value head (allow_shape_mismatch).
            sharded = {k: v for k, v in sharded.items() if not k.startswith("output_layer.")}
        # Only the "model" part is requested: nothing of a training checkpoint's optimizer is read.
        state = load_sharded({"model": sharded}, self.path)["model"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not is_lora_name(k)]
        assert not unexpected and all(fresh_head and k.startswith("output_layer.") for k in missing), (missing, unexpected)

    def export_hf(self, save_dir: str | os.PathLike, *, parallel, max_shard_bytes: int = 2 << 30,
                  progress: bool = False) -> None:
        """Collective over a world initialised on ``parallel``: this model as an HF directory
        (``*ForSequenceClassification`` for a value-head model), config and tokenizer included."""
        from models.builder import ModelBuildConfig, build_model
        from models.weights import save_hf_checkpoint

        adapter = self.adapter()
        model = build_model(adapter, parallel, ModelBuildConfig(value_head=bool(self.value_head)))
        self.load_weights(model, adapter)
        save_hf_checkpoint(model, adapter, save_dir, source_dir=self.hf_dir, max_shard_bytes=max_shard_bytes,
                           progress=progress)
