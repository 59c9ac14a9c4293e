"""The planner's memory per rank against a real training step on CPU (tools/plan/measure.py).

A small Llama (hidden 256, 4 layers, 512 tokens per micro-batch) trains one step at TP / PP /
CP / DP of 1-2, with and without recompute; weights, the gradient buffer and the optimizer state
are counted from the tensors after the step, activations as the peak of what autograd saved.
Tolerances: weights exact, gradients and optimizer within 2% (Megatron pads its buffers),
activations within 10% (small tensors the count leaves out: token ids, masks, rotary tables).
"""
from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed

SEQ, MICRO, MICROBATCHES = 256, 2, 4
LAYOUTS = {
    "tp1": (1, {}, {}),
    "full_recompute": (1, {}, {"recompute_granularity": "full"}),
    "selective_mlp": (1, {}, {"recompute_granularity": "selective", "recompute_modules": ("core_attn", "mlp")}),
    "tp2_sp": (2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
    "pp2": (2, {"pipeline_model_parallel_size": 2}, {}),
    "cp2": (2, {"context_parallel_size": 2}, {}),
    "dp2": (2, {}, {}),
}


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> str:
    from models.tiny import build_tiny_model

    return str(build_tiny_model("llama", tmp_path_factory.mktemp("plan") / "small", hidden_size=256,
                                intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                                num_hidden_layers=4))


def _measure(rank, world, path, layout, build):
    import torch
    from megatron.core import parallel_state as ps

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.trainers.sft import sft_loss_fn
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig
    from tools.plan.measure import measure_training_step

    engine = TrainingEngine(EngineConfig(pretrain=path, parallel=ParallelConfig(**layout),
                                         build=ModelBuildConfig(**build)), total_steps=2)
    generator = torch.Generator().manual_seed(0)
    microbatches = []
    for _ in range(MICROBATCHES // engine.data_parallel_size):
        ids = torch.randint(3, 400, (MICRO, SEQ), generator=generator)
        microbatches.append(dict(input_ids=ids, position_ids=torch.arange(SEQ).expand(MICRO, SEQ).contiguous(),
                                 labels=ids.roll(-1, 1), loss_mask=torch.ones(MICRO, SEQ)))
    measured = measure_training_step(engine, microbatches, sft_loss_fn(engine.loss_scale(microbatches)))
    return {**measured, "stage": ps.get_pipeline_model_parallel_rank(), "dp": engine.data_parallel_size}


def _predict(_rank, _world, path, layout, build, world_size, dp):
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from tools.plan import meta
    from tools.plan.memory import Activations, Grid, RoleState, Shape, activation_bytes, state_bytes

    adapter = load_adapter(path)
    parallel = ParallelConfig(**layout)
    counts = meta.rank_params(adapter, parallel, bf16=False)
    grid = Grid(tp=parallel.tensor_model_parallel_size, pp=parallel.pipeline_model_parallel_size,
                cp=parallel.context_parallel_size, dp=dp, sequence_parallel=parallel.sequence_parallel)
    run = Activations(micro_batch=MICRO, seq_len=SEQ, num_microbatches=MICROBATCHES // dp, bytes_per_value=4,
                      recompute=build.get("recompute_granularity") or "none",
                      recompute_modules=tuple(build.get("recompute_modules") or ("core_attn",)))
    out = []
    for stage in meta.stage_params(counts, grid.pp):
        state = state_bytes(stage, grid, RoleState(trainable=True, bf16=False), counts.param_bytes)
        acts, logits = activation_bytes(stage, Shape.of(adapter, grid.tp), grid, run, moe_layers=0,
                                        last=stage.stage == grid.pp - 1, value_head=False)
        out.append({"weights": state["weights"], "grads": state["grads"], "optimizer": state["optimizer"],
                    "activations": acts + logits})
    return out


TOLERANCE = {"weights": 0.0, "grads": 0.02, "optimizer": 0.02, "activations": 0.10}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_predicted_memory_matches_a_measured_step(name, small_llama):
    world, layout, build = LAYOUTS[name]
    measured = run_distributed(_measure, world_size=world, args=(small_llama, layout, build), timeout=300)
    dp = measured[0]["dp"]
    predicted = run_distributed(_predict, world_size=1, args=(small_llama, layout, build, world, dp))[0]
    for rank in measured:
        expected = predicted[rank["stage"]]
        for key, tolerance in TOLERANCE.items():
            assert abs(rank[key] - expected[key]) <= tolerance * expected[key], (name, rank["stage"], key, rank[key],
                                                                                  expected[key])
