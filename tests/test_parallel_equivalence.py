"""Megatron-core GPTModel forward+backward under TP / PP (1F1B) / TP x PP equals one process."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

NUM_MICROBATCHES = 4
TOLERANCE = 1e-5  # fp32


def _microbatches(vocab_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(NUM_MICROBATCHES):
        ids = torch.randint(5, vocab_size, (2, 17), generator=generator)
        batches.append({
            "input_ids": ids[:, :-1],
            "labels": ids[:, 1:],
            "position_ids": torch.arange(16).expand(2, 16),
        })
    return batches


def _loss_and_grads(rank, world_size, tp, pp, path, sequence_parallel=False):
    from megatron.core import tensor_parallel

    from engine.runtime.optimizer import OptimConfig, wrap_ddp
    from engine.runtime.schedule import run_microbatches, token_mean_scale
    from models.builder import build_model
    from models.registry import load_adapter
    from models.weights import iter_hf_weights, load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    config = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            sequence_parallel=sequence_parallel)
    initialize_parallel(config)
    adapter = load_adapter(path)
    model = build_model(adapter, config)
    load_hf_weights(model, adapter, path)
    trained, grad_of = model, lambda p: p.grad
    if sequence_parallel:
        # Under SP each TP rank holds a partial norm grad (its tokens only); the all-reduce that
        # completes it is DDP's finalize_model_grads, as in training.
        trained, grad_of = wrap_ddp(model, OptimConfig(use_distributed_optimizer=False)), lambda p: p.main_grad
    batches = _microbatches(adapter.vocab_size)
    total_tokens = sum(b["labels"].numel() for b in batches)
    scale = token_mean_scale(num_microbatches=len(batches), data_parallel_size=1, global_num_tokens=total_tokens)

    def loss_fn(logits, batch):
        token_losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"])
        loss_sum = token_losses.sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach()}

    metrics = run_microbatches(
        trained, batches, loss_fn, num_microbatches=len(batches), forward_only=False, seq_length=16, micro_batch_size=2
    )
    loss = sum(m["loss_sum"] for m in metrics) / total_tokens if metrics else None
    grads = dict(iter_hf_weights(model, adapter, tensor_of=grad_of))
    return loss, grads


def _run(world_size, tp, pp, path, sequence_parallel=False):
    results = run_distributed(_loss_and_grads, world_size, args=(tp, pp, path, sequence_parallel), timeout=300)
    losses = [loss for loss, _ in results if loss is not None]
    grads = {name: g for _, rank_grads in results for name, g in rank_grads.items()}
    return losses, grads


@pytest.fixture(scope="module")
def reference(tiny_models):
    losses, grads = _run(1, 1, 1, tiny_models["llama"])
    return losses[0], grads


@pytest.mark.parametrize(
    "world_size,tp,pp,sequence_parallel",
    [(2, 2, 1, False), (2, 1, 2, False), (4, 2, 2, False), (2, 2, 1, True)],
    ids=["tp2", "pp2_1f1b", "tp2_pp2", "tp2_sp"],
)
def test_loss_and_grads_match_single_process(world_size, tp, pp, sequence_parallel, reference, tiny_models):
    ref_loss, ref_grads = reference
    losses, grads = _run(world_size, tp, pp, tiny_models["llama"], sequence_parallel)
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert abs(float(loss) - float(ref_loss)) < TOLERANCE
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=TOLERANCE, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


def _invalid_layout(rank, world_size, kwargs):
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    try:
        initialize_parallel(ParallelConfig(**kwargs))
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"tensor_model_parallel_size": 3}, "--tensor_model_parallel_size"),
        ({"pipeline_model_parallel_size": 0}, "--pipeline_model_parallel_size"),
        ({"sequence_parallel": True}, "--sequence_parallel"),
    ],
)
def test_invalid_parallel_sizes_name_the_flag(kwargs, flag):
    if any(v == 0 for v in kwargs.values()) or "sequence_parallel" in kwargs:
        from parallel.config import ParallelConfig

        with pytest.raises(ValueError, match=flag):
            ParallelConfig(**kwargs)
        return
    messages = run_distributed(_invalid_layout, 2, args=(kwargs,), timeout=120)
    assert all(m is not None and flag in m for m in messages), messages


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"tensor_model_parallel_size": 8}, "--tensor_model_parallel_size"),
        ({"pipeline_model_parallel_size": 3}, "--pipeline_model_parallel_size"),
        ({"expert_model_parallel_size": 2}, "--expert_model_parallel_size"),
    ],
)
def test_model_that_does_not_split_names_the_flag(kwargs, flag):
    from parallel.config import ParallelConfig

    with pytest.raises(ValueError, match=flag):
        ParallelConfig(**kwargs).validate_model(num_layers=4, num_attention_heads=4, num_query_groups=2)
