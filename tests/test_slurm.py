"""scripts/slurm/ on a real Slurm cluster: two logical nodes on this host (tests/launchers/slurm_local.sh),
jobs submitted with ``sbatch --wait`` exactly as users submit them.

- train_offline.sbatch, SFT with one rank per node (DP=2 across the nodes, c10d rendezvous): the
  HF checkpoint equals the one of ``torchrun --nproc_per_node 2`` on one node, bit for bit;
- train_offline.sbatch, DPO: an HF checkpoint, a finite falling loss, preference accuracy logged;
- train_ppo_ray.sbatch, GRPO on the tiny default: both Slurm nodes join the job's Ray cluster, every
  rollout logs its reward, the actor is exported, and no Ray process of the job outlives it;
- a missing setting fails the job with a message naming it.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SLURM_LOCAL = REPO / "tests" / "launchers" / "slurm_local.sh"
JOB_TIMEOUT_S = 420
SFT_STEPS = 4


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The local two-node cluster: started here (installed first if need be), stopped at the end
    only if this fixture started it. The environment jobs are submitted with is returned."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (apt-get install, slurmd, munged's setup)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm (slurm-wlm, munge) is not installed and apt-get is unavailable to install it")
    started = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, f"slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}"
    exports = dict(re.findall(r"^export (\w+)=(.*)$", started.stdout, re.M))
    env = {**os.environ, "SLURM_CONF": exports["SLURM_CONF"],
           # one thread per rank in both the Slurm and the reference runs: identical reductions
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").exists():
        env["VENV"] = str(venv)  # the scripts activate it on the batch node; srun tasks inherit it
    else:
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    try:
        yield env
    finally:
        if exports.get("SLURM_LOCAL_STARTED") == "1":
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=120)


def _sbatch(env: dict, script: str, output: Path, variables: dict[str, str], args: list[str], *,
            expect_success: bool = True) -> str:
    """Submit ``scripts/slurm/<script>`` from the repository root and wait; the job's output.
    The scripts ask for GPUs by default: this cluster has none."""
    command = ["timeout", str(JOB_TIMEOUT_S), "sbatch", "--wait", "--parsable", "--gpus-per-node=0",
               f"--output={output}", f"scripts/slurm/{script}", *args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env={**env, **variables}, capture_output=True, text=True)
    log = output.read_text(errors="replace") if output.exists() else ""
    if result.returncode == 124:
        job_id = result.stdout.strip().split(";")[0]
        if job_id.isdigit():
            subprocess.run(["scancel", job_id], env=env, timeout=30)
    if (result.returncode == 0) != expect_success:
        pytest.fail(f"sbatch {script}: rc={result.returncode} after {time.monotonic() - started:.0f} s\n"
                    f"{result.stderr[-2000:]}\n--- job output ---\n{log[-8000:]}")
    return log


def _scalars(tensorboard_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _hf_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """The tiny default (demo.prepare: Llama-architecture model, addition task) and preference pairs."""
    from engine.cli import demo

    root = tmp_path_factory.mktemp("slurm")
    model, data = demo.prepare(root)
    rng = random.Random(0)
    words = {"prompt": "the a of to and in is it you that".split(), "chosen": "yes good right true thanks".split(),
             "rejected": "no bad wrong false minus".split()}
    pairs = root / "pairs"
    pairs.mkdir()
    with open(pairs / "train.jsonl", "w") as out:
        for _ in range(64):
            out.write(json.dumps({key: " ".join(rng.choices(w, k=rng.randint(1, 4))) for key, w in words.items()}) + "\n")
    return {"root": str(root), "model": model, "data": f"json@{data}", "pairs": f"json@{pairs}"}


def _sft_job(tiny: dict, out: Path) -> tuple[dict[str, str], list[str]]:
    variables = {"TRAINER": "sft", "PRETRAIN": tiny["model"], "DATASET": tiny["data"], "SAVE_PATH": str(out / "hf"),
                 "TRAIN_BATCH_SIZE": "16", "MICRO_TRAIN_BATCH_SIZE": "4", "MAX_LEN": "32", "LEARNING_RATE": "1e-3"}
    args = ["--input_key", "prompt", "--output_key", "answer", "--max_steps", str(SFT_STEPS),
            "--lr_warmup_ratio", "0.1", "--use_tensorboard", str(out / "tb")]
    return variables, args


def test_missing_setting_fails_the_job_naming_it(slurm, tmp_path):
    variables = {"TRAINER": "dpo", "PRETRAIN": "", "DATASET": "x.jsonl"}
    log = _sbatch(slurm, "train_offline.sbatch", tmp_path / "bad.out", variables, [], expect_success=False)
    assert "error: PRETRAIN is not set" in log, log


def test_sft_across_two_nodes_equals_the_single_node_run(slurm, tiny, tmp_path):
    # The same job as one node's torchrun with two ranks: the script passes the variables as flags.
    # Started first and run beside the Slurm job: it fills what the job leaves idle (scheduling,
    # step launch, sbatch's polling).
    flags = ["--pretrain", tiny["model"], "--dataset", tiny["data"], "--save_path", str(tmp_path / "one_node" / "hf"),
             "--train_batch_size", "16", "--micro_train_batch_size", "4", "--max_len", "32", "--max_epochs", "1",
             "--learning_rate", "1e-3", *_sft_job(tiny, tmp_path / "one_node")[1]]
    reference = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  "2", "--max_restarts", "0", "-m", "engine.cli.train_sft", *flags],
                                 cwd=REPO, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        variables, args = _sft_job(tiny, tmp_path / "slurm")
        log = _sbatch(slurm, "train_offline.sbatch", tmp_path / "sft.out", {**variables, "NPROC_PER_NODE": "1"}, args)
        _, reference_stderr = reference.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.communicate()
    assert "train_sft on 2 nodes (n1 n2) x 1 ranks" in log, log[-4000:]
    assert reference.returncode == 0, reference_stderr[-6000:]

    losses = _scalars(tmp_path / "slurm" / "tb")["train/loss"]
    assert len(losses) == SFT_STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses == _scalars(tmp_path / "one_node" / "tb")["train/loss"]
    got, want = _hf_tensors(tmp_path / "slurm" / "hf"), _hf_tensors(tmp_path / "one_node" / "hf")
    assert got.keys() == want.keys() and got
    for name in want:
        assert got[name].equal(want[name]), name


def test_dpo_across_two_nodes(slurm, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    variables = {"TRAINER": "dpo", "NPROC_PER_NODE": "1", "PRETRAIN": tiny["model"], "DATASET": tiny["pairs"],
                 "SAVE_PATH": str(tmp_path / "hf"), "TRAIN_BATCH_SIZE": "16", "MICRO_TRAIN_BATCH_SIZE": "4",
                 "MAX_LEN": "32", "LEARNING_RATE": "1e-3"}
    args = ["--prompt_key", "prompt", "--chosen_key", "chosen", "--rejected_key", "rejected", "--beta", "0.1",
            "--use_tensorboard", str(tmp_path / "tb")]
    log = _sbatch(slurm, "train_offline.sbatch", tmp_path / "dpo.out", variables, args)
    assert "train_dpo on 2 nodes (n1 n2) x 1 ranks" in log, log[-4000:]

    metrics = _scalars(tmp_path / "tb")
    losses, accuracy = metrics["train/loss"], metrics["train/acc"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses  # 64 pairs / 16
    assert losses[-1] < losses[0] and abs(losses[0] - math.log(2)) < 1e-3, losses  # starts at the reference
    assert all(0 <= a <= 1 for a in accuracy) and accuracy[-1] > 0.5, accuracy
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0


def _live_processes_matching(pattern: str) -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = "\nState:\tZ" in (proc / "status").read_text()
        except OSError:
            continue
        if re.search(pattern, cmdline) and not zombie:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_grpo_on_a_ray_cluster_across_two_nodes(slurm, tiny, tmp_path):
    from engine.tasks import arithmetic

    num_rollouts = 2
    variables = {
        "PRETRAIN": tiny["model"], "PROMPT_DATA": tiny["data"], "REMOTE_RM_URL": arithmetic.__file__,
        "SAVE_PATH": str(tmp_path / "hf"), "ADVANTAGE_ESTIMATOR": "grpo", "GPUS_PER_NODE": "1",
        "N_SAMPLES_PER_PROMPT": "4", "ROLLOUT_BATCH_SIZE": "4", "MICRO_ROLLOUT_BATCH_SIZE": "16",
        "TRAIN_BATCH_SIZE": "16", "MICRO_TRAIN_BATCH_SIZE": "8", "PROMPT_MAX_LEN": "16", "GENERATE_MAX_LEN": "6",
        "LEARNING_RATE": "1e-3", "RAY_START_ARGS": "--num-cpus 1 --object-store-memory 100000000",
    }
    args = ["--input_key", "prompt", "--label_key", "label", "--max_steps", str(num_rollouts), "--init_kl_coef", "0",
            "--lr_warmup_ratio", "0", "--enforce_eager", "--vllm_dtype", "float32",
            "--use_tensorboard", str(tmp_path / "tb")]
    log = _sbatch(slurm, "train_ppo_ray.sbatch", tmp_path / "grpo.out", variables, args)

    # Both Slurm nodes are Ray nodes of the job's cluster, and the work is dealt over them: on a
    # CPU-only cluster the actor's rank 0 stays on the driver's node and the engine goes to the other.
    assert re.search(r"Ray nodes alive: 2/2", log), log[-6000:]
    placement = re.search(r"^placement: actor rank 0 on node 0 .*engine 0 on node 1 ", log, re.M)
    assert placement, log[-6000:]
    assert "succeeded" in log and "stopping the Ray cluster" in log, log[-4000:]

    rewards = _scalars(tmp_path / "tb")["train/reward"]
    assert len(rewards) == num_rollouts and all(0 <= r <= 1 for r in rewards), rewards
    assert (tmp_path / "hf" / "config.json").exists()

    # The Ray processes of the job (all under its --temp-dir, the other node's under its own) ended with it.
    job_id = re.search(r"job (\d+): Ray head", log).group(1)
    temp_dir = f"/tmp/ray-{job_id}"
    deadline = time.monotonic() + 30
    while (left := _live_processes_matching(re.escape(temp_dir) + r"(-n1)?(/|\s|$)")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    for node_dir in (temp_dir, f"{temp_dir}-n1"):
        shutil.rmtree(node_dir, ignore_errors=True)
