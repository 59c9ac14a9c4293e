"""A value-head model (critic / reward model) exports as HF ``*ForSequenceClassification`` and
scores like it, under TP and PP."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))


def _values_and_export(rank, world_size, tp, pp, path, out_dir):
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig, build_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights, save_hf_checkpoint
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    config = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = initialize_parallel(config, seed=7)
    adapter = load_adapter(path)
    model = build_model(adapter, config, ModelBuildConfig(value_head=True))
    load_hf_weights(model, adapter, path, new_value_head=True)  # a causal LM: the head keeps its (seeded) init
    model.eval()
    ids = _ids(adapter.vocab_size)
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    values = forward_logits(model, [batch], vocab_size=1)
    save_hf_checkpoint(model, adapter, out_dir, source_dir=path)
    return values[0][..., 0] if values is not None and ctx.tp_rank == 0 else None


@pytest.mark.parametrize("arch,world_size,tp,pp", [("llama", 2, 2, 1), ("qwen2", 2, 1, 2)])
def test_value_model_exports_as_sequence_classifier(arch, world_size, tp, pp, tiny_models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    results = run_distributed(_values_and_export, world_size, args=(tp, pp, tiny_models[arch], str(out)), timeout=300)
    values = next(v for v in results if v is not None)
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        # HF scores the last non-pad token; with no padding that is the last position.
        scores = hf(ids).logits[:, 0]
    torch.testing.assert_close(values[:, -1], scores, atol=1e-4, rtol=0)
    assert values.std() > 0
