"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import reused_engines

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.schedule", "tests.rl_harness"]  # the modules' order on the xdist workers; rl_setup


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session of this (xdist) worker (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    # Actors import test and project modules by reference: put the repository on their path.
    # address="local": an instance of its own, beside the other worker's and a test's `ray start` one.
    from engine.ray.cluster import init_ray

    init_ray(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    reused_engines.CACHE.close()  # while the cluster is up: the engines stop their own processes
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def reuse_vllm_engines():
    """The session's RL runs share their vLLM engines (tests/reused_engines.py; TESTS_FRESH_ENGINES=1: off)."""
    with reused_engines.installed() as cache:
        yield cache


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny HF checkpoint per supported architecture: {arch: path}, built once per session."""
    from models.tiny import ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(scope="session")
def qwen_models(tmp_path_factory) -> dict[str, str]:
    """Tiny Qwen3, Qwen3-MoE (renormalised top-k, one dense layer) and Qwen2-MoE (dense layers between
    MoE layers, gated shared expert), plus a Qwen3-MoE with ``norm_topk_prob`` off: {name: path}."""
    from models.tiny import QWEN_ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("qwen_models")
    models = {arch: build_tiny_model(arch, root / arch, seed=10 + i) for i, arch in enumerate(QWEN_ARCHITECTURES)}
    models["qwen3_moe_unnormed"] = build_tiny_model("qwen3_moe", root / "qwen3_moe_unnormed", seed=20,
                                                    norm_topk_prob=False)
    return models
