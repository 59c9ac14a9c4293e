"""LoRA on the Megatron model equals HF + PEFT with the exported adapter, in every layout.

B is drawn at random (not PEFT's zeros) so the adapters change the logits; the adapter our model
exports is loaded by ``peft.PeftModel.from_pretrained`` onto the HF base model, whose logits are
the oracle. The same holds at TP=1, TP=2, TP=2 + sequence parallelism, and for Mixtral's experts
at EP=2.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

ATOL = 1e-5
RANK, ALPHA = 4, 8


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def _lora_logits(rank, world_size, parallel_kwargs, models, out_root, merged=False):
    """{arch: logits} of LoRA models (random B) on this layout; each adapter saved under out_root/arch.
    ``merged``: also ``(arch, "merged")``: the HF tensors this rank owns with the adapters merged in (the
    iterator the weight sync streams)."""
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig, build_model
    from models.lora import LoraConfig
    from models.lora.export import save_peft_adapter
    from models.registry import load_adapter
    from models.weights import load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    parallel = ParallelConfig(**parallel_kwargs)
    ctx = initialize_parallel(parallel)
    results = {}
    for arch, (path, targets) in models.items():
        adapter = load_adapter(path)
        lora = LoraConfig(lora_rank=RANK, lora_alpha=ALPHA, target_modules=targets, init_b_std=0.05)
        build = ModelBuildConfig(lora=lora)
        model = build_model(adapter, parallel, build)
        load_hf_weights(model, adapter, path)
        model.eval()
        ids = _ids(adapter.vocab_size)
        logits = forward_logits(model, [{"input_ids": ids, "position_ids": torch.arange(24).expand_as(ids)}],
                                vocab_size=adapter.vocab_size)
        save_peft_adapter(model, adapter, lora, f"{out_root}/{arch}")
        if merged:
            from models.lora import merged_tensor_of
            from models.weights import iter_hf_weights

            results[(arch, "merged")] = dict(iter_hf_weights(model, adapter, tensor_of=merged_tensor_of(model)))
        if logits is not None and ctx.tp_rank == 0:
            results[arch] = logits[0]
    return results


def _peft_logits(base_path: str, adapter_path: str) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path).eval()
    with torch.no_grad():
        return model(_ids(base.config.vocab_size)).logits


EXPERTS = ("q_proj", "w1", "w2", "w3")
LAYOUTS = {
    # name: (world size, ParallelConfig kwargs, {arch: target_modules})
    "tp1": (1, {}, {"llama": ("all-linear",), "qwen2": ("all-linear",), "mixtral": EXPERTS}),
    "tp2": (2, {"tensor_model_parallel_size": 2}, {"llama": ("all-linear",), "qwen2": ("q_proj", "k_proj", "v_proj", "up_proj")}),
    "tp2_experts": (2, {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1, "sequence_parallel": True},
                    {"mixtral": EXPERTS}),
    "tp2_sp": (2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, {"llama": ("all-linear",)}),
    "pp2": (2, {"pipeline_model_parallel_size": 2}, {"llama": ("all-linear",)}),
    "ep2": (2, {"expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}, {"mixtral": ("all-linear",)}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_logits_equal_hf_peft(layout, tiny_models, tmp_path):
    world, parallel_kwargs, targets = LAYOUTS[layout]
    models = {arch: (tiny_models[arch], modules) for arch, modules in targets.items()}
    per_rank = run_distributed(_lora_logits, world, args=(parallel_kwargs, models, str(tmp_path)), timeout=300)
    merged = {arch: logits for result in per_rank for arch, logits in result.items()}
    for arch in targets:
        expected = _peft_logits(tiny_models[arch], str(tmp_path / arch))
        torch.testing.assert_close(merged[arch], expected, atol=ATOL, rtol=0, msg=f"{arch} {layout}")
        assert (expected - _hf_logits(tiny_models[arch])).abs().max() > 1e-2  # the adapters do change the output
        if layout == "tp1":  # our adapter merged by the combiner (Mixtral's experts too) gives the same logits
            from tools.convert.lora_combiner import main

            main(["--model_path", tiny_models[arch], "--lora_path", str(tmp_path / arch),
                  "--output_path", str(tmp_path / f"{arch}_merged")])
            torch.testing.assert_close(_hf_logits(str(tmp_path / f"{arch}_merged")), expected, atol=ATOL, rtol=0)


def _hf_logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_ids(model.config.vocab_size)).logits


def _merged_weights(rank, world_size, path):
    """HF tensors of a q_proj-only LoRA model at TP=2: base and merged (W + scale B A)."""
    from models.builder import ModelBuildConfig, build_model
    from models.lora import LoraConfig, merged_tensor_of
    from models.registry import load_adapter
    from models.weights import iter_hf_weights, load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_parallel(parallel)
    adapter = load_adapter(path)
    lora = LoraConfig(lora_rank=RANK, lora_alpha=ALPHA, target_modules=("q_proj",), init_b_std=0.05)
    model = build_model(adapter, parallel, ModelBuildConfig(lora=lora))
    load_hf_weights(model, adapter, path)
    base = dict(iter_hf_weights(model, adapter))
    merged = dict(iter_hf_weights(model, adapter, tensor_of=merged_tensor_of(model)))
    return base, merged


def test_q_proj_adapter_touches_only_q_rows(tiny_models):
    """Megatron fuses q, k, v per query group into linear_qkv: a q_proj adapter changes q_proj's merged
    weight (by exactly scale B A, as PEFT merges it) and leaves k_proj, v_proj and every other tensor alone."""
    base, merged = run_distributed(_merged_weights, 2, args=(tiny_models["llama"],), timeout=300)[0]
    changed = sorted(name for name in base if not torch.equal(base[name], merged[name]))
    assert changed == sorted(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4))


def _refusals(rank, world_size, models):
    from models.builder import ModelBuildConfig, build_model
    from models.lora import LoraConfig
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_parallel(parallel)
    errors = {}
    for case, (arch, lora) in {"dropout": ("llama", LoraConfig(lora_rank=4, lora_dropout=0.1)),
                               "experts": ("mixtral", LoraConfig(lora_rank=4, target_modules=("w1",)))}.items():
        try:
            build_model(load_adapter(models[arch]), parallel, ModelBuildConfig(lora=lora))
        except ValueError as exc:
            errors[case] = str(exc)
    return errors


def test_what_lora_cannot_do_exactly_is_refused_naming_the_flag(tiny_models):
    from models.builder import ModelBuildConfig, resolve_transformer_impl
    from models.lora import LoraConfig
    from models.lora.targets import resolve_targets
    from models.registry import load_adapter

    errors = run_distributed(_refusals, 2, args=(tiny_models,), timeout=300)[0]
    assert "--lora_dropout 0.1 with tensor parallelism" in errors["dropout"]
    assert "--expert_tensor_parallel_size 1" in errors["experts"]
    with pytest.raises(ValueError, match="--transformer_impl transformer_engine is not supported"):
        resolve_transformer_impl(ModelBuildConfig(transformer_impl="transformer_engine", lora=LoraConfig(lora_rank=4)))
    assert resolve_transformer_impl(ModelBuildConfig(lora=LoraConfig(lora_rank=4))) == "local"
    with pytest.raises(ValueError, match="--target_modules gate_proj: .* choose from q_proj k_proj v_proj o_proj w1 w3 w2"):
        resolve_targets(load_adapter(tiny_models["mixtral"]), ("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match="--load_in_4bit .* needs --lora_rank > 0"):
        LoraConfig(load_in_4bit=True)
    from engine.cli import train_ppo_ray

    job = train_ppo_ray.parse_args(["--pretrain", tiny_models["llama"], "--prompt_data", "p.jsonl", "--lora_rank", "4",
                                    "--enable_ema"])
    with pytest.raises(ValueError, match="--enable_ema with --lora_rank is not supported"):
        train_ppo_ray.check_job(job)
