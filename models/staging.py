"""Names of staging directories: unique to the job writing them, so two writers never share one.

``<name>.partial-<host>-<pid>-<start ticks>`` carries the writer's identity
(``parallel.process_identity``): before a save, the writer removes its own leftover staging of
the same directory (a save it started before and did not finish) and any whose writer is
provably dead on this host; a live writer's staging, or one from another host, is left alone.
"""
from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path

from parallel.process_identity import ProcessIdentity

_SUFFIX = re.compile(r"\.partial-(?P<host>.+)-(?P<pid>\d+)-(?P<ticks>\d+|x)$")


def staging_path(directory: Path, identity: ProcessIdentity) -> Path:
    ticks = "x" if identity.start_ticks is None else str(identity.start_ticks)
    return directory.with_name(f"{directory.name}.partial-{identity.host}-{identity.pid}-{ticks}")


def writer_of(staging: Path, directory: Path) -> ProcessIdentity | None:
    """The writer named in a staging directory's name, None when it is not a staging of ``directory``."""
    if not staging.name.startswith(directory.name + ".partial-"):
        return None
    match = _SUFFIX.search(staging.name[len(directory.name):])
    if match is None:
        return None
    ticks = None if match["ticks"] == "x" else int(match["ticks"])
    return ProcessIdentity(host=match["host"], pid=int(match["pid"]), start_ticks=ticks, started="?")


def remove_stale_staging(directory: Path, identity: ProcessIdentity) -> list[Path]:
    """Remove this writer's own and provably dead writers' staging of ``directory``; returns them."""
    removed = []
    if not directory.parent.is_dir():
        return removed
    for candidate in directory.parent.glob(f"{glob.escape(directory.name)}.partial-*"):
        writer = writer_of(candidate, directory)
        if writer is None:
            continue
        own = (writer.host, writer.pid, writer.start_ticks) == (identity.host, identity.pid, identity.start_ticks)
        if own or writer.provably_dead():
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed

