"""An HF directory for the inference jobs (vLLM generation, HF reward scoring), whose --pretrain
/ --reward_pretrain may also be a Megatron checkpoint.

    with hf_model_dir(path, flag="--reward_pretrain", value_head=True) as hf_path:
        scorer = RewardScorer(hf_path)

Those runtimes read HF weights and no trainer feeds them, so a Megatron checkpoint is exported
(one local process, ``models.sources.ModelSource.export_hf``) into a temporary directory that is
removed after the block. For a large model, convert once with ``tools.convert.mcore_to_hf``
under a parallel layout and pass the HF directory instead.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from models.sources import ModelSource


def _export_rank(path: str, flag: str, save_dir: str) -> None:
    import torch.distributed as dist

    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    try:
        ModelSource.open(path, flag=flag).export_hf(save_dir, parallel=parallel)
    finally:
        dist.destroy_process_group()


@contextmanager
def hf_model_dir(path: str, *, flag: str, value_head: bool) -> Iterator[str]:
    """``path`` when it is an HF model; an HF export of it (temporary) when it is a Megatron
    checkpoint. ``value_head``: whether the job needs a reward model (True) or a policy."""
    from parallel.launch import spawn_local_ranks

    source = ModelSource.open(path, flag=flag)
    source.check_role(value_head=value_head, trainable=False)
    if not source.is_megatron:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mcore-export-") as tmp:
        save_dir = str(Path(tmp) / "hf")
        print(f"{source.describe()}: exporting it to HF in {save_dir} for this run", flush=True)
        # A process of its own: the export needs a torch.distributed world, this process stays free of one.
        spawn_local_ranks(_export_rank, 1, path, flag, save_dir)
        yield save_dir
