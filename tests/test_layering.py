"""The layering contract (.importlinter, run by scripts/lint.sh) holds, and the check itself fails
on a deliberately wrong import: a function-level import of engine.cli from parallel/, the kind of
upward import that hid cycles before."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_packages(root: Path) -> None:
    for package in ("engine", "models", "parallel", "tools"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", root / ".importlinter")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contract_holds_and_catches_an_upward_import(tmp_path):
    _copy_packages(tmp_path)
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr

    config = tmp_path / "parallel" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward():\n    from engine.cli import train_sft  # noqa\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "parallel.config -> engine.cli.train_sft" in broken.stdout, broken.stdout
