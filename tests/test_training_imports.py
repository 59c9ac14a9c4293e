"""The training path imports on the lent GPU machine's software: no vLLM, no Ray (and none of the
packages that machine lacks: datasets, Transformer Engine, flash-attn, bitsandbytes, PEFT, wandb,
TensorBoard, ...). Checked in a fresh interpreter where those packages are not importable and every
``import`` of vLLM or Ray is recorded, even one that would be caught. The same interpreter shows
megatron-core's import-time ``torch.compile`` decorations deferred (``parallel.megatron_patches``):
torch's compiler stack is not imported by the training path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# vLLM and Ray must never be imported; the rest are absent on the GPU machine (not an error to try).
FORBIDDEN = ("vllm", "ray")
ABSENT_THERE = ("datasets", "pyarrow", "pandas", "transformer_engine", "flash_attn", "ring_flash_attn",
                "bitsandbytes", "peft", "wandb", "tensorboard", "psutil", "trl")
TRAINING_PATH = (
    "engine.runtime.engine", "engine.runtime.offload", "engine.data.packing", "engine.data.sft",
    "engine.trainers.sft", "engine.trainers.dpo", "engine.trainers.rm", "engine.trainers.kto",
    "engine.trainers.prm", "engine.trainers.kd", "engine.cli.train_sft", "engine.cli.train_dpo",
    "engine.cli.train_rm", "engine.cli.train_kto", "engine.cli.train_prm", "engine.cli.train_kd",
    "models.builder", "models.lora", "models.tiny", "parallel.attention.ring", "tools.convert.hf_to_mcore",
    "tools.device_check", "tools.device_checks",
)
_SCRIPT = """
import builtins, importlib, sys
forbidden, absent, modules = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3].split(",")
for name in forbidden + absent:
    sys.modules[name] = None  # what the import system reports for a package that is not installed
tried, real_import = [], builtins.__import__

def recording_import(name, *args, **kwargs):
    if name.split(".")[0] in forbidden:
        tried.append(name)
    return real_import(name, *args, **kwargs)

builtins.__import__ = recording_import
for module in modules:
    importlib.import_module(module)
import megatron.core.jit
compiler = [name for name in ("torch._dynamo", "torch._inductor") if name in sys.modules]
print("COMPILER", megatron.core.jit.jit_fuser.__module__, ",".join(compiler))
print("TRIED", ",".join(tried))
"""


def test_training_path_imports_without_vllm_ray_or_the_gpu_extras():
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _SCRIPT, ",".join(FORBIDDEN), ",".join(ABSENT_THERE),
         ",".join(TRAINING_PATH)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "TRIED", f"vLLM / Ray imported by: {done.stdout}"
    assert lines[-2] == "COMPILER parallel.megatron_patches ", done.stdout


def _gated(y):
    half = y.shape[-1] // 2
    return torch.nn.functional.silu(y[..., :half]) * y[..., half:]


class _Norm:
    scale = 3.0

    def scaled(self, y):
        return y * self.scale


def test_lazy_compile_is_torch_compile_on_first_call(monkeypatch):
    from parallel.megatron_patches import lazy_compile

    compile_calls, real_compile = [], torch.compile

    def recording_compile(fn, **kwargs):  # the eager backend: dynamo without inductor's C++ build
        compile_calls.append((fn, kwargs))
        return real_compile(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", recording_compile)
    y = torch.randn(3, 8)
    gated = lazy_compile(_gated)
    _Norm.lazy = lazy_compile(dynamic=False)(_Norm.scaled)  # the @jit_fuser(**kwargs) form, as a method
    assert compile_calls == [] and gated.__name__ == "_gated"
    assert torch.allclose(gated(y), _gated(y)) and torch.equal(_Norm().lazy(y), y * 3.0)
    gated(y)
    assert compile_calls == [(_gated, {}), (_Norm.scaled, {"dynamic": False})]
