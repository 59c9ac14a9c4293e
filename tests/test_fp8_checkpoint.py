"""FP8 block-scaled HF checkpoints (issue 30: DeepSeek-V3 ships its weights so): config.json's
``quantization_config`` {quant_method "fp8", fmt "e4m3", activation_scheme "dynamic", weight_block_size
[128, 128]} and a float32 ``*.weight_scale_inv`` per block beside each float8_e4m3fn ``*.weight``.

The test writes such a checkpoint from a tiny fp32 DeepSeek-V3 (``models.tiny``; dims 48, 72, 40, 24, 20:
most are not multiples of the block, so last blocks are ragged) with scale = block amax / 448, in blocks of
16 x 16 (many blocks, ragged ones) and of DeepSeek-V3's 128 x 128 (one ragged block per tensor). Loaded
through ``load_hf_weights`` (the path of every trainer and of hf_to_mcore), each weight equals an
independent full-tensor dequantisation exactly and is within FP8 rounding of the original; the logits
equal HF's of the dequantised weights (fp32); the export has no quantization_config and loads in HF.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed

ATOL = 1e-4  # Megatron vs HF transformers, same (dequantised) fp32 weights: as tests/test_deepseek_v3.py
FP8_MAX = 448.0  # largest float8_e4m3fn
BLOCKS = {"b16": [16, 16], "b128": [128, 128]}


def _quantised(name: str, tensor: torch.Tensor) -> bool:
    """The tensors DeepSeek-V3 stores in FP8: the linear projections of the layers (not embeddings,
    norms, the router's gate, its bias or the LM head)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and tensor.dim() == 2


def _quantise(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv per block): scale = block amax / 448, ragged last blocks."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight
    blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def _dequantise(q: torch.Tensor, scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[:q.shape[0], :q.shape[1]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """The fp32 original, and per block size the FP8 checkpoint and the same weights dequantised in fp32."""
    from safetensors.torch import load_file, save_file

    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("fp8")
    original = build_tiny_model("deepseek_v3", root / "original", seed=3, init_std=0.1)
    tensors = load_file(f"{original}/model.safetensors")
    out = {"original": original, "fp8": {}, "dequantised": {}, "quantised_names": {}}
    for key, block in BLOCKS.items():
        fp8_dir, deq_dir = root / f"fp8-{key}", root / f"deq-{key}"
        shutil.copytree(original, fp8_dir)
        shutil.copytree(original, deq_dir)
        fp8, deq = {}, {}
        for name, tensor in tensors.items():
            if _quantised(name, tensor):
                q, scale = _quantise(tensor, block)
                fp8[name], fp8[name + "_scale_inv"] = q, scale
                deq[name] = _dequantise(q, scale, block)
            else:
                fp8[name] = deq[name] = tensor
        save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
        save_file(deq, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((fp8_dir / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": block}
        (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))
        out["fp8"][key], out["dequantised"][key] = str(fp8_dir), str(deq_dir)
        out["quantised_names"][key] = sorted(n for n in tensors if _quantised(n, tensors[n]))
    return out


def _load_run_export(rank, world_size, fp8_dirs: dict, export_root: str):
    """One process: per FP8 checkpoint, load it into the Megatron model, its logits, its weights as HF
    tensors, and an HF export."""
    from engine.runtime.schedule import forward_logits
    from models.builder import build_model
    from models.mcore_checkpoint import save_model
    from models.registry import load_adapter
    from models.weights import iter_hf_weights, load_hf_weights, save_hf_checkpoint
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel
    from tests.test_deepseek_v3 import _batches

    config = ParallelConfig()
    initialize_parallel(config)
    results, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):  # the notes said, whichever process this rank forked from
        for key, path in fp8_dirs.items():
            adapter = load_adapter(path)
            model = build_model(adapter, config)
            load_hf_weights(model, adapter, path)
            model.eval()
            padded, packed = _batches(adapter.vocab_size)
            logits = forward_logits(model, [padded, packed], vocab_size=adapter.vocab_size)
            weights = {name: t.clone() for name, t in iter_hf_weights(model, adapter)}
            save_hf_checkpoint(model, adapter, f"{export_root}/{key}", source_dir=path)
            if key == "b16":  # a Megatron checkpoint's hf/ (what engines start from) holds the unquantised config
                save_model(model, f"{export_root}/mcore", adapter=adapter, hf_source_dir=path)
            results[key] = {"padded": logits[0], "packed": logits[1][0], "weights": weights}
    results["printed"] = printed.getvalue()
    return results


def test_fp8_block_scaled_checkpoint_loads_dequantised_and_exports_unquantised(checkpoints, tmp_path):
    from safetensors.torch import load_file

    from tests.test_deepseek_v3 import PACKED_LENGTHS, _hf_logits

    [results] = run_distributed(_load_run_export, 1, args=(checkpoints["fp8"], str(tmp_path)), timeout=600)
    original = load_file(f"{checkpoints['original']}/model.safetensors")
    hf_original = _hf_logits(checkpoints["original"])
    for key, block in BLOCKS.items():
        got = results[key]
        dequantised = load_file(f"{checkpoints['dequantised'][key]}/model.safetensors")
        assert sorted(got["weights"]) == sorted(original), key  # the scales are gone, nothing else
        for name in checkpoints["quantised_names"][key]:
            w, loaded = original[name], got["weights"][name]
            assert torch.equal(loaded, dequantised[name]), f"{key} {name}: not the block-wise dequantisation"
            # e4m3 has 3 mantissa bits: a normal value rounds within 2^-4 of itself; below 2^-6 (subnormal)
            # the spacing is 2^-9, so within 2^-10, in units of the block's scale.
            scale = load_file(f"{checkpoints['fp8'][key]}/model.safetensors")[name + "_scale_inv"]
            per_element = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:w.shape[0], :w.shape[1]]
            bound = w.abs() * 2**-4 + per_element * 2**-10 + 1e-7
            assert ((loaded - w).abs() <= bound).all(), f"{key} {name}: beyond FP8 rounding"
            assert not torch.equal(loaded, w)  # the rounding is real
        for name in set(original) - set(checkpoints["quantised_names"][key]):
            assert torch.equal(got["weights"][name], original[name]), f"{key} {name}: unquantised, changed"

        # Megatron == HF transformers on the same dequantised weights (fp32), padded and packed.
        hf_deq = _hf_logits(checkpoints["dequantised"][key])
        packed = got["packed"][:sum(PACKED_LENGTHS)]
        torch.testing.assert_close(got["padded"], hf_deq["padded"], atol=ATOL, rtol=0, msg=key)
        torch.testing.assert_close(packed, hf_deq["packed"], atol=ATOL, rtol=0, msg=key)
        # Against the unquantised original: FP8 rounding itself moves the logits (here by up to ~2, of logits
        # up to ~3: about 3% per weight through 4 layers of a random tiny model, and expert choices that
        # flip), so the matching tolerance is that shift as HF transformers computes it from the same
        # rounded weights; Megatron's difference from the original equals it element-wise within ATOL.
        fp8_shift = hf_deq["padded"] - hf_original["padded"]
        assert fp8_shift.abs().max() > 10 * ATOL, key  # the rounding is visible at this tolerance
        torch.testing.assert_close(got["padded"] - hf_original["padded"], fp8_shift, atol=2 * ATOL, rtol=0, msg=key)

        # The export: unquantised (fp32 here, the config's dtype), no quantization_config, loads in HF.
        exported = tmp_path / key
        config = json.loads((exported / "config.json").read_text())
        assert "quantization_config" not in config
        tensors = load_file(str(next(exported.glob("model-*.safetensors"))))
        assert not any(n.endswith("_scale_inv") for n in tensors)
        assert all(t.dtype == torch.float32 for t in tensors.values())
        hf_export = _hf_logits(str(exported))
        assert torch.equal(hf_export["padded"], hf_deq["padded"]), key
    out = results["printed"]
    assert "without the source's config.json quantization_config" in out and "kept dequantised" in out
    hf_dir = tmp_path / "mcore" / "hf"
    assert "quantization_config" not in json.loads((hf_dir / "config.json").read_text())
    shapes = json.loads((hf_dir / "tensor_shapes.json").read_text())
    assert sorted(shapes) == sorted(original)  # what a weight sync must carry: no scales


def test_reader_dequantises_slices_with_ragged_blocks(checkpoints):
    """A TP rank's slice (rows or columns not on block boundaries) is the slice of the dequantised tensor."""
    from safetensors.torch import load_file

    from models.hf_checkpoint import HFCheckpointReader

    reader = HFCheckpointReader(checkpoints["fp8"]["b16"])
    dequantised = load_file(f"{checkpoints['dequantised']['b16']}/model.safetensors")
    try:
        assert not any(n.endswith("_scale_inv") for n in reader.keys())
        assert "model.layers.0.mlp.up_proj.weight_scale_inv" not in reader
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            full = dequantised[name]
            assert torch.equal(reader.read(name), full)
            for dim in (0, 1):
                for start, stop in ((5, 37), (16, 32), (30, full.shape[dim])):
                    assert torch.equal(reader.read(name, dim=dim, start=start, stop=stop),
                                       full.narrow(dim, start, stop - start)), (name, dim, start, stop)
    finally:
        reader.close()


@pytest.mark.parametrize("quant,message", [
    ({"quant_method": "fp8", "weight_block_size": None}, "quantization_config.weight_block_size None"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "quantization_config.activation_scheme 'static'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "quantization_config.fmt 'e5m2'"),
    ({"quant_method": "awq", "bits": 4}, "quantization_config.quant_method 'awq'"),
])
def test_other_quantisations_are_refused_naming_the_key(tmp_path, quant, message):
    from safetensors.torch import save_file

    from models.hf_checkpoint import CheckpointError, HFCheckpointReader

    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    Path(tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        HFCheckpointReader(tmp_path)


def test_engines_that_receive_weight_syncs_refuse_an_fp8_pretrain(tmp_path):
    """vLLM would hold FP8 weights while the trainer syncs the dequantised ones: refused in the driver."""
    from engine.ray.config import VLLMEngineConfig
    from engine.ray.vllm_engine import _check_model

    config = {"num_attention_heads": 4, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _check_model(VLLMEngineConfig(pretrain=str(tmp_path)), "cuda")  # generation alone: vLLM's own FP8
    with pytest.raises(ValueError, match="quantization_config"):
        _check_model(VLLMEngineConfig(pretrain=str(tmp_path), weights_from_trainer=True), "cuda")
