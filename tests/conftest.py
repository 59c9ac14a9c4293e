"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    # Actors import test and project modules by reference: put the repository on their path.
    # address="local": a new instance even while a test's own `ray start` cluster runs beside it.
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny HF checkpoint per supported architecture: {arch: path}, built once per session."""
    from models.tiny import ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


# The tests on the session Ray cluster, and the module that stops and restarts it, run on one xdist
# worker in collection order. The clusters other tests start (`ray start` under Slurm, `ray job
# submit`) live under temp dirs of their own, which a bare ray.init() does not look in.
RAY_MODULES = {"test_placement"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``-n N --dist loadgroup`` (scripts/test.sh): the session-cluster tests form one group,
    every other module its own (its module fixtures are built once); the largest start first."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        uses_ray = "ray_cluster" in getattr(item, "fixturenames", ()) or module in RAY_MODULES
        item.add_marker(pytest.mark.xdist_group("ray" if uses_ray else module))
