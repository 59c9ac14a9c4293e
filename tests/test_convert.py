"""HF -> Megatron (any layout) -> HF conversion is bit-exact, reshards, and rejects bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def _cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _convert(module: str, *args: str) -> None:
    """A conversion CLI's ``main`` in this process: its ranks fork from the warm forkserver
    (the subprocess runs below test the CLI's exit codes and messages)."""
    import importlib

    importlib.import_module(module).main(list(args))


def _tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    directory = Path(hf_dir)
    index = directory / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    tensors = {}
    for file in files:
        with safe_open(str(directory / file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


CASES = {
    # tied embeddings and a vocabulary (501) that TP=2 does not divide
    "qwen2-tp2-pp2": ("qwen2", ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2"]),
    "llama-tp2": ("llama", ["--tensor_model_parallel_size", "2"]),
    "mixtral-pp2-ep2": ("mixtral", ["--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_is_bit_exact_and_reshards(case, tiny_models, tmp_path):
    arch, layout = CASES[case]
    source = tiny_models[arch]
    mcore, exported = tmp_path / "mcore", tmp_path / "hf"
    _convert("tools.convert.hf_to_mcore", "--hf_path", source, "--save_path", str(mcore), *layout)
    # Export with one process: the TP/PP/EP-sharded checkpoint is resharded to TP=PP=EP=1.
    _convert("tools.convert.mcore_to_hf", "--load_path", str(mcore), "--save_path", str(exported))

    original, roundtrip = _tensors(source), _tensors(str(exported))
    assert sorted(roundtrip) == sorted(original)
    for name, tensor in original.items():
        assert roundtrip[name].dtype == tensor.dtype, name
        assert torch.equal(roundtrip[name], tensor), f"{case}: {name} differs"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(exported)
    assert len(AutoTokenizer.from_pretrained(exported)) == len(AutoTokenizer.from_pretrained(source))


def test_refuses_non_empty_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = _cli("tools.convert.hf_to_mcore", "--hf_path", tiny_models["llama"], "--save_path", str(out), check=False)
    assert proc.returncode != 0
    assert "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "user data"


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    proc = _cli("tools.convert.hf_to_mcore", "--hf_path", str(tmp_path / "gpt2"), "--save_path", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0
    assert "unsupported architecture 'gpt2'" in proc.stderr
    assert "llama" in proc.stderr and "mixtral" in proc.stderr


def test_bad_parallel_size_names_the_flag(tiny_models, tmp_path):
    proc = _cli(
        "tools.convert.hf_to_mcore", "--hf_path", tiny_models["llama"], "--save_path", str(tmp_path / "o"),
        "--tensor_model_parallel_size", "3", check=False,
    )
    assert proc.returncode != 0
    assert "--tensor_model_parallel_size (3) must divide the number of attention heads" in proc.stderr


def test_truncated_checkpoint_is_detected(tiny_models, tmp_path):
    mcore = tmp_path / "mcore"
    _convert("tools.convert.hf_to_mcore", "--hf_path", tiny_models["llama"], "--save_path", str(mcore))
    shard = next(mcore.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = _cli("tools.convert.mcore_to_hf", "--load_path", str(mcore), "--save_path", str(tmp_path / "hf"), check=False)
    assert proc.returncode != 0
    assert "truncated" in proc.stderr and shard.name in proc.stderr
