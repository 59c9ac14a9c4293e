"""One job per output path: an exclusive lock on ``--ckpt_path`` / ``--save_path`` for the life of a job.

The lock is ``flock`` on ``<parent>/.<name>.lock``, a file beside the path, not in it (an HF export
replaces its directory wholesale, which would delete a lock file inside it while held). The
kernel releases a ``flock`` when its holder dies, kill -9 included, so a crashed job never leaves
a stale lock behind; on NFS, Linux maps ``flock`` to the server's byte-range locks, which a dead
client's lease releases. The file holds the holder's host, PID and start time, only for the
message a refused job prints. A releasing holder unlinks the file while still holding it, so a
locker checks after ``flock`` that the file it holds is still the one at the path.

Where the file system has no locks at all (``flock`` fails with ENOLCK / EOPNOTSUPP), the file's
exclusive creation is the lock; a file left by a dead job is reclaimed only when its holder is
provably dead on this host (``parallel.process_identity``), else the message says to remove it.
Only one process per job locks: the launcher, or rank 0 under torchrun, or the Ray driver.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from parallel.process_identity import ProcessIdentity

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class PathLockError(RuntimeError):
    """Another job holds the path; the message names the flag, the path and the holder."""


def lock_file_of(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser().resolve()
    return path.parent / f".{path.name}.lock"


def _read_holder(fd: int) -> ProcessIdentity | None:
    try:
        data = os.pread(fd, 4096, 0)
        return ProcessIdentity.from_dict(json.loads(data)) if data.strip() else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _write_holder(fd: int, identity: ProcessIdentity) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(identity.to_dict()).encode(), 0)
    os.fsync(fd)


class PathLock:
    """The exclusive lock of one output path, taken by :meth:`acquire`, dropped by :meth:`release`."""

    def __init__(self, path: str | os.PathLike, *, flag: str):
        self.path = Path(path).expanduser().resolve()
        self.flag = flag
        self.lock_file = lock_file_of(path)
        self._fd: int | None = None

    def _refusal(self, holder: ProcessIdentity | None, extra: str = "") -> PathLockError:
        who = holder.describe() if holder else "a process that wrote no holder information"
        return PathLockError(f"{self.flag} {self.path} is in use by another job ({who}; lock file {self.lock_file}). "
                             f"Two jobs on one path overwrite each other's files: wait for it to end or pick "
                             f"another {self.flag}{extra}")

    def acquire(self) -> None:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        me = ProcessIdentity.current()
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._refusal(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_LOCKS:
                    raise
                self._acquire_by_creation(me)
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder released it (and unlinked the file) between our open and flock
        previous = _read_holder(fd)
        if previous is not None and not previous.on_this_host:
            # flock says nobody holds it; the host named in the file crashed, or locks are local only.
            print(f"note: {self.flag} {self.path}: taking over the lock of {previous.describe()}, which did not "
                  "release it (that host crashed, or this file system's locks do not reach across hosts)",
                  flush=True)
        _write_holder(fd, me)
        self._fd = fd

    def _acquire_by_creation(self, me: ProcessIdentity) -> None:
        """No flock on this file system: exclusive creation is the lock (a dead holder's file reclaimed)."""
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
                holder = _read_holder(fd)
                os.close(fd)
                if holder is None or not holder.provably_dead():
                    raise self._refusal(holder, extra=f" (this file system has no locks: if that job is gone, "
                                                      f"remove {self.lock_file})") from None
                self.lock_file.unlink(missing_ok=True)  # its holder is dead: reclaim
                continue
            _write_holder(fd, me)
            self._fd = fd
            return
        raise self._refusal(None)

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding it: a waiting locker then finds a new file (see the module docstring).
        self.lock_file.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextmanager
def holding_paths(paths: dict[str, str | None]) -> Iterator[list[PathLock]]:
    """Lock every ``{flag: path}`` given (None skipped; one path named twice is locked once) for the
    block; all or none: a refusal releases those already taken."""
    seen: set[Path] = set()
    with ExitStack() as stack:
        locks = []
        for flag, path in paths.items():
            if not path or (resolved := Path(path).expanduser().resolve()) in seen:
                continue
            seen.add(resolved)
            lock = PathLock(path, flag=flag)
            lock.acquire()
            stack.callback(lock.release)
            locks.append(lock)
        yield locks
