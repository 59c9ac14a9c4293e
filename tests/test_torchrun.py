"""The offline CLIs under a real torchrun: any world size (DP derived), two "nodes" on this host
(c10d and static rendezvous), conversions, and launches that must fail fast and clearly."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.ports import free_port
from tests.conftest import REPO

LOSS_TOLERANCE = 2e-4  # relative; fp32 reductions differ in order between layouts
NUM_STEPS = 4
MOE_FLAGS = ("--aux_loss_coef", "0.05")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(launcher_args: list[str], module: str, args: list[str], *, timeout: int = 300):
    command = [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0", *launcher_args, "-m", module, *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def train_sft_main(argv: list[str]) -> None:
    from engine.cli import train_sft

    train_sft.main(argv)


def _in_process(main, argv: list[str]) -> None:
    """``main(argv)`` here, in the environment and working directory the subprocesses get."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _env().items():
            if os.environ.get(name) != value:
                patch.setenv(name, value)
        patch.chdir(REPO)
        main(argv)


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _losses(tensorboard_dir: Path, tag: str = "train/loss") -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def _assert_same_curve(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected) == NUM_STEPS
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= LOSS_TOLERANCE * abs(e), f"step {step}: {a} vs {e}"


def _assert_same_weights(actual: Path, expected: Path) -> None:
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict:
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    got, want = tensors(actual), tensors(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equal(want[name]), name


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    directory = tmp_path_factory.mktemp("torchrun_data")
    write_jsonl(make_rows(128, max_operand=9, seed=0), directory / "train.jsonl")
    return f"json@{directory}"


def _sft_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--pretrain", model, "--dataset", data, "--input_key", "prompt", "--output_key", "answer",
            "--max_len", "32", "--train_batch_size", "16", "--micro_train_batch_size", "4",
            "--max_steps", str(NUM_STEPS), "--learning_rate", "1e-3", "--lr_warmup_ratio", "0.1",
            "--use_tensorboard", str(out / "tb"), "--save_path", str(out / "hf"), *extra]


@pytest.fixture(scope="module")
def single_process(tiny_models, arithmetic_data, tmp_path_factory) -> dict[str, list[float]]:
    """Loss curves of plain one-process runs (no torchrun): the references. The CLI's ``main`` runs
    in this process, as ``python -m engine.cli.train_sft`` would: its one rank is forked from the
    forkserver this worker already has (torch and megatron-core imported there once), not from a
    new interpreter that imports them twice (launcher and forkserver) per run."""
    curves = {}
    for arch, extra in (("llama", ()), ("mixtral", MOE_FLAGS)):
        out = tmp_path_factory.mktemp(f"single_{arch}")
        _in_process(train_sft_main, _sft_args(tiny_models[arch], arithmetic_data, out, *extra))
        curves[arch] = _losses(out / "tb")
        curves[f"{arch}_dir"] = out
    curves["mixtral_aux"] = _losses(curves["mixtral_dir"] / "tb", "train/aux_loss")
    return curves


@pytest.fixture(scope="module")
def one_node_dp2(tiny_models, arithmetic_data, tmp_path_factory) -> Path:
    """``torchrun --nproc_per_node 2`` with no parallel flags: DP=2 from the world torchrun made."""
    out = tmp_path_factory.mktemp("one_node_dp2")
    _check(_torchrun(["--nproc_per_node", "2"], "engine.cli.train_sft", _sft_args(tiny_models["llama"], arithmetic_data, out)))
    return out


def test_dp2_under_torchrun_matches_single_process(one_node_dp2, single_process):
    _assert_same_curve(_losses(one_node_dp2 / "tb"), single_process["llama"])


def test_tp2_dp2_under_torchrun_matches_single_process(tiny_models, arithmetic_data, single_process, tmp_path):
    args = _sft_args(tiny_models["llama"], arithmetic_data, tmp_path, "--tensor_model_parallel_size", "2")
    _check(_torchrun(["--nproc_per_node", "4"], "engine.cli.train_sft", args))
    _assert_same_curve(_losses(tmp_path / "tb"), single_process["llama"])


def test_expert_parallel_mixtral_under_torchrun(tiny_models, arithmetic_data, single_process, tmp_path):
    """EP=2 with the HF-style aux loss trains like one process: loss and aux-loss curves, and an HF
    export that transformers loads as a Mixtral computing the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    args = _sft_args(tiny_models["mixtral"], arithmetic_data, tmp_path, "--expert_model_parallel_size", "2", *MOE_FLAGS)
    _check(_torchrun(["--nproc_per_node", "2"], "engine.cli.train_sft", args))
    _assert_same_curve(_losses(tmp_path / "tb"), single_process["mixtral"])
    _assert_same_curve(_losses(tmp_path / "tb", "train/aux_loss"), single_process["mixtral_aux"])
    ids = torch.randint(5, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for export in (tmp_path / "hf", single_process["mixtral_dir"] / "hf"):
        model = AutoModelForCausalLM.from_pretrained(export)
        assert type(model).__name__ == "MixtralForCausalLM"
        logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def _two_nodes(launcher_args, tiny_models, arithmetic_data, out: Path) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents ("nodes") on this host, one rank each, started together and both waited for."""
    command = [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0", "--nnodes", "2",
               "--nproc_per_node", "1"]
    module_args = ["-m", "engine.cli.train_sft", *_sft_args(tiny_models["llama"], arithmetic_data, out)]
    nodes = [subprocess.Popen([*command, *launcher_args(node_rank), *module_args], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node_rank in (0, 1)]
    results = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=300)
        finally:
            if node.poll() is None:
                node.kill()
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_give_the_single_node_checkpoint(rendezvous, one_node_dp2, tiny_models, arithmetic_data, tmp_path):
    port = free_port()
    if rendezvous == "c10d":
        def launcher_args(node_rank):  # c10d ranks go by arrival; --node_rank is not needed
            return ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test_two_nodes"]
    else:
        def launcher_args(node_rank):
            return ["--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    for result in _two_nodes(launcher_args, tiny_models, arithmetic_data, tmp_path):
        _check(result)
    _assert_same_curve(_losses(tmp_path / "tb"), _losses(one_node_dp2 / "tb"))
    _assert_same_weights(tmp_path / "hf", one_node_dp2 / "hf")


def test_conversions_under_torchrun_round_trip(tiny_models, tmp_path):
    """hf_to_mcore with two data-parallel replicas (TP=1), mcore_to_hf on a TP=2 world: bit-exact round trip."""
    hf = tiny_models["llama"]
    _check(_torchrun(["--nproc_per_node", "2"], "tools.convert.hf_to_mcore",
                     ["--hf_path", hf, "--save_path", str(tmp_path / "mcore")]))
    _check(_torchrun(["--nproc_per_node", "2"], "tools.convert.mcore_to_hf",
                     ["--load_path", str(tmp_path / "mcore"), "--save_path", str(tmp_path / "hf"),
                      "--tensor_model_parallel_size", "2"]))
    _assert_same_weights(tmp_path / "hf", Path(hf))


def test_world_the_grid_does_not_divide_fails_fast_naming_the_flags(tiny_models, arithmetic_data, tmp_path):
    started = time.monotonic()
    result = _torchrun(["--nproc_per_node", "2"], "engine.cli.train_sft",
                       _sft_args(tiny_models["llama"], arithmetic_data, tmp_path, "--tensor_model_parallel_size", "4"))
    assert result.returncode != 0
    assert "torchrun started WORLD_SIZE=2 ranks" in result.stderr
    assert "--tensor_model_parallel_size (4)" in result.stderr
    assert "parallel/launch.py" not in result.stderr  # a one-line error per rank, no traceback through our code
    assert not (tmp_path / "hf").exists()
    assert time.monotonic() - started < 90


def test_node_that_never_joins_times_out_naming_the_rendezvous(tiny_models, arithmetic_data, tmp_path):
    started = time.monotonic()
    result = _torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "lonely",
                        "--rdzv_conf", "join_timeout=5"],
                       "engine.cli.train_sft", _sft_args(tiny_models["llama"], arithmetic_data, tmp_path), timeout=120)
    assert result.returncode != 0
    assert "RendezvousTimeoutError" in result.stderr
    assert time.monotonic() - started < 60


# ----- the rules, without processes -------------------------------------------------------

def _under_torchrun(monkeypatch, world: int, local: int) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))


def test_torchrun_world_gives_data_parallel(monkeypatch):
    from parallel.config import ParallelConfig
    from parallel.launch import check_torchrun_world

    _under_torchrun(monkeypatch, world=16, local=8)  # two nodes of eight
    assert check_torchrun_world(ParallelConfig(tensor_model_parallel_size=4), None) == 4
    assert check_torchrun_world(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                               context_parallel_size=2), 8) == 2


def test_expert_parallel_rule_names_its_flag(monkeypatch):
    from parallel.config import ParallelConfig
    from parallel.launch import LaunchError, check_torchrun_world

    _under_torchrun(monkeypatch, world=4, local=4)
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=4.*--expert_model_parallel_size \(4\) must divide"):
        check_torchrun_world(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=4), None)
    # EP is carved out of DP x CP: CP=2 lets EP=2 run with DP=1.
    assert check_torchrun_world(ParallelConfig(context_parallel_size=2, expert_model_parallel_size=2), None) == 2


def test_job_nproc_per_node_that_contradicts_torchrun_is_refused(monkeypatch):
    from parallel.config import ParallelConfig
    from parallel.launch import LaunchError, check_torchrun_world

    _under_torchrun(monkeypatch, world=4, local=4)
    with pytest.raises(LaunchError, match="--nproc_per_node 2 was given to the job, but torchrun started 4"):
        check_torchrun_world(ParallelConfig(), 2)


def test_smallest_world_of_a_grid():
    from parallel.config import ParallelConfig

    assert ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).minimum_world_size() == 4
    assert ParallelConfig(expert_model_parallel_size=4).minimum_world_size() == 4
    assert ParallelConfig(expert_model_parallel_size=4, context_parallel_size=2).minimum_world_size() == 4
    assert ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2).minimum_world_size() == 4


def test_spawned_world_the_grid_does_not_divide_names_nproc_per_node(tiny_models):
    from engine.cli import train_sft
    from parallel.launch import LaunchError

    with pytest.raises(LaunchError, match=r"--nproc_per_node 3: world size 3 is not divisible by "
                                          r"--tensor_model_parallel_size \(2\)"):
        train_sft.main(["--pretrain", tiny_models["llama"], "--dataset", "unused", "--nproc_per_node", "3",
                        "--tensor_model_parallel_size", "2"])


def test_model_that_does_not_split_fails_before_any_rank_starts(tiny_models, tmp_path):
    from engine.cli import train_sft
    from engine.cli.options import OptionError

    with pytest.raises(OptionError, match=r"--tensor_model_parallel_size \(8\) must divide the number of attention"):
        train_sft.main(["--pretrain", tiny_models["llama"], "--dataset", "unused", "--tensor_model_parallel_size", "8"])
    with pytest.raises(OptionError, match=r"--pretrain .* is neither an HF model directory"):
        train_sft.main(["--pretrain", str(tmp_path), "--dataset", "unused"])


def test_devices_come_from_local_rank_not_rank():
    from parallel.initialize import local_device_index

    # rank 9 = node 1, local rank 1 of 8 GPUs
    assert local_device_index({"LOCAL_RANK": "1", "RANK": "9"}, rank=9, device_count=8) == 1
    assert local_device_index({}, rank=9, device_count=8) == 1
    with pytest.raises(ValueError, match="LOCAL_RANK=8 but this node has 8 visible GPU"):
        local_device_index({"LOCAL_RANK": "8"}, rank=8, device_count=8)
