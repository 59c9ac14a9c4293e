"""A trainable model parks its weights, gradients and optimizer state in host memory and takes them
back (``--megatron_enable_sleep``: what the actor and critic do while colocated engines generate).

The parking works on storages (``engine/runtime/offload.py``), the same on CPU as on GPU: parked,
every storage of a part is empty; restored, training goes on exactly as if nothing had moved
(DP=2 with the distributed optimizer, fp32 and bf16: the fp32 main parameters are views of the
weights in one case and copies in the other). A checkpoint or a train step while parked takes the
state back first.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_parallel_equivalence import _microbatches

STEPS = 4


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _train(rank, world_size, path, ckpt_dir, bf16, park):
    from megatron.core import tensor_parallel

    from engine.runtime.checkpoint import CheckpointConfig
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.offload import _grad_tensors, _optimizer_tensors
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig

    engine = TrainingEngine(EngineConfig(
        pretrain=path, build=ModelBuildConfig(bf16=bf16),
        optim=OptimConfig(learning_rate=1e-3, lr_warmup_ratio=0.0, lr_scheduler="constant")), total_steps=STEPS)
    batches = [{**b, "loss_mask": torch.ones_like(b["labels"])} for b in _microbatches(engine.vocab_size)]
    batches = batches[rank::world_size]  # each DP rank its own half
    scale = engine.loss_scale(batches)

    def loss_fn(logits, batch):
        loss_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"]).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": batch["loss_mask"].sum()}

    losses, moved, left = [], [], []
    for step in range(STEPS):
        losses.append(engine.train_step(batches, loss_fn, normaliser_key="num_tokens").metrics["loss"])
        if not park:
            continue
        # As the RL loop does: gradients and optimizer before the weight sync, the weights after it.
        parked = {**engine.park_training_state(("grads", "optimizer")), **engine.park_training_state(("weights",))}
        moved.append(parked)
        left.append({"weights": _storage_bytes(engine.model.parameters()),
                     "grads": _storage_bytes(_grad_tensors(engine.ddp_model)),
                     "optimizer": _storage_bytes(_optimizer_tensors(engine.optimizer))})
        if step == 1:
            engine.save_checkpoint(CheckpointConfig(ckpt_path=ckpt_dir), step + 1, {"step": step + 1})
        elif step == 2:
            engine.restore_training_state()  # explicitly; the other steps restore inside train_step
    engine.restore_training_state()  # a parked tensor must not be read
    weights = {name: p.detach().float().clone() for name, p in engine.model.named_parameters()}
    numel = sum(p.numel() for p in engine.model.parameters())
    return {"losses": losses, "weights": weights, "moved": moved, "left": left, "numel": numel}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_parked_training_state_comes_back_exactly(tiny_models, tmp_path, bf16):
    args = (tiny_models["llama"], str(tmp_path / "ckpt"), bf16)
    plain = run_distributed(_train, 2, args=(*args, False), timeout=300)
    parked = run_distributed(_train, 2, args=(*args, True), timeout=300)
    for rank in range(2):
        assert parked[rank]["losses"] == plain[rank]["losses"]
        for name, weight in plain[rank]["weights"].items():
            torch.testing.assert_close(parked[rank]["weights"][name], weight, atol=0, rtol=0, msg=name)
        numel, width = parked[rank]["numel"], 2 if bf16 else 4
        for moved, left in zip(parked[rank]["moved"], parked[rank]["left"]):
            assert left == {"weights": 0, "grads": 0, "optimizer": 0}  # nothing of the state stays behind
            assert moved["weights"] >= width * numel
            assert moved["grads"] >= 4 * numel  # fp32 main grads
            # Adam's two moments of this rank's shard (about half), plus (bf16) its fp32 main parameters.
            assert moved["optimizer"] >= 0.95 * (12 if bf16 else 8) * numel / 2
    assert (tmp_path / "ckpt").exists()  # saved while parked: the state came back for it
