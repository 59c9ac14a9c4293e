"""Merge a LoRA adapter (PEFT format, what ``--save_path`` writes with ``--lora_rank``) into its base model.

    python -m tools.convert.lora_combiner --model_path BASE_HF --lora_path ADAPTER --output_path OUT \\
        [--is_rm] [--bf16]

Streams the base checkpoint file by file (W + scale B A for every adapted module), so memory is
bounded by one safetensors file, not the model. ``--is_rm``: the adapter trained a reward model
(value head saved as PEFT's ``modules_to_save``); the output is an
``AutoModelForSequenceClassification`` with that head and no LM head. One process, no GPU.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.cli.options import group, parse_job, run_cli
from parallel.options import option
from tools.convert.common import check_output_dir


@dataclass(kw_only=True)
class CombinerPaths:
    """The base model, the adapter and where the merged model goes."""

    model_path: str = option(help="base HF model directory (safetensors) the adapter was trained on")
    lora_path: str = option(help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    output_path: str = option(help="output HF model directory")
    is_rm: bool = option(False, help="a reward model adapter: write AutoModelForSequenceClassification with its value head")
    bf16: bool = option(False, help="write bf16 weights (default: the base checkpoint's dtype)")
    max_shard_size_mb: int = option(2048, help="largest output safetensors file")
    overwrite: bool = option(False, help="replace a non-empty --output_path")


@dataclass(kw_only=True)
class CombinerJob:
    paths: CombinerPaths = group(title="paths")


def parse_args(argv=None) -> CombinerJob:
    return parse_job(CombinerJob, argv, description=__doc__)


def combine(paths: CombinerPaths) -> None:
    import torch
    from transformers import AutoConfig

    from models.durable_io import fsync_directory, fsync_tree
    from models.hf_checkpoint import HFShardWriter, copy_side_files, finalize_hf_directory
    from models.lora.merge import PeftAdapter, merged_checkpoint
    from models.staging import remove_stale_staging, staging_path
    from parallel.process_identity import ProcessIdentity

    adapter = PeftAdapter(paths.lora_path)
    config = AutoConfig.from_pretrained(paths.model_path)
    heads = adapter.saved_modules
    if paths.is_rm and not heads:
        raise ValueError(f"--is_rm: {paths.lora_path} holds no value head (modules_to_save); was it trained by train_rm?")
    if heads and not paths.is_rm:
        raise ValueError(f"--lora_path {paths.lora_path} carries {', '.join(heads)} (a reward model's head): pass --is_rm")
    # Staged under a name of this process's (two combiners on one output never share a staging).
    me = ProcessIdentity.current()
    remove_stale_staging(Path(paths.output_path), me)
    staging = staging_path(Path(paths.output_path), me)
    staging.mkdir(parents=True)
    writer = HFShardWriter(staging, max_shard_bytes=paths.max_shard_size_mb << 20)
    drop = ("lm_head.weight",) if paths.is_rm else ()  # a reward model scores with its head instead
    for name, tensor in [*merged_checkpoint(paths.model_path, adapter, drop=drop), *heads.items()]:
        writer.add(name, tensor.to(torch.bfloat16) if paths.bf16 else tensor)
    writer.flush()
    finalize_hf_directory(staging, writer.weight_map)
    copy_side_files(paths.model_path, staging)
    if paths.is_rm:
        config.architectures = [config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]
        config.num_labels = 1
    for key, value in adapter.config_updates().items():  # a reward model's mean / std
        setattr(config, key, value)
    if paths.bf16:
        config.dtype = "bfloat16"
    config.save_pretrained(staging)
    fsync_tree(staging)
    if Path(paths.output_path).exists():
        shutil.rmtree(paths.output_path)
    os.replace(staging, paths.output_path)
    fsync_directory(Path(paths.output_path).parent)
    print(f"merged {len(adapter.pairs)} adapted modules into {paths.output_path}")


def main(argv=None) -> None:
    job = parse_args(argv)
    check_output_dir(job.paths.output_path, job.paths.overwrite, flag="--output_path")
    combine(job.paths)


if __name__ == "__main__":
    run_cli(main)
