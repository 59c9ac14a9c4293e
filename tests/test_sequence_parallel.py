"""TP=2 with --sequence_parallel trains exactly like one process: loss, gradients and weights after
an optimizer step, for a dense (Llama), a tied-embedding (Qwen2) and an MoE (Mixtral) model.

Under sequence parallelism each TP rank runs its norms on its slice of the sequence only, so the
norm gradients are partial until ``finalize_model_grads`` sums the parameters marked
``sequence_parallel`` over the TP group; a norm that is not marked trains differently on each TP
rank (the replicas drift apart), which the replica check below catches.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_parallel_equivalence import TOLERANCE, _microbatches

ARCHS = ("llama", "qwen2", "mixtral")
LEARNING_RATE = 1e-3
# Adam's first step is lr * g / (|g| + eps): with the default eps (1e-8) the fp32 rounding of a
# near-zero grad (~1e-9) moves the update by a good part of lr. A larger eps bounds the update's
# difference by lr * (grad difference) / eps (~3e-7 here).
ADAM_EPS = 1e-4
WEIGHT_TOLERANCE = 1e-6


def _one_step(rank, world_size, model_dirs, tp, sequence_parallel):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.weights import iter_hf_weights
    from parallel.config import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    optim = OptimConfig(learning_rate=LEARNING_RATE, lr_warmup_ratio=0.0, lr_scheduler="constant", max_norm=0.0,
                        adam_eps=ADAM_EPS)
    results = {}
    for arch, path in model_dirs.items():
        engine = TrainingEngine(EngineConfig(pretrain=path, parallel=parallel, optim=optim, seed=0))
        batches = [{**b, "loss_mask": torch.ones_like(b["labels"])} for b in _microbatches(engine.vocab_size)]
        scale = engine.loss_scale(batches)

        def loss_fn(logits, batch, scale=scale):
            loss_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"]).sum()
            return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": batch["loss_mask"].sum()}

        loss = engine.train_step(batches, loss_fn, normaliser_key="num_tokens").metrics["loss"]
        model, adapter = engine.model, engine.adapter
        grads = dict(iter_hf_weights(model, adapter, tensor_of=lambda p: p.main_grad))
        weights = dict(iter_hf_weights(model, adapter))
        # TP-replicated weights (norms, router) of this rank, to compare the TP ranks' copies.
        replicated = {name: p.detach().clone() for name, p in model.named_parameters()
                      if not getattr(p, "tensor_model_parallel", False) and ".experts." not in name}
        sp_marked = sorted(name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
        results[arch] = {"loss": loss, "grads": grads, "weights": weights, "replicated": replicated,
                         "sp_marked": sp_marked}
    return results


def _merged(results: list[dict], key: str, arch: str) -> dict:
    return {name: t for rank_result in results for name, t in rank_result[arch][key].items()}


@pytest.fixture(scope="module")
def single_process(tiny_models):
    (result,) = run_distributed(_one_step, 1, args=({a: tiny_models[a] for a in ARCHS}, 1, False), timeout=300)
    return result


@pytest.fixture(scope="module")
def tp2_sequence_parallel(tiny_models):
    return run_distributed(_one_step, 2, args=({a: tiny_models[a] for a in ARCHS}, 2, True), timeout=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_sequence_parallel_step_matches_single_process(arch, single_process, tp2_sequence_parallel):
    reference, results = single_process[arch], tp2_sequence_parallel
    for rank_result in results:
        assert abs(rank_result[arch]["loss"] - reference["loss"]) < TOLERANCE
    for key, tolerance in (("grads", TOLERANCE), ("weights", WEIGHT_TOLERANCE)):
        merged = _merged(results, key, arch)
        assert sorted(merged) == sorted(reference[key])
        for name, expected in reference[key].items():
            torch.testing.assert_close(merged[name], expected, atol=tolerance, rtol=0, msg=f"{key} {name}")
    assert any(g.abs().sum() > 0 for g in reference["grads"].values())


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_replicas_stay_identical_and_norms_are_marked(arch, tp2_sequence_parallel):
    first, second = (r[arch] for r in tp2_sequence_parallel)
    assert sorted(first["replicated"]) == sorted(second["replicated"])
    for name, weight in first["replicated"].items():
        torch.testing.assert_close(second["replicated"][name], weight, atol=0, rtol=0, msg=name)
    norms = [name for name in first["replicated"] if "layernorm" in name]
    assert norms and set(norms) <= set(first["sp_marked"])
