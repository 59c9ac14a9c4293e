"""Before any GPU check: can this torch use this machine's GPUs, and if not, why.

A CUDA 13 build of torch (the pinned ``torch==2.13.0`` and ``vllm==0.32.0`` wheels, and the lent GPU
machine's torch 2.11+cu130) needs an NVIDIA driver of the r580 branch or newer. On an older driver
torch sees no device at all, which the scripts used to report as "no CUDA device visible": the
cause is the driver. The decision is one pure function (:func:`diagnose`), unit-tested with the
facts faked; :func:`facts_here` gathers them (``nvidia-smi`` for the driver version).

    python -m tools.cuda_preflight      # prints the verdict; exit 0 when CUDA is usable
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass

# The oldest driver branch each CUDA major version runs on (NVIDIA's CUDA toolkit release notes,
# "minor version compatibility"): CUDA 12.x needs r525+, CUDA 13.x needs r580+.
MIN_DRIVER_FOR_CUDA = {11: 450, 12: 525, 13: 580}


@dataclass(frozen=True)
class CudaFacts:
    torch_cuda: str | None  # torch.version.cuda: None for a CPU build
    cuda_available: bool
    device_count: int
    driver_version: str | None  # from nvidia-smi; None when there is no nvidia-smi / driver


@dataclass(frozen=True)
class Verdict:
    usable: bool
    message: str


def _major(version: str) -> int:
    return int(version.split(".")[0])


def diagnose(facts: CudaFacts) -> Verdict:
    """Whether CUDA is usable, and the cause when it is not (the build, the driver, or no GPU)."""
    if facts.torch_cuda is None:
        return Verdict(False, "torch is a CPU build (torch.version.cuda is None): install a CUDA build of torch")
    needed = MIN_DRIVER_FOR_CUDA.get(_major(facts.torch_cuda))
    driver = facts.driver_version
    if facts.cuda_available and facts.device_count > 0:
        return Verdict(True, f"CUDA {facts.torch_cuda} build, driver {driver or 'unknown'}, "
                             f"{facts.device_count} GPU(s)")
    if driver is None:
        return Verdict(False, f"no NVIDIA driver found (no nvidia-smi) for this CUDA {facts.torch_cuda} build of "
                              "torch: this machine has no usable GPU")
    if needed is not None and _major(driver) < needed:
        return Verdict(False, (
            f"NVIDIA driver {driver} is older than r{needed}, which this CUDA {facts.torch_cuda} build of torch "
            f"needs (torch sees no device). Upgrade the driver to r{needed}+, or on a datacenter GPU install "
            f"CUDA forward compatibility (the cuda-compat-{_major(facts.torch_cuda)}-* package, its libcuda "
            "first on LD_LIBRARY_PATH), or use a torch built for the CUDA this driver supports"))
    return Verdict(False, f"driver {driver} should run CUDA {facts.torch_cuda}, yet torch sees no GPU: check "
                          "CUDA_VISIBLE_DEVICES and that the devices are visible in this container (nvidia-smi)")


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return lines[0] if done.returncode == 0 and lines else None


def facts_here() -> CudaFacts:
    import torch

    available = torch.cuda.is_available()
    return CudaFacts(torch_cuda=torch.version.cuda, cuda_available=available,
                     device_count=torch.cuda.device_count() if available else 0, driver_version=_driver_version())


def main() -> int:
    verdict = diagnose(facts_here())
    print(("OK   " if verdict.usable else "FAIL ") + "cuda preflight: " + verdict.message, flush=True)
    return 0 if verdict.usable else 1


if __name__ == "__main__":
    sys.exit(main())
