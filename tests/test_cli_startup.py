"""Printing a job's --help (building its parser) imports no torch, megatron-core, vLLM, Ray or
transformers: the option dataclasses live in modules of their own (``*/config.py``), and each CLI
imports what it runs only after parsing. (The --help of train_ppo_ray took 5.8 s before.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "vllm", "ray", "transformers")

CHECK = """
import contextlib, importlib, io, sys
from tools.cli_docs import CLIS
for module, _ in CLIS:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        importlib.import_module(module).main(["--help"])
print(sorted({name.split(".")[0] for name in sys.modules} & set(%r)))
"""


def test_help_of_every_cli_imports_nothing_heavy():
    done = subprocess.run([sys.executable, "-c", CHECK % (HEAVY,)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
