"""Megatron models built from HF checkpoints give HF transformers' logits, in every layout."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

ATOL = 1e-4  # fp32; observed differences are ~1e-6


def _input_batch(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(5, vocab_size, (2, 24), generator=generator)


def _megatron_logits(rank, world_size, tp, pp, ep, model_dirs):
    from engine.runtime.schedule import forward_logits
    from models.builder import build_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    config = ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    ctx = initialize_parallel(config)
    results = {}
    for arch, path in model_dirs.items():
        adapter = load_adapter(path)
        model = build_model(adapter, config)
        load_hf_weights(model, adapter, path)
        model.eval()
        ids = _input_batch(adapter.vocab_size)
        batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
        logits = forward_logits(model, [batch], vocab_size=adapter.vocab_size)
        if logits is not None and ctx.tp_rank == 0:
            results[arch] = logits[0]
    return results


def _hf_logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = _input_batch(model.config.vocab_size)
    with torch.no_grad():
        return model(ids).logits


LAYOUTS = {
    "tp1": (1, 1, 1, 1),
    "tp2": (2, 2, 1, 1),
    "pp2": (2, 1, 2, 1),
    "tp2_pp2": (4, 2, 2, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_equal_hf(layout, tiny_models):
    world, tp, pp, ep = LAYOUTS[layout]
    per_rank = run_distributed(_megatron_logits, world, args=(tp, pp, ep, tiny_models), timeout=300)
    merged = {arch: logits for result in per_rank for arch, logits in result.items()}
    assert set(merged) == set(tiny_models)
    for arch, path in tiny_models.items():
        expected = _hf_logits(path)
        torch.testing.assert_close(merged[arch], expected, atol=ATOL, rtol=0, msg=f"{arch} {layout}")


def test_mixtral_expert_parallel_logits_equal_hf(tiny_models):
    models = {"mixtral": tiny_models["mixtral"]}
    per_rank = run_distributed(_megatron_logits, 2, args=(1, 1, 2, models), timeout=300)
    torch.testing.assert_close(per_rank[0]["mixtral"], _hf_logits(models["mixtral"]), atol=ATOL, rtol=0)
