"""Processes that die with their parent: no rank trains headless after its launcher died, no
helper a rank started outlives the rank.

``die_with_parent``: on Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the
kernel kill this process when its parent exits, whatever killed the parent (kill -9 included;
nothing in the parent has to run). The setting is per process and not inherited by forked
children, so every process that must go with its parent installs it for itself. Elsewhere a daemon
thread polls ``os.getppid()`` (the parent's death re-parents the process).

``die_with``: the same for a process that is not the parent. Ranks started from multiprocessing's
forkserver are its children, not the launcher's, and the forkserver waits for its children before
it exits: they watch the launcher itself (a pidfd turns readable when it exits).
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 1.0
_installed_for: int | None = None  # the PID that installed the watch (a forked child must install its own)


def die_with_parent() -> None:
    """Kill this process (SIGKILL) as soon as its parent exits. Idempotent per process.

    The kernel fires the signal when the *thread* that started this process exits; launchers start
    ranks from their main thread (torchrun's agent, multiprocessing's forkserver and spawn), so that
    is the parent's exit."""
    global _installed_for
    if _installed_for == os.getpid():
        return
    parent = os.getppid()
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), name="die-with-parent", daemon=True).start()
    _installed_for = os.getpid()
    if os.getppid() != parent:  # the parent died before the watch was in place
        os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with(pid: int) -> None:
    """Kill this process (SIGKILL) as soon as process ``pid`` exits (a daemon thread waits for it)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        threading.Thread(target=_poll_process, args=(pid,), name=f"die-with-{pid}", daemon=True).start()
    else:
        threading.Thread(target=_wait_pidfd, args=(handle,), name=f"die-with-{pid}", daemon=True).start()


def _wait_pidfd(handle: int) -> None:
    select.select([handle], [], [])  # readable once the process has exited
    os.kill(os.getpid(), signal.SIGKILL)


def _poll_process(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(_POLL_S)
