"""Preemption: SIGTERM / SIGINT ask a job to stop at its next safe point; a second signal, or the
grace period running out, ends the process at once.

Slurm's preemption and time limit send SIGTERM (``sbatch --signal`` brings it ahead of the kill),
Ctrl-C sends SIGINT. The first one only sets a flag (nothing is interrupted half-way: a signal
handler that raised inside a collective or an RPC fan-out would leave peers waiting forever);
the job polls :attr:`PreemptionWatch.requested` between phases, saves and stops. A watchdog thread
bounds the whole stop: ``grace_s`` after the first signal the process exits with ``128 + signal``
whatever it is doing (a checkpoint still being written then stays in its staging directory and
the previous one remains the latest). A second signal exits at once, the same way.

``os._exit`` skips Python's clean-up on purpose; what the job started goes with it by other
means (Ray kills a dead driver's actors; ``parallel.lifetime`` ends ranks whose launcher died).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """The job stopped early for a signal (after its preemption checkpoint, when it writes one)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


class PreemptionWatch:
    """Catch SIGTERM / SIGINT for the ``with`` block (main thread only: Python runs handlers there).

    ``grace_s``: after the first signal the process exits (code ``128 + signal``) at the latest this
    many seconds later; ``what``: the job's stop plan, printed when the first signal arrives."""

    def __init__(self, *, grace_s: float, what: str):
        self.grace_s = grace_s
        self.what = what
        self.signum: int | None = None
        self.signalled_at: float | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def stopped(self, detail: str) -> Preempted:
        """The exception that ends the job after its stop (``detail``: what was saved)."""
        name = signal.Signals(self.signum).name
        waited = time.monotonic() - self.signalled_at
        return Preempted(self.signum, f"stopped by {name} after {waited:.1f} s: {detail}")

    def install(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> PreemptionWatch:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting now, nothing saved", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self.signalled_at = signum, time.monotonic()
        print(f"\n{name}: {self.what}; exiting within {self.grace_s:.0f} s (a second signal exits at once)",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._deadline, args=(signum,), name="preemption-deadline", daemon=True).start()

    def _deadline(self, signum: int) -> None:
        time.sleep(self.grace_s)
        print(f"\nthe stop took longer than {self.grace_s:.0f} s: exiting now", file=sys.stderr, flush=True)
        os._exit(128 + signum)
