"""The GPU checks, decided and proven on CPU: what runs with one GPU or two, the driver preflight,
process-group timeouts, the device check's dry run, SKIP-without-CUDA path and its checks' code at
tiny sizes, and the carried wheels' size report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import device_check, device_wheels
from tools.cuda_preflight import CudaFacts, diagnose
from tools.gpu_check import CHECKS as GPU_CHECKS
from tools.gpu_check import skip_reason

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["device_check.sh", "fetch_device_wheels.sh", "gpu_check.sh", "install_gpu.sh"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def test_driver_preflight_names_the_cause():
    old = diagnose(CudaFacts(torch_cuda="13.0", cuda_available=False, device_count=0, driver_version="570.124.06"))
    assert not old.usable
    assert "driver 570.124.06 is older than r580" in old.message and "forward compatibility" in old.message
    assert "cuda-compat-13" in old.message
    # The same driver runs a CUDA 12 build: something else hides the GPU.
    hidden = diagnose(CudaFacts(torch_cuda="12.8", cuda_available=False, device_count=0, driver_version="570.124.06"))
    assert "CUDA_VISIBLE_DEVICES" in hidden.message
    assert "CPU build" in diagnose(CudaFacts(None, False, 0, None)).message
    assert "no NVIDIA driver" in diagnose(CudaFacts("13.0", False, 0, None)).message
    assert diagnose(CudaFacts("13.0", True, 1, "580.65.06")).usable


def test_gpu_check_runs_on_one_gpu_what_one_gpu_can_run():
    one = {name for name in GPU_CHECKS if skip_reason(name, device_count=1) is None}
    assert one == {"train_step", "vllm_ipc_sleep", "grpo_colocated"}
    assert "NCCL refuses two ranks on one GPU" in skip_reason("vllm_nccl", device_count=1)
    assert "grpo_colocated runs GRPO on one GPU" in skip_reason("grpo", device_count=1)
    assert all(skip_reason(name, device_count=2) is None for name in GPU_CHECKS)


def test_a_timeout_kills_the_whole_process_group():
    # The check's own child (think: a Ray worker holding the GPU) dies with it.
    code, output = device_check.run_in_group(["bash", "-c", "sleep 60 & echo $!; wait"], timeout_s=2)
    assert code is None
    grandchild = int(output.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = Path(f"/proc/{grandchild}/stat")
        if not state.exists() or state.read_text().split(")")[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild} outlived its check's timeout")


def test_scripts_parse_and_the_dry_run_lists_every_check(tmp_path):
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
    done = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=120, env=_env(PYTHON=sys.executable, DEVICE_WHEELS=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "would install 0 carried wheel(s)" in done.stdout
    listed = [line.split()[0] for line in done.stdout.splitlines() if " timeout " in line]
    assert listed == list(device_check.TIMEOUTS_S)
    assert sum(device_check.TIMEOUTS_S.values()) <= device_check.TOTAL_BUDGET_S < 8 * 60
    with pytest.raises(ValueError, match="--only: unknown check.*train_stepp"):
        device_check.plan(["train_stepp"])


def test_without_cuda_every_check_is_skipped_with_the_reason(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tools.device_check"], capture_output=True, text=True, timeout=120,
                          env=_env(OUT=str(tmp_path)), cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert [line.split()[:2] for line in lines] == [["SKIP", f"{name}:"] for name in device_check.TIMEOUTS_S]
    assert "torch is a CPU build" in lines[0]
    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["passed"] and [c["status"] for c in summary["checks"]] == ["SKIP"] * 5


def test_a_check_that_dies_or_lacks_a_carried_wheel(monkeypatch, tmp_path):
    from tools import device_checks

    def missing(module):
        def check(workdir):
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        return check

    monkeypatch.setitem(device_checks.CHECKS, "train_step", (missing("megatron.core"), ""))
    skipped = device_check.run_one("train_step", tmp_path)
    assert skipped.status == "SKIP" and "fetch_device_wheels.sh" in skipped.detail
    # Anything else missing is our bug: the training path must not need vLLM.
    monkeypatch.setitem(device_checks.CHECKS, "train_step", (missing("vllm"), ""))
    assert device_check.run_one("train_step", tmp_path).status == "FAIL"
    dead = device_check.parse_result("Segmentation fault\n", "train_step", -11)
    assert dead.status == "FAIL" and "exit -11 without a result" in dead.detail
    ok = device_check.Outcome("ring_attention", "PASS", "fine", 1.0, {"x": 1})
    from dataclasses import asdict

    line = device_check.RESULT_PREFIX + json.dumps(asdict(ok))
    assert device_check.parse_result("noise\n" + line + "\n", "ring_attention", 0) == ok


_SMOKE = """
import sys
from pathlib import Path
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # not installed on the lent GPU machine
from tools.device_check import run_child
sys.exit(run_child(sys.argv[2].split(","), Path(sys.argv[3])))
"""


def test_device_checks_run_their_code_on_cpu(tmp_path):
    """All five checks' code at tiny sizes on CPU (what ``--smoke`` runs), in one process, with the
    packages the lent GPU machine lacks (vLLM, Ray, datasets, TE, flash-attn, PEFT, ...) unavailable:
    a GPU minute is never spent on a typo or a missing import. Each check asserts its own pass
    conditions (loss falls, logits equal, ...)."""
    from tests.test_training_imports import ABSENT_THERE, FORBIDDEN

    names = ",".join(device_check.TIMEOUTS_S)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _SMOKE, ",".join(FORBIDDEN + ABSENT_THERE), names,
                           str(tmp_path)], capture_output=True, text=True, timeout=400, env=_env(), cwd=ROOT)
    results = [json.loads(line[len(device_check.RESULT_PREFIX):]) for line in done.stdout.splitlines()
               if line.startswith(device_check.RESULT_PREFIX)]
    assert [(r["name"], r["status"]) for r in results] == [(n, "PASS") for n in device_check.TIMEOUTS_S], (
        done.stdout[-3000:] + done.stderr[-3000:])
    metrics = {r["name"]: r["metrics"] for r in results}
    assert 0 < metrics["train_step"]["mfu"] and metrics["train_step"]["gemm_tflops"] > 0
    assert metrics["hf_logits"]["llama_fp32_max_abs"] < 1e-4
    assert metrics["lora_offload"]["copied_bytes"] > 0


def test_carried_wheels_report_their_size(tmp_path):
    assert "megatron-core==0.16.1" in device_wheels.DEVICE_WHEELS
    assert all("==" in requirement for requirement in device_wheels.DEVICE_WHEELS)  # pinned
    (tmp_path / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x" * 3 * 2**20)
    files = device_wheels.wheel_files(tmp_path)
    ok, lines = device_wheels.size_report(files)
    assert not ok and "MISSING einops==0.8.2" in lines[1]  # einops is not there
    (tmp_path / "einops-0.8.2-py3-none-any.whl").write_bytes(b"x" * 2**20)
    ok, lines = device_wheels.size_report(device_wheels.wheel_files(tmp_path))
    assert ok and lines[-1].strip().startswith("4.00 MiB in all, limit 64 MiB: fits")
    over, lines = device_wheels.size_report(device_wheels.wheel_files(tmp_path), limit_bytes=2**20)
    assert not over and "OVER THE LIMIT" in lines[-1]
