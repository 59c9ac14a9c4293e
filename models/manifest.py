"""A checkpoint's manifest: every file with its size and CRC-32, written last, verified on load.

A directory without a manifest, or whose files disagree with it (missing, another size: a crash
or a truncated copy; another checksum: a corrupt disk, a bad copy, a flipped byte), is not a
checkpoint, and the error names the file. Manifests written before checksums existed hold sizes
only and are verified by size.

With a process group, writing and verifying are collective: each rank fsyncs and checksums a
share of the files and the verdict is agreed by every rank (so all ranks skip the same
checkpoints). Without one, the calling process does all of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from models.durable_io import CHECKSUM_ALGORITHM, file_checksum, fsync_file
from models.hf_checkpoint import CheckpointError

MANIFEST = "manifest.json"


def _files(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]


def _share(items: list[str], group) -> list[str]:
    if group is None:
        return items
    return items[dist.get_rank(group):: dist.get_world_size(group)]


def _gather(value, group) -> list:
    if group is None:
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def write_manifest(directory: str | os.PathLike, *, checksums: bool = True, group=None,
                   known: dict[str, str] | None = None) -> None:
    """Record every file of ``directory`` (size, and with ``checksums`` its CRC-32 after an fsync
    of it); the group's first rank writes and fsyncs ``manifest.json``. ``known``: checksums this
    rank already took of files it wrote and fsynced (a background writer's); every rank passes it
    or none does."""
    directory = Path(directory)
    files = _files(directory)
    mine = {}
    if known is not None:
        mine = {name: value for part in _gather(known, group) for name, value in part.items()}
    if checksums:
        for name in _share([f for f in files if f not in mine], group):
            fsync_file(directory / name)
            mine[name] = file_checksum(directory / name)
    if group is not None and dist.get_rank(group) != 0:
        _gather(mine, group)
        return
    sums = {name: value for part in _gather(mine, group) for name, value in part.items()}
    manifest = {"files": {name: (directory / name).stat().st_size for name in files}}
    if checksums:
        manifest.update(checksum_algorithm=CHECKSUM_ALGORITHM, checksums={name: sums[name] for name in files})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_file(directory / MANIFEST)


def verify_checkpoint_files(directory: str | os.PathLike, *, checksums: bool = True, group=None) -> None:
    """Raise CheckpointError naming the first file that is missing, of another size or (with
    ``checksums``) of another CRC-32 than the manifest says."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable: {exc}") from exc
    for name, size in files.items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {directory}: {name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
            )
    expected = manifest.get("checksums") if checksums else None
    if not expected:
        return
    error = None
    for name in _share(sorted(expected), group):
        got = file_checksum(directory / name)
        if got != expected[name]:
            error = (f"checkpoint {directory}: {name} does not match its checksum ({CHECKSUM_ALGORITHM} {got}, "
                     f"manifest {expected[name]}): corrupt")
            break
    errors = [e for e in _gather(error, group) if e]
    if errors:
        raise CheckpointError(errors[0])
