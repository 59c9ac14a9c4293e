"""Fixes for megatron-core 0.16.1 code paths that break without Apex / Transformer Engine, and for
its import-time ``torch.compile`` (``defer_jit_compilation``).

Active on every device (not only CPU): a GPU cluster without Apex or TE takes the same paths.
Each fix names the function and the reason; remove one when megatron-core fixes it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import queue
import sys
import warnings

from parallel.lifetime import die_with_parent
from parallel.optional_deps import Probe, block, probe

_applied = False
_te_probe: Probe | None = None


def guard_transformer_engine(probe_fn=probe) -> Probe:
    """megatron-core 0.16.1 imports Transformer Engine under ``except ImportError`` (``HAVE_TE`` in
    ``gpt_layer_specs``, ``utils``, ``tensor_parallel.layers``, ...). A TE that installs but cannot
    load (built for another CUDA or torch) raises OSError / RuntimeError instead, which those guards
    let through: every ``import megatron.core`` would crash. Probe TE once, before megatron is first
    imported (``parallel/__init__.py`` calls this), and block a broken one so that megatron's guards
    see ImportError and the local layer spec runs. The probe (with its reason) is what
    ``models.layer_spec.detect_layer_spec`` and the check scripts report. ``probe_fn``: for tests."""
    global _te_probe
    if _te_probe is None:
        found = probe_fn("transformer_engine")
        if found.installed and not found.importable:
            block("transformer_engine")
            block("transformer_engine_torch")  # TE's compiled module, imported on its own by megatron
            warnings.warn(f"Transformer Engine is installed but does not load ({found.reason}); "
                          "the local layer spec runs instead", stacklevel=2)
        _te_probe = found
    return _te_probe


def lazy_compile(fn=None, **kwargs):
    """``torch.compile`` at a function's first call instead of at its definition (``jit_fuser``'s job)."""
    if fn is None:  # the @jit_fuser(**kwargs) form
        return functools.partial(lazy_compile, **kwargs)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **call_kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **kwargs)
        return compiled(*args, **call_kwargs)

    return call


class _DeferJitFuser(importlib.abc.MetaPathFinder):
    """megatron-core 0.16.1 sets ``megatron.core.jit.jit_fuser = torch.compile`` and decorates ~70
    functions with it while ``import megatron.core`` runs; the first ``torch.compile`` call imports
    dynamo and inductor (about 40% of megatron's import time: ~3.5 s of CPU in every process that
    imports it, Ray actors and torchrun ranks included), though the local layer spec calls none of
    them (the fusions are off in ``models.builder``). Swap in ``lazy_compile`` as that module loads:
    the same ``torch.compile``, made on first use."""

    def find_spec(self, name, path, target=None):
        if name != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)  # one module, once: find it the normal way
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if getattr(module.jit_fuser, "__module__", "").startswith("torch"):
                module.jit_fuser = lazy_compile

        spec.loader.exec_module = exec_module
        return spec


def defer_jit_compilation() -> None:
    """Install ``_DeferJitFuser`` (before megatron-core is first imported; else a no-op)."""
    if "megatron.core.jit" not in sys.modules and not any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferJitFuser())


def _skip_step_in_reshardable_load() -> None:
    """DistributedOptimizer._set_main_param_and_optimizer_states (``fully_reshardable`` load).

    With torch's Adam, ``load_state_dict`` first rebuilds each parameter's state from the param
    groups with ``step`` only; the copy loop then iterates over that state and raises
    KeyError('step') (the reshardable format stores no per-parameter step) and never restores
    ``exp_avg`` / ``exp_avg_sq``. Copy the main param and every saved state tensor instead.
    """
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = module.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        for key, tensor in tensors.items():
            if key == "param":
                main_param.detach().copy_(tensor)
            elif key in state and key != "step":
                state[key].copy_(tensor)
            elif key != "step":
                state[key] = tensor.detach().clone().to(device=main_param.device, dtype=main_param.dtype)

    cls._set_main_param_and_optimizer_states = set_states


def _unshare_adam_steps_after_load() -> None:
    """DistributedOptimizer.load_state_dict (torch Adam path).

    It rebuilds the per-parameter states with one *shared* ``step`` tensor; torch's Adam
    increments each parameter's step in place, so after a resume the shared counter runs ahead
    and bias correction differs from an uninterrupted run. Give every parameter its own copy.
    """
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = module.DistributedOptimizer
    original = cls.load_state_dict

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()

    cls.load_state_dict = load_state_dict


def _define_te_general_gemm_without_te() -> None:
    """megatron.core.transformer.moe.moe_utils (router): it references ``te_general_gemm``
    unconditionally but defines it only when Transformer Engine imports, so every MoE model
    without TE (on CPU, and on a GPU cluster without TE) raises NameError. None is what the
    router's own ``te_general_gemm is not None`` checks expect."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _latent_attention_without_te() -> None:
    """megatron.core.transformer.multi_latent_attention (0.16.1): it sets ``HAVE_TE = True`` when importing
    ``megatron.core.extensions.transformer_engine`` succeeds, which it does without TE (that module puts a
    MagicMock in TE's place), so ``MLASelfAttention.__init__`` calls ``isinstance(linear_proj, TELinear)``
    with a MagicMock and raises TypeError: no DeepSeek model builds without TE. Take its flag from the
    extension module's own, which says whether TE imported."""
    extension = importlib.import_module("megatron.core.extensions.transformer_engine")
    mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    mla.HAVE_TE = mla.HAVE_TE and extension.HAVE_TE


def _write_checkpoints_without_a_manager() -> None:
    """megatron.core.dist_checkpointing.strategies.filesystem_async (0.16.1): ``_get_write_results_queue``.

    At the first save it starts a ``multiprocessing.Manager`` (a spawned server process, ~550 MB)
    only to carry the writer's results back. Nothing ties that server to the rank: after a kill -9
    of the rank (or its launcher) it lives on, re-parented to PID 1, indefinitely. Our saves are
    synchronous (``models.mcore_checkpoint.save_sharded``): the results are put and taken in the
    rank's own process, so an in-process queue carries them and no Manager is started. (Megatron's
    async save, which puts them from another process, is not used here.) The writer processes the
    save forks per bucket are given a parent-death signal so that they also go with the rank."""
    module = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    results: queue.Queue = queue.Queue()
    module._get_write_results_queue = lambda: results
    writer = module.FileSystemWriterAsync
    write = writer.write_preloaded_data

    @functools.wraps(write)  # megatron inspects its signature (use_msc)
    def write_preloaded_data(*args, **kwargs):
        die_with_parent()
        return write(*args, **kwargs)

    writer.write_preloaded_data = staticmethod(write_preloaded_data)


def apply() -> None:
    """Idempotent; called by ``parallel.initialize.initialize_parallel``."""
    global _applied
    if not _applied:
        _skip_step_in_reshardable_load()
        _unshare_adam_steps_after_load()
        _define_te_general_gemm_without_te()
        _latent_attention_without_te()
        _write_checkpoints_without_a_manager()
        _applied = True
