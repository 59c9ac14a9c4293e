"""No orphans, no headless ranks: after kill -9 of one rank, or of the launcher itself, no process
of the job (ranks, the processes they started, the launcher) is alive 10 s later. Checked by PID:
the job's whole process tree is recorded from /proc before the kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
GRACE_S = 10.0


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent PID, state, start time) of ``pid``, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every process below ``root``: {pid: start time} (the start time tells a reused PID apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return found


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[1] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    directory = tmp_path_factory.mktemp("lifetime_data")
    write_jsonl(make_rows(64, max_operand=9, seed=0), directory / "train.jsonl")
    return f"json@{directory}"


def _start_job(launcher: str, model: str, data: str, out: Path) -> subprocess.Popen:
    """A 2-rank SFT job (under torchrun, or ranks the CLI starts itself) that checkpoints every step
    and would run for minutes."""
    args = ["--pretrain", model, "--dataset", data, "--input_key", "prompt", "--output_key", "answer",
            "--max_len", "32", "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_epochs", "100",
            "--max_steps", "400", "--ckpt_path", str(out / "ckpt"), "--save_steps", "1", "--max_ckpt_num", "1"]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0", "--nproc_per_node", "2",
                   "-m", "engine.cli.train_sft", *args]
    else:
        command = [sys.executable, "-m", "engine.cli.train_sft", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    log = open(out / "job.log", "wb")  # noqa: SIM115 (a file, not a pipe: a full pipe would stall the job)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_first_checkpoint(job: subprocess.Popen, ckpt: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (ckpt / "global_step1").is_dir():
        if job.poll() is not None:
            pytest.fail(f"the job ended early (rc={job.returncode}):\n{(ckpt.parent / 'job.log').read_text()[-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.2)


def _ranks(job: subprocess.Popen, launcher: str) -> list[int]:
    """torchrun's children, or the children of the CLI's forkserver (which forks the local ranks)."""
    tree = _descendants(job.pid)
    parent = job.pid
    if launcher == "local":
        parent = next(pid for pid in tree if _stat(pid)[0] == job.pid and "forkserver" in _cmdline(pid))
    ranks = [pid for pid in tree if (_stat(pid) or (0,))[0] == parent]
    assert len(ranks) == 2, {pid: _cmdline(pid) for pid in _descendants(job.pid)}
    return ranks


def _survivors_after_grace(tree: dict[int, int]) -> dict[int, str]:
    """The processes of ``tree`` still alive after the grace period; ``tree`` gains what they started."""
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(pid, start) for pid, start in tree.items()):
        time.sleep(0.2)
    # What the survivors started since the snapshot counts too.
    for pid in [pid for pid, start in tree.items() if _alive(pid, start)]:
        tree.update(_descendants(pid))
    return {pid: f"{_stat(pid)} {_cmdline(pid)}" for pid, start in tree.items() if _alive(pid, start)}


def _kill_leftovers(tree: dict[int, int]) -> None:
    """Whatever the test leaves behind goes, by PID (a failing run must not leak processes)."""
    for pid, start in tree.items():
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("victim", ["one_rank", "launcher"])
@pytest.mark.parametrize("launcher", ["torchrun", "local"])
def test_kill_9_leaves_no_process_of_the_job(launcher, victim, tiny_models, arithmetic_data, tmp_path):
    """kill -9 of one rank (after the first checkpoint, so every helper a save starts exists) or of
    the launcher (torchrun, or the CLI that started its ranks): within 10 s no rank, no helper of a
    rank and no launcher is left."""
    job = _start_job(launcher, tiny_models["llama"], arithmetic_data, tmp_path)
    tree: dict[int, int] = {}
    try:
        _wait_for_first_checkpoint(job, tmp_path / "ckpt")
        ranks = _ranks(job, launcher)
        tree = {job.pid: _stat(job.pid)[2], **_descendants(job.pid)}
        os.kill(ranks[0] if victim == "one_rank" else job.pid, signal.SIGKILL)
        survivors = _survivors_after_grace(tree)
        job.wait(timeout=60)  # torchrun is the test's child: reap it
        assert not survivors, f"alive {GRACE_S:.0f} s after kill -9 of the {victim}: {survivors}"
    finally:
        _kill_leftovers(tree)
        if job.poll() is None:
            job.kill()
            job.wait()
