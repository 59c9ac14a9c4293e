"""Run megatron-core's own code paths on a CPU-only PyTorch build.

megatron-core 0.16.1 assumes CUDA at many call sites: tensors created with
``device="cuda"`` or ``device=torch.cuda.current_device()`` (p2p communication, pipeline
schedules, tensor-parallel mappings, grad clipping, the optimizer), ``torch.cuda.synchronize``,
CUDA streams (DDP, MoE), the CUDA RNG tracker, ``tensor.cuda()`` and tensor type names such as
``'torch.cuda.FloatTensor'`` checked by the optimizer.

Rather than a global ``TorchFunctionMode`` (which would tax every op of every library in the
process, vLLM included), megatron's modules get their own view of ``torch``: a module object that
shares everything with ``torch`` except the tensor factories (which map a CUDA device to the CPU)
and ``torch.cuda`` (a namespace of CPU equivalents). The rest of the process sees the real torch.
Two tensor methods (``type`` and ``cuda``) are answered CUDA-style only when the caller is a
megatron module. gloo, unlike NCCL, gathers and reduce-scatters equal-size parts only: the uneven
first-dimension collectives of the MoE dispatcher are padded. Everything here is a no-op when CUDA
is available.

Version-specific: written against megatron-core 0.16.1 (the newest release for Python 3.11).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types

import torch

_MEGATRON_PREFIX = "megatron.core"
# Imported before the sweep so that the modules our engine drives get the CPU view of torch.
_MODULES_TO_ADAPT = (
    "megatron.core.parallel_state",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.transformer.multi_latent_attention",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.experts",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.utils",
)
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "linspace", "empty_strided", "eye",
)

_active = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _to_cpu_device(device):
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def create(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA driver (rotary CP slicing asks for it)
        return factory(*args, **kwargs)

    return create


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def record_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_cuda_namespace() -> types.SimpleNamespace:
    """CPU equivalents of the torch.cuda functions megatron-core calls."""
    real = torch.cuda

    def get_rng_state(device=None):
        return torch.get_rng_state()

    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    ns = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    ns.is_available = lambda: False
    ns.current_device = lambda: torch.device("cpu")
    ns.device_count = lambda: 0
    ns.set_device = lambda *a, **k: None
    ns.synchronize = lambda *a, **k: None
    ns.empty_cache = lambda: None
    ns.memory_allocated = lambda *a, **k: 0
    ns.max_memory_allocated = lambda *a, **k: 0
    ns.Stream = _NullStream
    ns.Event = _NullStream
    ns.current_stream = lambda *a, **k: _NullStream()
    ns.default_stream = lambda *a, **k: _NullStream()
    ns.stream = lambda *a, **k: contextlib.nullcontext()
    ns.get_rng_state = get_rng_state
    ns.set_rng_state = set_rng_state
    ns.manual_seed = torch.manual_seed
    ns.manual_seed_all = torch.manual_seed
    ns.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)
    return ns


def _cpu_torch_view() -> types.ModuleType:
    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    for name in _FACTORIES:
        setattr(view, name, _cpu_factory(getattr(torch, name)))
    view.cuda = _cpu_cuda_namespace()
    return view


def _called_from_megatron(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith(_MEGATRON_PREFIX)


def _patch_tensor_methods() -> None:
    """``param.type() == 'torch.cuda.FloatTensor'`` checks and ``.cuda()`` calls in megatron."""
    original_type = torch.Tensor.type
    original_cuda = torch.Tensor.cuda

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and _called_from_megatron():
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return original_type(self, dtype, non_blocking, **kwargs) if dtype is not None else original_type(self)

    def cuda(self, *args, **kwargs):
        if _called_from_megatron():
            return self
        return original_cuda(self, *args, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.cuda = cuda


class _DropForkWarning(logging.Filter):
    # On CPU the fork *is* the CPU generator, so its "CPU RNG state changed" check always fires.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed" not in record.getMessage()


def _patch_rng_tracker() -> None:
    """The CUDA RNG tracker forks the CPU generator instead (dropout runs on the CPU)."""
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    rng._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    rng._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    logging.getLogger(rng.__name__).addFilter(_DropForkWarning())


def _patch_moe() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    # The alltoall dispatcher converts its split sizes to numpy only when they sit on a GPU;
    # all_to_all_single rejects tensors as split sizes, so convert CPU tensors too.
    original = moe_utils.maybe_move_tensor_to_cpu

    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


def _patch_uneven_first_dim_collectives() -> None:
    """gloo's list all_gather / reduce_scatter refuse parts of unequal size; megatron-core's alltoall
    dispatcher gathers and reduce-scatters uneven token counts over the TP group when the experts
    are tensor-parallel (EP > 1 with expert TP > 1). Pad every part to the longest, run the
    equal-size collective, cut the padding off."""
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest, world = max(output_split_sizes), group.size()
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * world, *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(gathered.chunk(world), output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        longest, world = max(input_split_sizes), group.size()
        padded = input_.new_zeros((longest * world, *input_.shape[1:]))
        for index, part in enumerate(torch.split(input_, input_split_sizes)):
            padded[index * longest: index * longest + part.shape[0]] = part
        reduced = input_.new_empty((longest, *input_.shape[1:]))
        torch.distributed.reduce_scatter_tensor(reduced, padded, group=group)
        return reduced[: input_split_sizes[group.rank()]]

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def adapt_loaded_modules(view: types.ModuleType | None = None) -> None:
    """Give every loaded megatron.core module the CPU view of torch."""
    view = view or _TORCH_VIEW
    for name, module in list(sys.modules.items()):
        if name.startswith(_MEGATRON_PREFIX) and getattr(module, "torch", None) is torch:
            module.torch = view


_TORCH_VIEW: types.ModuleType | None = None


def activate() -> bool:
    """Adapt megatron-core to a CPU build. Idempotent; returns True if the CPU path is active.

    Call again after importing further megatron modules: the sweep is cheap.
    """
    global _active, _TORCH_VIEW
    if cuda_available():
        return False
    for name in _MODULES_TO_ADAPT:
        importlib.import_module(name)
    if not _active:
        _TORCH_VIEW = _cpu_torch_view()
        _patch_tensor_methods()
        _patch_rng_tracker()
        _patch_moe()
        _patch_uneven_first_dim_collectives()
        _active = True
    adapt_loaded_modules()
    return True
