"""The MoE flags every trainer takes (``models/builder.py``): each acts, or is refused with the flag named.

- ``--moe_token_dispatcher_type allgather`` trains exactly like alltoall at EP=2;
- ``--moe_expert_capacity_factor`` drops tokens when small (logits change) and not when large;
- ``--moe_grouped_gemm`` is chosen with the TE spec and refused without it; TE's grouped expert
  weights (``linear_fc1.weight<i>``) map to the same HF tensors as the per-expert ones;
- on a dense model, or in a layout they cannot serve, the flags are errors.
"""
from __future__ import annotations

import pytest
import torch

from models.builder import ModelBuildConfig, check_moe_options, resolve_grouped_gemm
from models.layer_spec import LayerSpecChoice
from parallel.config import ParallelConfig
from tests.dist_harness import run_distributed
from tests.test_moe_aux_loss import _rows


def _step(rank, world_size, path, build_kwargs):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.weights import iter_hf_weights

    engine = TrainingEngine(EngineConfig(
        pretrain=path, parallel=ParallelConfig(expert_model_parallel_size=2), build=ModelBuildConfig(**build_kwargs),
        optim=OptimConfig(max_norm=0.0, lr_warmup_ratio=0.0, use_distributed_optimizer=False)))
    batch = _rows(engine.vocab_size, rank)
    scale = engine.loss_scale([batch])

    def loss_fn(logits, data):
        loss_sum = (tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"]) * data["loss_mask"]).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": data["loss_mask"].sum()}

    loss = engine.train_step([batch], loss_fn, normaliser_key="num_tokens").metrics["loss"]
    return loss, dict(iter_hf_weights(engine.model, engine.adapter, tensor_of=lambda p: p.main_grad))


def test_allgather_dispatcher_trains_like_alltoall(tiny_models):
    path = tiny_models["mixtral"]
    results = {kind: run_distributed(_step, 2, args=(path, {"moe_token_dispatcher_type": kind}), timeout=300)
               for kind in ("alltoall", "allgather")}
    for rank in range(2):
        assert results["allgather"][rank][0] == pytest.approx(results["alltoall"][rank][0], abs=1e-6)
        for name, grad in results["alltoall"][rank][1].items():
            torch.testing.assert_close(results["allgather"][rank][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _logits(rank, world_size, path, capacity):
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.schedule import forward_logits

    build = ModelBuildConfig(moe_expert_capacity_factor=capacity)
    engine = TrainingEngine(EngineConfig(pretrain=path, build=build), trainable=False)
    batch = _rows(engine.vocab_size, 0)
    return forward_logits(engine.model, [batch], vocab_size=engine.vocab_size)[0]


def test_capacity_factor_drops_tokens_only_when_it_binds(tiny_models):
    path = tiny_models["mixtral"]
    (free,) = run_distributed(_logits, 1, args=(path, None), timeout=120)
    (ample,) = run_distributed(_logits, 1, args=(path, 4.0), timeout=120)  # 4 experts: no expert exceeds 4x its share
    (tight,) = run_distributed(_logits, 1, args=(path, 0.25), timeout=120)
    torch.testing.assert_close(ample, free, atol=0, rtol=0)
    assert (tight - free).abs().max() > 1e-3


def test_grouped_gemm_goes_with_the_te_spec(monkeypatch):
    import models.builder as builder

    assert resolve_grouped_gemm(ModelBuildConfig()) is False  # this CPU box: the local spec
    with pytest.raises(ValueError, match="--moe_grouped_gemm needs the Transformer Engine layer spec"):
        resolve_grouped_gemm(ModelBuildConfig(moe_grouped_gemm=True))
    monkeypatch.setattr(builder, "detect_layer_spec", lambda requested: LayerSpecChoice("transformer_engine", "test"))
    assert resolve_grouped_gemm(ModelBuildConfig()) is True
    assert resolve_grouped_gemm(ModelBuildConfig(moe_grouped_gemm=False)) is False


def test_te_grouped_expert_weights_map_to_the_hf_experts(tiny_models):
    from models.registry import load_adapter

    adapter = load_adapter(tiny_models["mixtral"])
    per_expert = adapter.resolve("decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight",
                                 layer_offset=2, expert_offset=2)
    grouped = adapter.resolve("decoder.layers.1.mlp.experts.linear_fc1.weight1", layer_offset=2, expert_offset=2)
    assert grouped == per_expert and grouped[1] == {"layer": 3, "expert": 3}
    fc2 = adapter.resolve("decoder.layers.0.mlp.experts.linear_fc2.weight0", layer_offset=0, expert_offset=0)
    assert fc2[0].hf == ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",)


@pytest.mark.parametrize("flags,parallel,message", [
    ({"moe_expert_capacity_factor": 1.0}, {}, "--moe_expert_capacity_factor 1.0: the model has no experts"),
    ({"moe_token_dispatcher_type": "allgather"}, {}, "--moe_token_dispatcher_type allgather: the model has no experts"),
])
def test_moe_flags_on_a_dense_model_are_errors(flags, parallel, message):
    with pytest.raises(ValueError, match=message):
        check_moe_options(ModelBuildConfig(**flags), ParallelConfig(**parallel), moe=False)


@pytest.mark.parametrize("flags,parallel,message", [
    ({"moe_token_dispatcher_type": "allgather"}, {"pipeline_model_parallel_size": 2},
     "--moe_token_dispatcher_type allgather cannot take the variable sequence lengths"),
    ({"moe_pad_expert_input_to_capacity": True}, {}, "--moe_pad_expert_input_to_capacity needs --moe_expert_capacity"),
    ({"moe_expert_capacity_factor": 0.0}, {}, "--moe_expert_capacity_factor must be > 0"),
])
def test_moe_flags_that_cannot_work_together_are_errors(flags, parallel, message):
    with pytest.raises(ValueError, match=message):
        check_moe_options(ModelBuildConfig(**flags), ParallelConfig(**parallel), moe=True)


def test_expert_tensor_parallel_grid_is_checked_with_the_flags_named():
    grid = ParallelConfig(tensor_model_parallel_size=2, expert_tensor_parallel_size=1, expert_model_parallel_size=4)
    assert grid.minimum_world_size() == 4  # dense: TP 2 x DP 2; experts: EP 4 x expert TP 1
    assert grid.data_parallel_size(4) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by --expert_tensor_parallel_size \(1\) x "
                                         r"--expert_model_parallel_size \(4\)"):
        grid.data_parallel_size(6)
    with pytest.raises(ValueError, match="--expert_tensor_parallel_size must be a positive integer"):
        ParallelConfig(expert_tensor_parallel_size=0)
    with pytest.raises(ValueError, match="--expert_tensor_parallel_size needs a mixture-of-experts model"):
        ParallelConfig(expert_tensor_parallel_size=1).validate_model(num_layers=2, num_attention_heads=4,
                                                                      num_query_groups=2)
    with pytest.raises(ValueError, match=r"--expert_tensor_parallel_size \(3\) must divide the experts' hidden size"):
        ParallelConfig(expert_tensor_parallel_size=3).validate_model(
            num_layers=2, num_attention_heads=4, num_query_groups=2, num_experts=4, expert_ffn_size=256)
