"""``--enable_ema``: the actor keeps an EMA of its weights (TP-sharded, fp32), the HF export is the
EMA, and a checkpoint carries it across a resume.

The oracle is a direct EMA of the actor's exported weights after each optimizer step:
``e_0 = w_0, e_k = beta e_(k-1) + (1 - beta) w_k``.
"""
from __future__ import annotations

import torch

from tests.dist_harness import run_distributed
from tests.test_ppo_e2e_critic import _ptx_experience, _ptx_settings

BETA = 0.6
STEPS = 3


def _train_with_ema(rank, world_size, path, experience, out_dir):
    import os

    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.runtime.checkpoint import CheckpointConfig
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from models.weights import iter_hf_weights
    from parallel.config import ParallelConfig

    engine = EngineConfig(pretrain=path, parallel=ParallelConfig(tensor_model_parallel_size=world_size),
                          optim=OptimConfig(learning_rate=1e-3, lr_warmup_ratio=0.0, lr_scheduler="constant"))

    def worker():
        role = MegatronRoleWorker(RoleConfig(name="actor", engine=engine, num_ranks=world_size, trainable=True,
                                             ema_beta=BETA, total_steps=2 * STEPS), rank)
        role.setup((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        return role

    def weights(role):
        return {name: t.clone() for name, t in iter_hf_weights(role.engine.model, role.engine.adapter)}

    ckpt = CheckpointConfig(ckpt_path=f"{out_dir}/ckpt", load_checkpoint=True)
    first = worker()
    snapshots = [weights(first)]
    for step in range(STEPS):
        first.train(experience, "policy", _ptx_settings())
        snapshots.append(weights(first))
        if step == 1:
            first.save_checkpoint(ckpt, step + 1, {"step": step + 1})
    first.save_hf(f"{out_dir}/ema")
    # A second run resumes from the checkpoint after step 2 and repeats step 3: the same EMA.
    second = worker()
    second.resume(ckpt)
    second.train(experience, "policy", _ptx_settings())
    second.save_hf(f"{out_dir}/ema_resumed")
    return snapshots if rank == 0 else None


def test_the_export_is_the_ema_of_the_weights_and_resumes(tiny_models, tmp_path):
    from safetensors.torch import load_file

    path = tiny_models["llama"]
    experience, _ = _ptx_experience(path)
    snapshots = run_distributed(_train_with_ema, 2, args=(path, experience, str(tmp_path)), timeout=300)[0]
    expected = dict(snapshots[0])
    for weights in snapshots[1:]:
        for name, weight in weights.items():
            expected[name] = BETA * expected[name] + (1 - BETA) * weight
    assert any(not torch.equal(expected[n], snapshots[-1][n]) for n in expected)  # the EMA is not the last weights
    for export in ("ema", "ema_resumed"):
        saved = {k: v for f in sorted((tmp_path / export).glob("*.safetensors")) for k, v in load_file(f).items()}
        assert sorted(saved) == sorted(expected)
        for name, value in expected.items():
            torch.testing.assert_close(saved[name], value, atol=1e-6, rtol=1e-5, msg=f"{export}: {name}")
