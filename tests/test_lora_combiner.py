"""``tools.convert.lora_combiner`` writes what PEFT's ``merge_and_unload`` gives, tensor for tensor,
for a causal LM (Llama; Qwen2 with q/k/v biases and tied embeddings) and for a reward model whose
value head PEFT saved as ``modules_to_save``."""
from __future__ import annotations

import pytest
import torch

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]}


def _randomise_adapters(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _peft_adapter(base_dir: str, out_dir, *, is_rm: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if is_rm:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
        config = LoraConfig(**LORA, task_type="SEQ_CLS", modules_to_save=["score"])
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(**LORA, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    _randomise_adapters(model)
    model.save_pretrained(str(out_dir))
    return model


@pytest.mark.parametrize("arch,is_rm", [("llama", False), ("qwen2", False), ("llama", True)],
                         ids=["llama", "qwen2", "llama_rm"])
def test_combiner_equals_merge_and_unload(arch, is_rm, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tools.convert.lora_combiner import main

    peft_model = _peft_adapter(tiny_models[arch], tmp_path / "adapter", is_rm=is_rm)
    expected = peft_model.merge_and_unload().state_dict()
    args = ["--model_path", tiny_models[arch], "--lora_path", str(tmp_path / "adapter"), "--output_path",
            str(tmp_path / "merged")]
    main(args + (["--is_rm"] if is_rm else []))
    cls = AutoModelForSequenceClassification if is_rm else AutoModelForCausalLM
    merged = cls.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(merged[n], t) for n, t in cls.from_pretrained(
        tiny_models[arch], **({"num_labels": 1} if is_rm else {})).state_dict().items() if "score" not in n)


def test_combiner_refuses_a_mismatched_flag(tiny_models, tmp_path):
    from tools.convert.lora_combiner import main

    _peft_adapter(tiny_models["llama"], tmp_path / "rm_adapter", is_rm=True)
    with pytest.raises(ValueError, match="pass --is_rm"):
        main(["--model_path", tiny_models["llama"], "--lora_path", str(tmp_path / "rm_adapter"),
              "--output_path", str(tmp_path / "out")])


def test_an_adapter_as_a_model_flag_points_to_the_combiner(tiny_models, tmp_path):
    from models.sources import ModelSource

    _peft_adapter(tiny_models["llama"], tmp_path / "adapter", is_rm=False)
    with pytest.raises(ValueError, match="is a LoRA adapter, not a model: merge it .*lora_combiner"):
        ModelSource.open(tmp_path / "adapter", flag="--pretrain")
