"""Whole SFT jobs (the CLI, real processes) around their checkpoint files: a second job on the
same paths is refused while the first holds them, and loses it nothing; a checkpoint with one
flipped byte is skipped by name and the run resumes from the one before; ``--load_checkpoint``
without a checkpoint says so (``--require_checkpoint``: an error)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.durable_io import file_checksum
from models.mcore_checkpoint import verify_checkpoint
from tests.conftest import REPO

LOSS_TOLERANCE = 2e-4  # relative


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    directory = tmp_path_factory.mktemp("ckpt_jobs_data")
    write_jsonl(make_rows(64, max_operand=9, seed=0), directory / "train.jsonl")
    return f"json@{directory}"


def _sft(model: str, data: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli.train_sft", "--pretrain", model, "--dataset", data,
            "--input_key", "prompt", "--output_key", "answer", "--max_len", "32", "--train_batch_size", "8",
            "--micro_train_batch_size", "4", "--learning_rate", "1e-3", "--lr_warmup_ratio", "0.1", *extra]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    return {str(p): (p.stat().st_size, file_checksum(p)) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


def _losses(tensorboard_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


@pytest.fixture(scope="module")
def two_jobs(tiny_models, arithmetic_data, tmp_path_factory) -> dict:
    """Job A (--load_checkpoint on an empty --ckpt_path, a checkpoint every step) is frozen
    (SIGSTOP) once its first checkpoint is in place; job B starts on the same paths meanwhile;
    then A goes on to the end. Every file under the root is snapshotted around B."""
    root = tmp_path_factory.mktemp("two_jobs")
    ckpt, out = root / "ckpt", root / "out" / "sft"
    ckpt.mkdir()
    paths = ("--save_steps", "1", "--ckpt_path", str(ckpt), "--save_path", str(out), "--load_checkpoint")
    first = subprocess.Popen(_sft(tiny_models["llama"], arithmetic_data, "--max_steps", "4", *paths,
                                  "--use_tensorboard", str(root / "tb")),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "global_step1").is_dir():  # renamed into place only when complete
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # A holds its paths, frozen mid-run
        before = _snapshot(root)
        second = _run(_sft(tiny_models["llama"], arithmetic_data, "--max_steps", "2", *paths), timeout=180)
        after = _snapshot(root)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    return {"root": root, "ckpt": ckpt, "out": out, "first": first, "first_log": stdout + stderr,
            "second": second, "before": before, "after": after}


def test_second_job_on_the_same_paths_is_refused_and_the_first_loses_nothing(two_jobs):
    first, second, ckpt, root = two_jobs["first"], two_jobs["second"], two_jobs["ckpt"], two_jobs["root"]
    assert second.returncode != 0
    last_line = second.stderr.strip().splitlines()[-1]
    assert f"error: --ckpt_path {ckpt.resolve()} is in use by another job (PID {first.pid} on host " \
           f"{socket.gethostname()}, started " in last_line, second.stderr[-3000:]
    assert two_jobs["after"] == two_jobs["before"]  # the refused job wrote nothing, removed nothing
    assert first.returncode == 0, two_jobs["first_log"][-6000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step2", "global_step3", "global_step4"]
    for step in (2, 3, 4):
        assert verify_checkpoint(ckpt / f"global_step{step}")["step"] == step  # sizes and checksums
    assert (two_jobs["out"] / "config.json").exists() and list(two_jobs["out"].glob("*.safetensors"))
    assert not list(root.rglob("*.partial-*"))  # no staging left behind
    assert not list(root.rglob(".*.lock"))  # released on exit


def test_load_checkpoint_without_a_checkpoint_says_so_in_one_line(two_jobs):
    said = [line for line in two_jobs["first_log"].splitlines() if "--load_checkpoint:" in line]
    assert said == [f"--load_checkpoint: --ckpt_path {two_jobs['ckpt']} holds no checkpoint (no global_step<N> "
                    "directory): starting from scratch"], said


def test_flipped_byte_skips_to_the_previous_checkpoint(two_jobs, tiny_models, arithmetic_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_jobs["ckpt"], ckpt)
    shard = sorted((ckpt / "global_step4").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    resumed = _ok(_run(_sft(tiny_models["llama"], arithmetic_data, "--max_steps", "5", "--save_steps", "1",
                            "--ckpt_path", str(ckpt), "--load_checkpoint", "--use_tensorboard", str(tmp_path / "tb"))))
    log = resumed.stdout + resumed.stderr
    assert f"skipping unusable checkpoint {ckpt / 'global_step4'}: " in log and \
           f"{shard.name} does not match its checksum" in log, log[-3000:]
    assert f"resumed from {ckpt / 'global_step3'}" in log, log[-3000:]
    # Step 4 trained again from step 3's state: the same loss as the first time.
    before, after = _losses(two_jobs["root"] / "tb"), _losses(tmp_path / "tb")
    assert sorted(after) == [4, 5]
    assert abs(after[4] - before[4]) <= LOSS_TOLERANCE * abs(before[4]), (before, after)


def test_require_checkpoint_refuses_an_empty_ckpt_path(tiny_models, arithmetic_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(_sft(tiny_models["llama"], arithmetic_data, "--max_steps", "1", "--ckpt_path", str(empty),
                       "--load_checkpoint", "--require_checkpoint"), timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"error: --require_checkpoint: --ckpt_path {empty} holds no checkpoint (no global_step<N> directory)"), \
        result.stderr[-3000:]
    assert list(empty.iterdir()) == []
