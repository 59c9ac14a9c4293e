"""No silent loss around checkpoint files: one job per output path (a lock naming its holder,
reclaimed from dead holders), staging directories unique to the job, manifests with a CRC-32 per
file that a resume checks, and an RL run's metrics.jsonl without duplicated rollouts after a resume.

The unit tests here use real processes where a process is what is tested (a lock holder killed
by SIGKILL); the whole-job tests (two SFT jobs on one path, a flipped byte) are in
tests/test_checkpoint_jobs.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.runtime.path_lock import PathLock, PathLockError, holding_paths, lock_file_of
from models.durable_io import file_checksum
from models.hf_checkpoint import CheckpointError
from models.manifest import MANIFEST, verify_checkpoint_files, write_manifest
from models.staging import remove_stale_staging, staging_path
from parallel.process_identity import ProcessIdentity
from tests.conftest import REPO

HOLDER = """
import sys, time
from engine.runtime.path_lock import PathLock
lock = PathLock(sys.argv[1], flag="--ckpt_path")
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _start_holder(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# ----- one job per path -----------------------------------------------------------------------
def test_second_locker_is_refused_naming_path_and_holder(tmp_path):
    path = tmp_path / "ckpt"
    holder = _start_holder(path)
    try:
        with pytest.raises(PathLockError) as refused:
            PathLock(path, flag="--ckpt_path").acquire()
        message = str(refused.value)
        assert f"--ckpt_path {path.resolve()} is in use by another job" in message, message
        assert f"PID {holder.pid} on host {socket.gethostname()}, started " in message, message
        # The lock file sits beside the path, not in it (an export replaces its directory).
        assert lock_file_of(path) == tmp_path / ".ckpt.lock" and not path.exists()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_reclaimed(tmp_path):
    path = tmp_path / "out"
    holder = _start_holder(path)
    holder.send_signal(signal.SIGKILL)  # no chance to release: the kernel drops its flock
    holder.wait()
    stale = json.loads(lock_file_of(path).read_text())
    assert stale["pid"] == holder.pid  # the dead holder's file is still there
    lock = PathLock(path, flag="--save_path")
    lock.acquire()
    assert json.loads(lock_file_of(path).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file_of(path).exists()
    PathLock(path, flag="--save_path").acquire()  # and again after a clean release


def test_without_flock_a_dead_holders_file_is_reclaimed_and_a_live_ones_is_not(tmp_path):
    """File systems without locks: exclusive creation is the lock; reclaimed only when provably dead."""
    path = tmp_path / "ckpt"
    me = ProcessIdentity.current()
    dead = ProcessIdentity(host=me.host, pid=_dead_pid(), start_ticks=1, started="yesterday")
    lock_file_of(path).write_text(json.dumps(dead.to_dict()))
    lock = PathLock(path, flag="--ckpt_path")
    lock._acquire_by_creation(me)
    assert json.loads(lock_file_of(path).read_text())["pid"] == os.getpid()
    lock.release()

    parent = ProcessIdentity(host=me.host, pid=os.getppid(), start_ticks=None, started="earlier")
    lock_file_of(path).write_text(json.dumps(parent.to_dict()))
    with pytest.raises(PathLockError, match=rf"PID {os.getppid()} on host .*remove .*\.ckpt\.lock"):
        PathLock(path, flag="--ckpt_path")._acquire_by_creation(me)
    elsewhere = ProcessIdentity(host="another-host", pid=_dead_pid(), start_ticks=1, started="x")
    lock_file_of(path).write_text(json.dumps(elsewhere.to_dict()))
    with pytest.raises(PathLockError, match="on host another-host"):  # not provably dead from here
        PathLock(path, flag="--ckpt_path")._acquire_by_creation(me)


def test_holding_paths_locks_each_path_once_and_all_or_none(tmp_path):
    with holding_paths({"--ckpt_path": str(tmp_path / "a"), "--save_path": str(tmp_path / "a"),
                        "--other": None}) as locks:
        assert [lock.flag for lock in locks] == ["--ckpt_path"]
    holder = _start_holder(tmp_path / "b")
    try:
        with pytest.raises(PathLockError, match="--save_path"):
            with holding_paths({"--ckpt_path": str(tmp_path / "a"), "--save_path": str(tmp_path / "b")}):
                pass
        assert not lock_file_of(tmp_path / "a").exists()  # the first lock was released again
    finally:
        holder.kill()
        holder.wait()


# ----- staging names ------------------------------------------------------------------------
def test_staging_is_unique_to_the_writer_and_only_dead_or_own_staging_is_removed(tmp_path):
    target = tmp_path / "global_step3"
    me = ProcessIdentity.current()
    live_other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other = ProcessIdentity(host=me.host, pid=live_other.pid,
                                start_ticks=_ticks_of(live_other.pid), started="x")
        dead = ProcessIdentity(host=me.host, pid=_dead_pid(), start_ticks=5, started="x")
        remote = ProcessIdentity(host="another-host", pid=_dead_pid(), start_ticks=5, started="x")
        dirs = {name: staging_path(target, identity) for name, identity in
                (("mine", me), ("live", other), ("dead", dead), ("remote", remote))}
        assert len(set(dirs.values())) == 4 and all(d.name.startswith("global_step3.partial-") for d in dirs.values())
        for d in dirs.values():
            d.mkdir()
        (tmp_path / "global_step30.partial-h-1-1").mkdir()  # another directory's staging: not ours to judge
        removed = remove_stale_staging(target, me)
        assert sorted(removed) == sorted([dirs["mine"], dirs["dead"]])
        assert dirs["live"].exists() and dirs["remote"].exists() and (tmp_path / "global_step30.partial-h-1-1").exists()
    finally:
        live_other.kill()
        live_other.wait()


def _ticks_of(pid: int) -> int:
    from parallel.process_identity import _start_ticks

    return _start_ticks(pid)


# ----- manifests with checksums ---------------------------------------------------------------
def _checkpoint_like(directory: Path) -> Path:
    (directory / "sub").mkdir(parents=True)
    (directory / "__0_0.distcp").write_bytes(os.urandom(100_000))
    (directory / "sub" / "meta.json").write_text("{}")
    write_manifest(directory)
    return directory


def test_manifest_checksums_catch_a_flipped_byte_of_the_same_size(tmp_path):
    directory = _checkpoint_like(tmp_path / "ckpt")
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["checksum_algorithm"] == "crc32"
    assert manifest["checksums"]["__0_0.distcp"] == file_checksum(directory / "__0_0.distcp")
    verify_checkpoint_files(directory)
    data = bytearray((directory / "__0_0.distcp").read_bytes())
    data[54_321] ^= 0x01
    (directory / "__0_0.distcp").write_bytes(bytes(data))
    verify_checkpoint_files(directory, checksums=False)  # the size still matches
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match its checksum"):
        verify_checkpoint_files(directory)


def test_manifest_of_sizes_only_still_verifies(tmp_path):
    """Checkpoints written before checksums existed keep loading (by size)."""
    directory = _checkpoint_like(tmp_path / "old")
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps({"files": manifest["files"]}))
    verify_checkpoint_files(directory)
    (directory / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint_files(directory)


# ----- the RL run record ------------------------------------------------------------------
def test_resumed_rl_record_has_each_rollout_once(tmp_path):
    from engine.rl.console import RunRecord

    record = RunRecord(tmp_path / "run")
    for step in (1, 2, 3):
        record.add({"step": step, "reward": float(step)})
    with record.metrics_path.open("a") as f:
        f.write('{"step": 4, "rew')  # a kill mid-write
    # Resumed from the checkpoint of rollout 2: rollouts 3 and 4 run again and are logged again.
    assert record.resume_at(2) == 2
    for step in (3, 4):
        record.add({"step": step, "reward": float(step) + 0.5})
    lines = [json.loads(line) for line in record.metrics_path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert [line["reward"] for line in lines] == [1.0, 2.0, 3.5, 4.5]


def test_resume_at_leaves_a_complete_record_alone(tmp_path):
    from engine.rl.console import RunRecord

    record = RunRecord(tmp_path / "run")
    record.add({"step": 1, "reward": 0.0})
    before = record.metrics_path.stat().st_mtime_ns
    time.sleep(0.01)
    assert record.resume_at(1) == 0 and record.metrics_path.stat().st_mtime_ns == before


# ----- the RL driver locks its paths before anything starts ------------------------------------
def test_rl_driver_is_refused_a_held_ckpt_path_before_any_role_starts(tiny_models, tmp_path):
    from engine.cli import train_ppo_ray

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "label": "2"}\n' * 4)
    ckpt = tmp_path / "ckpt"
    holder = _start_holder(ckpt)
    args = ["--pretrain", tiny_models["llama"], "--prompt_data", str(prompts), "--input_key", "prompt",
            "--label_key", "label", "--remote_rm_url", "engine/tasks/arithmetic.py", "--n_samples_per_prompt", "2",
            "--rollout_batch_size", "2", "--train_batch_size", "4", "--micro_train_batch_size", "2",
            "--run_dir", str(tmp_path / "run"), "--ckpt_path", str(ckpt), "--save_steps", "1",
            "--save_path", str(tmp_path / "out")]
    try:
        with pytest.raises(PathLockError, match=rf"--ckpt_path {ckpt.resolve()} is in use .*PID {holder.pid}"):
            train_ppo_ray.main(args)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # nothing written
    assert not lock_file_of(tmp_path / "out").exists()  # --save_path was not left locked
    assert train_ppo_ray.job_paths(train_ppo_ray.parse_args([*args, "--save_value_network"])) == {
        "--ckpt_path": str(ckpt), "--save_path": str(tmp_path / "out"),
        "--save_value_network": f"{tmp_path / 'out'}_critic"}
