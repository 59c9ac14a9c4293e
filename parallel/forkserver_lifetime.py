"""Imported by multiprocessing's forkserver as a preload (``parallel.launch.PRELOAD_MODULES``): the
server then dies with the launcher that started it.

Left alone, the server exits only once the launcher and every rank it forked are gone, and then
through a full interpreter teardown (seconds of CPU with torch loaded); with the launcher killed it
would wait for the ranks. Importing this module anywhere else does nothing.
"""
from __future__ import annotations

from pathlib import Path

from parallel.lifetime import die_with_parent


def _is_forkserver() -> bool:
    try:
        return b"multiprocessing.forkserver import main" in Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return False


if _is_forkserver():
    die_with_parent()
