"""QLoRA (--load_in_4bit): the frozen decoder linears in NF4, dequantised per layer in forward.

The oracle: HF + PEFT with the same adapter on a base whose linear weights went through the same
NF4 round trip (blocks of 64 hold one row of these tiny layers, so fusing q/k/v or gate/up does
not change the blocks). A QLoRA SFT run learns, with the base linears at ~1/7 of their bytes; a
machine without bitsandbytes gets an install hint.
"""
from __future__ import annotations

import re
import sys

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_lora_sft import LORA, _run, arithmetic_data  # noqa: F401 - fixture

_HF_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight$")


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def _qlora_logits(rank, world_size, path, out_dir):
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig
    from models.lora import LoraConfig
    from models.lora.export import save_peft_adapter

    lora = LoraConfig(lora_rank=4, lora_alpha=8, load_in_4bit=True, init_b_std=0.05)
    engine = TrainingEngine(EngineConfig(pretrain=path, build=ModelBuildConfig(lora=lora)), trainable=False)
    ids = _ids(engine.vocab_size)
    logits = forward_logits(engine.model, [{"input_ids": ids, "position_ids": torch.arange(24).expand_as(ids)}],
                            vocab_size=engine.vocab_size)
    save_peft_adapter(engine.model, engine.adapter, lora, out_dir)
    return logits[0], engine.quantized


def test_qlora_logits_equal_peft_on_the_nf4_round_tripped_base(tiny_models, tmp_path):
    import bitsandbytes.functional as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    logits, quantized = run_distributed(_qlora_logits, 1, args=(tiny_models["llama"], str(tmp_path / "ad")),
                                        timeout=300)[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if _HF_LINEAR.match(name):
                param.copy_(bnb.dequantize_4bit(*bnb.quantize_4bit(param.data, quant_type="nf4", blocksize=64)))
    model = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        expected = model(_ids(base.config.vocab_size)).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert quantized["base_bytes_after"] < quantized["base_bytes_before"] / 6


def test_qlora_sft_learns(tiny_models, arithmetic_data):  # noqa: F811
    result = _run(tiny_models["llama"], arithmetic_data, {}, 1, lora={**LORA, "load_in_4bit": True})
    assert result["loss"][-1] < result["loss"][0] - 0.5, result["loss"]
    assert all(".lora." in name for name in result["trained"])
    assert result["quantized"]["base_bytes_after"] < result["quantized"]["base_bytes_before"] / 6


def test_load_in_4bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    from models.lora.quant import quantize_base_linears

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match=r"--load_in_4bit needs bitsandbytes .* pip install bitsandbytes"):
        quantize_base_linears(torch.nn.Module())
