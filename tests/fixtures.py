"""Shared, session-scoped fixtures: tiny HF checkpoints are built once per test session."""
from __future__ import annotations

import pytest

from models.tiny import ARCHITECTURES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny HF checkpoint per supported architecture: {arch: path}."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}
