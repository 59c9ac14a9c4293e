"""The wheels the lent GPU machine needs beyond its preinstalled torch + transformers, and their size.

The machine takes at most 64 MiB of carried files per command and has no network, so
``scripts/fetch_device_wheels.sh`` downloads exactly these (CPython 3.12, manylinux x86_64, no
dependencies) into an ignored folder, and this module reports their total size and refuses a set
over the limit.

What the training path imports beyond torch + transformers (and their own dependencies: numpy,
packaging, safetensors, tokenizers, pyyaml, tqdm, jinja2, ...) is megatron-core and einops (which
megatron-core's ``parallel_state`` imports). ``datasets`` is imported only where a data set is
loaded, never by the engine, the models or the checks (tests/test_training_imports.py proves it
with ``datasets`` blocked); with pyarrow (~40 MB) and pandas it would not fit the limit anyway.

    python -m tools.device_wheels --list          # the pinned requirements, one a line
    python -m tools.device_wheels --report DIR    # sizes; exit 1 over the limit or when one is missing
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEVICE_WHEELS = (
    "megatron-core==0.16.1",  # the version setup.py pins; its cp312 wheel is ~2.6 MB
    "einops==0.8.2",  # the version this project's CI runs
)
LIMIT_BYTES = 64 * 2**20  # what one command on the lent machine may carry
# Top-level modules the carried wheels provide: a check missing one of these is SKIP, not FAIL.
CARRIED_MODULES = ("megatron", "einops")


def _distribution(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_").lower()


def wheel_files(directory: Path) -> dict[str, Path | None]:
    """The wheel of each pinned requirement in ``directory`` (None where it is missing)."""
    found = {}
    for requirement in DEVICE_WHEELS:
        name, version = _distribution(requirement), requirement.split("==")[1]
        matches = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}-"))
        found[requirement] = matches[0] if matches else None
    return found


def size_report(files: dict[str, Path | None], *, limit_bytes: int = LIMIT_BYTES) -> tuple[bool, list[str]]:
    """(within the limit and complete, report lines)."""
    lines, total = [], 0
    for requirement, path in files.items():
        if path is None:
            lines.append(f"  MISSING {requirement}")
            continue
        size = path.stat().st_size
        total += size
        lines.append(f"  {size / 2**20:7.2f} MiB  {path.name}")
    complete = all(path is not None for path in files.values())
    fits = total <= limit_bytes
    lines.append(f"  {total / 2**20:7.2f} MiB in all, limit {limit_bytes / 2**20:.0f} MiB: "
                 + ("fits" if fits else "OVER THE LIMIT") + ("" if complete else "; some wheels are missing"))
    return fits and complete, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="print the pinned requirements")
    group.add_argument("--report", metavar="DIR", help="report the wheels' sizes in DIR")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(DEVICE_WHEELS))
        return 0
    ok, lines = size_report(wheel_files(Path(args.report)))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
