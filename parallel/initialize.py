"""One entry point that brings up torch.distributed and Megatron's parallel state."""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from parallel import cpu_backend, megatron_patches
from parallel.config import ParallelConfig
from parallel.ports import free_port


@dataclass
class ParallelContext:
    """Where this rank sits in the TP x CP x EP x DP x PP grid, with its process groups."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    data_parallel_size: int

    @property
    def tp_group(self):
        return _ps().get_tensor_model_parallel_group()

    @property
    def cp_group(self):
        return _ps().get_context_parallel_group()

    @property
    def dp_group(self):
        return _ps().get_data_parallel_group()

    @property
    def tp_rank(self) -> int:
        return _ps().get_tensor_model_parallel_rank()

    @property
    def cp_rank(self) -> int:
        return _ps().get_context_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return _ps().get_data_parallel_rank()

    @property
    def is_last_stage(self) -> bool:
        return _ps().is_pipeline_last_stage()


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def default_backend(cuda: bool | None = None) -> str:
    """gloo on CPU; on GPU NCCL for CUDA tensors *and* gloo for CPU ones (metric reductions, token
    counts and Megatron's own CPU-side collectives): a bare "nccl" maps only the CUDA device and
    the first CPU tensor in a collective fails with "No backend type associated with device type
    cpu". veRL initialises its Megatron workers the same way."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's RNG tracker (TP-aware for dropout)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # The tracker seeds the CUDA (here: CPU) generator with the DP seed; restore the base seed so
    # that every rank starts from the same CPU state whatever the backend.
    torch.manual_seed(seed)


def local_device_index(env, *, rank: int, device_count: int) -> int:
    """This process's GPU on its node: torchrun's LOCAL_RANK (the global RANK counts every node's
    ranks); without one (a launcher that sets only RANK) the rank modulo the node's devices."""
    if "LOCAL_RANK" in env:
        index = int(env["LOCAL_RANK"])
        if index >= device_count:
            raise ValueError(f"LOCAL_RANK={index} but this node has {device_count} visible GPU(s): start at most "
                             f"{device_count} ranks per node (--nproc_per_node) or check CUDA_VISIBLE_DEVICES")
        return index
    return rank % device_count


def create_model_parallel_groups(config: ParallelConfig, *, gloo_groups: bool, timeout_minutes: int = 30) -> None:
    """Megatron's TP / PP / CP / EP / DP groups of ``config`` over the initialised default group."""
    _ps().initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        context_parallel_size=config.context_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=gloo_groups,
    )


def initialize_parallel(
    config: ParallelConfig,
    *,
    seed: int = 42,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelContext:
    """Initialise torch.distributed (torchrun env vars) and Megatron's parallel state.

    gloo on CPU, NCCL on GPU. Raises ValueError naming the flag when sizes do not fit.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # A plain ``python`` launch is a world of one.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(
            backend=backend or default_backend(),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    data_parallel_size = config.data_parallel_size(world_size)

    if torch.cuda.is_available():
        local_rank = local_device_index(os.environ, rank=dist.get_rank(), device_count=torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        cpu_backend.activate()
        device = torch.device("cpu")

    megatron_patches.apply()
    ps = _ps()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # On CPU the default group already is gloo: no duplicate gloo groups needed.
    create_model_parallel_groups(config, gloo_groups=torch.cuda.is_available(), timeout_minutes=timeout_minutes)
    seed_everything(seed)
    return ParallelContext(
        config=config,
        rank=dist.get_rank(),
        world_size=world_size,
        device=device,
        data_parallel_size=data_parallel_size,
    )


