"""Non-finite values never reach the weights (issue 33, case 1), in the shared engine at DP=2:

- a NaN loss on one rank, or a finite loss with NaN gradients on the other, skips the optimizer step
  on both ranks (weights unchanged and identical across ranks, the LR schedule not advanced), counted
  as ``skipped_steps``; ``--max_skipped_steps`` such steps in a row stop the run naming the cause;
- a checkpoint or HF export of non-finite weights is refused on every rank, naming the parameter,
  and the previous checkpoint stays (rotation with --max_ckpt_num 1 never ran).
"""
from __future__ import annotations

import torch

from tests.dist_harness import run_distributed
from tests.test_parallel_equivalence import _microbatches

# What each step injects: None, a NaN loss on one rank, or NaN gradients under a finite loss.
PLAN = [None, ("loss", 1), ("grad", 0), None, ("loss", 0), ("loss", 0), ("loss", 0)]
MAX_SKIPPED = 3


def _weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def _train(rank, world_size, path, out_dir):
    from megatron.core import tensor_parallel

    from engine.runtime.checkpoint import CheckpointConfig, step_directories
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.finite import NonFiniteTrainingError, NonFiniteWeightsError
    from engine.runtime.optimizer import OptimConfig

    engine = TrainingEngine(EngineConfig(pretrain=path, optim=OptimConfig(
        learning_rate=1e-2, lr_warmup_ratio=0.0, lr_scheduler="linear", max_skipped_steps=MAX_SKIPPED)),
        total_steps=len(PLAN))
    batches = [{**b, "loss_mask": torch.ones_like(b["labels"])} for b in _microbatches(engine.vocab_size)]
    batches = batches[rank::world_size]
    scale = engine.loss_scale(batches)
    current = [None]  # what this step injects, read by the loss

    def loss_fn(logits, batch):
        loss_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"]).sum()
        loss = loss_sum * scale
        inject = current[0]
        if inject == ("loss", rank):
            loss = loss * float("nan")
        elif inject == ("grad", rank):
            # sqrt(|0 x|) is 0, its gradient 0 x inf = NaN: a finite loss with NaN gradients.
            loss = loss + (logits[0, 0, 0] * 0).abs().sqrt()
        return loss, {"loss_sum": loss_sum.detach(), "num_tokens": batch["loss_mask"].sum()}

    out = {"weights": [], "skipped": [], "lr": [], "grad_norm": []}
    ckpt = CheckpointConfig(ckpt_path=f"{out_dir}/ckpt", max_ckpt_num=1)
    for step, inject in enumerate(PLAN):
        current[0] = inject
        try:
            result = engine.train_step(batches, loss_fn, normaliser_key="num_tokens")
        except NonFiniteTrainingError as exc:
            out["stopped"] = (step, str(exc))
            break
        out["weights"].append(_weights(engine))
        out["skipped"].append(result.metrics["skipped_steps"])
        out["lr"].append(engine.learning_rate)
        out["grad_norm"].append(result.grad_norm)
        if step == 0:
            engine.save_checkpoint(ckpt, 1, {"step": 1})
    # A NaN in one parameter of rank 1 only: both ranks refuse the checkpoint and the export.
    if rank == 1:
        with torch.no_grad():
            dict(engine.model.named_parameters())["decoder.final_layernorm.weight"][0] = float("nan")
    refusals = []
    for write in (lambda: engine.save_checkpoint(ckpt, 2, {"step": 2}), lambda: engine.save_hf(f"{out_dir}/hf")):
        try:
            write()
            refusals.append(None)
        except NonFiniteWeightsError as exc:
            refusals.append(str(exc))
    out["refusals"] = refusals
    out["checkpoints"] = [step for step, _ in step_directories(ckpt.ckpt_path)]
    return out


def test_nonfinite_steps_are_skipped_everywhere_counted_and_stop_the_run(tiny_models, tmp_path):
    from pathlib import Path

    results = run_distributed(_train, 2, args=(tiny_models["llama"], str(tmp_path)), timeout=300)
    first, second = results
    # Stopped at the third skip in a row (steps 4, 5, 6), naming the cause and the step.
    assert first["stopped"][0] == second["stopped"][0] == 6
    assert "3 consecutive optimizer steps skipped" in first["stopped"][1]
    assert "step 7: loss" in first["stopped"][1] and "--max_skipped_steps 3" in first["stopped"][1]
    assert first["skipped"] == second["skipped"] == [0, 1, 2, 2, 3, 4]
    for result in results:
        weights = result["weights"]
        for name, tensor in weights[0].items():
            assert torch.isfinite(tensor).all(), name
            # Steps 1 and 2 skipped: the weights of step 0; step 3 trains; 4 and 5 skipped again.
            for step in (1, 2):
                assert torch.equal(weights[step][name], tensor), (step, name)
            for step in (4, 5):
                assert torch.equal(weights[step][name], weights[3][name]), (step, name)
        assert any(not torch.equal(weights[3][n], t) for n, t in weights[0].items())  # training went on
        # The linear schedule advanced only on the two real updates.
        assert result["lr"][1] == result["lr"][2] == result["lr"][0]
        assert result["lr"][3] < result["lr"][0]
        assert all(torch.isnan(torch.tensor(result["grad_norm"][s])) for s in (1, 2, 4, 5))
    for step in range(6):
        for name, tensor in first["weights"][step].items():
            assert torch.equal(tensor, second["weights"][step][name]), (step, name)
    # The NaN weight of rank 1 is named on both ranks; nothing written, step 1's checkpoint kept.
    for result in results:
        assert all(r is not None and "decoder.final_layernorm.weight (rank 1)" in r for r in result["refusals"])
        assert result["checkpoints"] == [1]
    assert not Path(tmp_path / "hf").exists()
