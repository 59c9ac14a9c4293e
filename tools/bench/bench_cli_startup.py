"""CLI start-up: each job's ``--help`` against the interpreter's own start-up and against importing
torch + megatron-core, which is what every ``--help`` paid before the option dataclasses moved to
torch-free modules (5.2-5.7 s then on the 2-core box).

    python -m tools.bench.bench_cli_startup [--repeats 5]

Each figure is the median wall time of ``--repeats`` fresh processes, measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools.bench.common import print_table
from tools.cli_docs import CLIS

REPO = Path(__file__).resolve().parents[2]


def _median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    python = _median_seconds([sys.executable, "-c", "pass"], args.repeats)
    heavy = _median_seconds([sys.executable, "-c", "import torch, megatron.core"], args.repeats)
    rows = []
    for module, _ in CLIS:
        seconds = _median_seconds([sys.executable, "-m", module, "--help"], args.repeats)
        rows.append((module, seconds, seconds / python, heavy / seconds))
    print_table(f"--help, median of {args.repeats} (python -c pass: {python:.3f} s; import torch, megatron.core: "
                f"{heavy:.2f} s)", ["CLI", "seconds", "x interpreter start", "import torch+megatron / this"], rows)


if __name__ == "__main__":
    main()
