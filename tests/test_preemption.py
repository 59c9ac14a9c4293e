"""parallel.preemption in a real process: the first SIGTERM / SIGINT only asks the job to stop; a
second one, or the grace period running out, ends the process at once with 128 + signal. (The
RL driver's stop with its checkpoint: test_ppo_e2e.py::test_sigterm_checkpoints_stops_everything_and_the_resume_continues.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# A job that notices the request, reports it, then keeps "working" (a slow phase) for a minute.
JOB = """
import sys, time
from parallel.preemption import PreemptionWatch
with PreemptionWatch(grace_s=float(sys.argv[1]), what="stopping") as watch:
    print("ready", flush=True)
    while not watch.requested:
        time.sleep(0.01)
    print("requested", watch.signum, flush=True)
    time.sleep(60)
"""


def _start(grace_s: float) -> subprocess.Popen:
    job = subprocess.Popen([sys.executable, "-c", JOB, str(grace_s)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert job.stdout.readline().strip() == "ready"
    return job


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_asks_second_exits_at_once(signum):
    job = _start(grace_s=60)
    try:
        job.send_signal(signum)
        assert job.stdout.readline().split() == ["requested", str(int(signum))]
        assert job.poll() is None  # the first signal interrupts nothing
        started = time.monotonic()
        job.send_signal(signum)
        assert job.wait(timeout=10) == 128 + signum
        assert time.monotonic() - started < 5
        assert "again: exiting now" in job.stderr.read()
    finally:
        job.kill()
        job.wait()


def test_grace_period_bounds_the_stop():
    job = _start(grace_s=1.0)
    try:
        started = time.monotonic()
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=20) == 128 + signal.SIGTERM
        assert 1.0 <= time.monotonic() - started < 10
        assert "longer than 1 s: exiting now" in job.stderr.read()
    finally:
        job.kill()
        job.wait()
