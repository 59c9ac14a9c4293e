"""Who a process is, in a form another process can check later: host, PID and start time.

A PID alone is not an identity: PIDs are reused. The kernel's start time of the process
(``/proc/<pid>/stat`` field 22, in clock ticks since boot) is fixed for its life, so
``(pid, start ticks)`` names one process on one host for as long as the host stays up. Lock
files and staging-directory names carry it so a later job can tell a live holder from a dead one.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    start_ticks: int | None  # None where /proc is absent: liveness is then judged by the PID alone
    started: str  # wall-clock start of the job (what a person reads in an error message)

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, start_ticks=_start_ticks(pid),
                   started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProcessIdentity:
        return cls(host=str(data["host"]), pid=int(data["pid"]), start_ticks=data.get("start_ticks"),
                   started=str(data.get("started", "?")))

    def describe(self) -> str:
        return f"PID {self.pid} on host {self.host}, started {self.started}"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def provably_dead(self) -> bool:
        """True only when this host can prove the process is gone: it ran here and its PID is free
        or now belongs to a process started at another time. A process on another host is never
        provably dead from here."""
        if not self.on_this_host:
            return False
        if os.path.isdir("/proc"):
            ticks = _start_ticks(self.pid)
            return ticks is None or (self.start_ticks is not None and ticks != self.start_ticks)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False
