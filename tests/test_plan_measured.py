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


def _measure(_rank, _world, path, layout, build):
    from tools.plan.measure import measure_sft_steps

    return measure_sft_steps(path, layout, build, micro_batch=MICRO, seq_len=SEQ, num_microbatches=MICROBATCHES)


def _predict(_rank, _world, path, layout, build, dp):
    from tools.plan.measure import predict_sft_step

    return predict_sft_step(path, layout, build, micro_batch=MICRO, seq_len=SEQ, num_microbatches=MICROBATCHES, dp=dp)


TOLERANCE = {"weights": 0.0, "grads": 0.02, "optimizer": 0.02, "activations": 0.10}


@pytest.fixture(scope="module")
def small_mixtral(tmp_path_factory) -> str:
    from models.tiny import build_tiny_model

    return str(build_tiny_model("mixtral", tmp_path_factory.mktemp("plan") / "moe", hidden_size=256,
                                intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                                num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2))


def test_predicted_moe_memory_matches_a_measured_step(small_mixtral):
    """EP=1: every rank routes its own tokens, so the balanced-routing assumption holds exactly."""
    measured = run_distributed(_measure, world_size=1, args=(small_mixtral, {}, {}), timeout=300)[0]
    predicted = run_distributed(_predict, world_size=1, args=(small_mixtral, {}, {}, 1))[0][0]
    for key, tolerance in TOLERANCE.items():
        assert abs(measured[key] - predicted[key]) <= tolerance * predicted[key], (key, measured[key], predicted[key])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_predicted_memory_matches_a_measured_step(name, small_llama):
    world, layout, build = LAYOUTS[name]
    measured = run_distributed(_measure, world_size=world, args=(small_llama, layout, build), timeout=300)
    dp = measured[0]["dp"]
    predicted = run_distributed(_predict, world_size=1, args=(small_llama, layout, build, dp))[0]
    for rank in measured:
        expected = predicted[rank["stage"]]
        for key, tolerance in TOLERANCE.items():
            assert abs(rank[key] - expected[key]) <= tolerance * expected[key], (name, rank["stage"], key, rank[key],
                                                                                  expected[key])
