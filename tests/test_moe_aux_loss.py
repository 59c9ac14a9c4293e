"""``--aux_loss_coef`` means what it means in OpenRLHF: the loss is the LM loss plus the
coefficient times the ``aux_loss`` HF Mixtral returns (``models/moe_aux.py``).

The oracle is HF transformers on the same weights and tokens (one row padded, so the padding
mask matters): the logged ``aux_loss`` equals HF's, and every gradient equals the gradient of
``token-mean CE + coef x aux_loss`` in HF, at EP=1, EP=2 (two ranks with their own data: the
mean of the two ranks' aux losses), TP=2 with sequence parallelism (each rank routes half the
tokens) and under full activation recompute. With the coefficient 0 the gradients are HF's LM-only ones.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

COEF = 0.5  # large enough that a wrong aux gradient shows well above the fp32 noise
SEQ = 12
LAYOUTS = {"ep1": (1, dict()), "ep2": (2, dict(expert_model_parallel_size=2)), "dp2": (2, dict()),
           "tp2_sp": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
           # experts whole on each TP rank (expert TP 1): the TP ranks are the experts' data-parallel ranks
           "tp2_sp_etp1": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=1)),
           "ep2_tp2_sp": (4, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2)),
           "cp2": (2, dict(context_parallel_size=2)),  # each rank routes its zigzag half of the sequence
           "recompute": (1, dict())}  # full activation recompute: the routers run again inside backward
GRAD_ATOL = 2e-5


def _rows(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Two rows; the second is padded after 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (2, SEQ), generator=g)
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, 8:] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.roll(input_ids, -1, dims=1)
    loss_mask = torch.roll(attention_mask, -1, dims=1).float()
    loss_mask[:, -1] = 0  # the last position has no next token
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "attention_mask": attention_mask,
            "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous()}


def _data_parallel_size(layout: str) -> int:
    """EP ranks are data-parallel ranks (each its own batch); TP ranks share one."""
    world, parallel = LAYOUTS[layout]
    return world // (parallel.get("tensor_model_parallel_size", 1) * parallel.get("context_parallel_size", 1))


def _ours(rank, world_size, path, layout, coef):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from models.weights import iter_hf_weights
    from parallel.config import ParallelConfig

    # Without the distributed optimizer every rank keeps the whole averaged gradient in main_grad.
    build = ModelBuildConfig(aux_loss_coef=coef, gradient_checkpointing=layout == "recompute")
    engine = TrainingEngine(EngineConfig(
        pretrain=path, parallel=ParallelConfig(**LAYOUTS[layout][1]), build=build,
        optim=OptimConfig(max_norm=0.0, lr_warmup_ratio=0.0, use_distributed_optimizer=False)))
    batch = _rows(engine.vocab_size, engine.data_parallel_rank)
    scale = engine.loss_scale([batch])

    def loss_fn(logits, data):
        loss_sum = (tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"]) * data["loss_mask"]).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": data["loss_mask"].sum()}

    metrics = engine.train_step([batch], loss_fn, normaliser_key="num_tokens").metrics
    grads = dict(iter_hf_weights(engine.model, engine.adapter, tensor_of=lambda p: p.main_grad))
    return metrics, grads


def _hf_reference(path: str, layout: str, coef: float, tmp_path) -> tuple[float, dict[str, torch.Tensor]]:
    """HF's mean aux loss over the ranks' batches and the gradients of token-mean CE + coef x aux,
    under the on-disk tensor names (written by save_pretrained with the gradients as values)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seeds = range(_data_parallel_size(layout))
    ce_sum, tokens, aux = 0.0, 0.0, []
    for seed in seeds:
        rows = _rows(model.config.vocab_size, seed)
        out = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], output_router_logits=True)
        mask = rows["loss_mask"].bool()
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(out.logits[mask], rows["labels"][mask], reduction="sum")
        tokens += float(mask.sum())
        aux.append(out.aux_loss)
    mean_aux = sum(aux) / len(aux)
    (ce_sum / tokens + coef * mean_aux).backward()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.grad)
    model.save_pretrained(tmp_path / "grads")
    return float(mean_aux), load_file(str(tmp_path / "grads" / "model.safetensors"))


@pytest.mark.parametrize("coef", [COEF, 0.0], ids=["coef", "no_coef"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_aux_loss_and_gradients_equal_hf(tiny_models, tmp_path, layout, coef):
    path = tiny_models["mixtral"]
    results = run_distributed(_ours, LAYOUTS[layout][0], args=(path, layout, coef), timeout=300)
    hf_aux, hf_grads = _hf_reference(path, layout, coef, tmp_path)
    for metrics, _ in results:
        assert metrics["aux_loss"] == pytest.approx(hf_aux, rel=1e-5)  # logged whatever the coefficient
        assert metrics["moe/max_expert_load"] >= 1.0 and metrics["moe/load_cv"] >= 0.0
    grads = {name: grad for _, rank_grads in results for name, grad in rank_grads.items()}
    assert sorted(grads) == sorted(hf_grads)
    for name, expected in hf_grads.items():
        torch.testing.assert_close(grads[name], expected, atol=GRAD_ATOL, rtol=1e-4, msg=name)
    router = [n for n in hf_grads if n.endswith("block_sparse_moe.gate.weight")]
    assert router and all(hf_grads[n].abs().sum() > 0 for n in router)


def _build_error(rank, world_size, path, parallel, build):
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    try:
        TrainingEngine(EngineConfig(pretrain=path, parallel=ParallelConfig(**parallel), build=ModelBuildConfig(**build)))
    except ValueError as err:
        return str(err)
    return None


def test_the_coefficient_is_refused_where_it_cannot_mean_that(tiny_models):
    (dense,) = run_distributed(_build_error, 1, args=(tiny_models["llama"], {}, {"aux_loss_coef": 0.01}), timeout=120)
    assert "--aux_loss_coef 0.01: the model has no experts" in dense
    (z_dense,) = run_distributed(_build_error, 1, args=(tiny_models["llama"], {}, {"router_z_loss_coef": 0.1}),
                                 timeout=120)
    assert "--router_z_loss_coef 0.1: the model has no experts" in z_dense
    staged = run_distributed(_build_error, 2, args=(tiny_models["mixtral"], {"pipeline_model_parallel_size": 2},
                                                    {"aux_loss_coef": 0.01}), timeout=120)
    assert all("--aux_loss_coef with --pipeline_model_parallel_size > 1" in e for e in staged)


def _imbalanced_mixtral(base: str, out) -> str:
    """The tiny Mixtral with every token routed to experts 0 and 1: a common direction added to
    every embedding dominates the normalised hidden states, and each router favours 0 and 1 along it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        direction = torch.nn.functional.normalize(torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
        embed += 0.2 * direction
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate.copy_(gate * 0.1 + torch.outer(torch.tensor([0.5, 0.5, -0.5, -0.5]), direction))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def _aux_curve(rank, world_size, path, coef):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig

    engine = TrainingEngine(EngineConfig(pretrain=path, build=ModelBuildConfig(aux_loss_coef=coef), optim=OptimConfig(
        learning_rate=1e-2, lr_warmup_ratio=0.0, lr_scheduler="constant")), total_steps=8)
    curve = []
    for step in range(8):
        batch = _rows(engine.vocab_size, step)
        scale = engine.loss_scale([batch])

        def loss_fn(logits, data, scale=scale):
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"]) * data["loss_mask"]
            return losses.sum() * scale, {"loss_sum": losses.sum().detach(), "num_tokens": data["loss_mask"].sum()}

        metrics = engine.train_step([batch], loss_fn, normaliser_key="num_tokens").metrics
        curve.append((metrics["aux_loss"], metrics["moe/load_cv"]))
    return curve


def test_the_aux_loss_balances_an_imbalanced_router(tiny_models, tmp_path):
    path = _imbalanced_mixtral(tiny_models["mixtral"], tmp_path / "imbalanced")
    (balanced,) = run_distributed(_aux_curve, 1, args=(path, 1.0), timeout=300)
    (unbalanced,) = run_distributed(_aux_curve, 1, args=(path, 0.0), timeout=300)
    (aux_start, cv_start), (aux_end, _) = balanced[0], balanced[-1]
    assert aux_start > 3.5 and cv_start == 1.0  # at init experts 0 and 1 take every token (even routing: 2.0, 0)
    assert aux_end < aux_start - 1.0, balanced
    # Training alone moves the routing too; with the coefficient the aux loss reaches its floor (2.0, top-2).
    assert aux_end < 2.05 and aux_end < unbalanced[-1][0] - 0.3, (balanced, unbalanced)
