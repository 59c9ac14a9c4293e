"""DeepSeek-V3 (issue 30): multi-head latent attention and sigmoid-routed MoE give HF transformers'
logits (fp32) under TP=2, PP=2, CP=2 (ring attention), EP=2 and EP=2 x TP=2 with sequence parallelism,
padded and packed; the HF <-> Megatron conversion round-trips bit-exact (MTP layers carried); the HF
export loads in transformers with the same logits; SFT at EP=2 equals EP=1; the router-bias update
follows Megatron's rule and reaches the export.

Two tiny models from transformers' own ``DeepseekV3Config``, odd sizes (``models.tiny``): "moe" has a
q LoRA rank, YaRN rope with mscale, HF's interleaved rotary layout, layer 0 dense and MoE layers with
group-limited routing (2 groups), a random ``e_score_correction_bias`` and a shared expert; "dense" has
no q LoRA rank (plain ``q_proj``), default rope in HF's halves layout, only dense layers and Moonlight's
rms_norm_eps (1e-5; the latent norms keep 1e-6); "v2" is a
DeepSeek-V2 (softmax routing, group_limited_greedy, two shared experts). All have v heads (10) narrower
than the q/k heads (12 + 8 rotary).
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

ATOL = 1e-4  # fp32; observed differences are ~1e-6
PACKED_LENGTHS = (7, 12, 5)  # odd lengths: CP pads each sample to a multiple of 2 x CP
#: (name, TP, PP, CP, EP) on 4 ranks; the remaining factor is data parallel. "_sp": sequence parallel
#: (MLA gathers and scatters its latents along the sequence).
LAYOUTS = (("tp2", 2, 1, 1, 1), ("pp2", 1, 2, 1, 1), ("cp2", 1, 1, 2, 1), ("ep2", 1, 1, 1, 2),
           ("ep2_tp2_sp", 2, 1, 1, 2))


@pytest.fixture(scope="module")
def deepseek_models(tmp_path_factory) -> dict[str, str]:
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("deepseek")
    return {
        "moe": build_tiny_model("deepseek_v3", root / "moe", seed=3, init_std=0.1),
        "dense": build_tiny_model("deepseek_v3", root / "dense", seed=4, init_std=0.1, q_lora_rank=None,
                                  rope_interleave=False, first_k_dense_replace=4, rms_norm_eps=1e-5,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "v2": build_tiny_model("deepseek_v2", root / "v2", seed=5, init_std=0.1),
    }


def _padded_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def _packed_samples(vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab_size, (n,), generator=generator) for n in PACKED_LENGTHS]


def _hf_logits(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    with torch.no_grad():
        padded = model(_padded_ids(vocab)).logits
        packed = torch.cat([model(ids[None]).logits[0] for ids in _packed_samples(vocab)])
    return {"padded": padded, "packed": packed}


def _batches(vocab_size: int) -> tuple[dict, dict]:
    from engine.data.packing import pack_padded_rows

    ids = _padded_ids(vocab_size)
    padded = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    samples = _packed_samples(vocab_size)
    width = max(PACKED_LENGTHS)
    rows = torch.zeros(len(samples), width, dtype=torch.long)
    for row, sample in enumerate(samples):
        rows[row, :len(sample)] = sample
    mask = (torch.arange(width)[None] < torch.tensor(PACKED_LENGTHS)[:, None]).long()
    packed = pack_padded_rows({"input_ids": rows, "attention_mask": mask}, multiple=4)
    packed.pop("attention_mask")
    return padded, packed


def _logits_in_layouts(rank, world_size, model_dirs, layouts):
    """Every layout in one spawn: the parallel state is rebuilt per layout. Returns, per layout and
    model, the full padded and packed logits from the rank that holds them (or nothing)."""
    from megatron.core import parallel_state as ps

    from engine.runtime.schedule import forward_logits
    from models.builder import build_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.context_parallel import zigzag_gather, zigzag_gather_packed
    from parallel.initialize import initialize_parallel

    results = {}
    for name, tp, pp, cp, ep, *more in layouts:  # more: other ParallelConfig fields (an uneven pipeline split)
        config = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                context_parallel_size=cp, expert_model_parallel_size=ep,
                                sequence_parallel=name.endswith("_sp"), **(more[0] if more else {}))
        ctx = initialize_parallel(config)
        for arch, path in model_dirs.items():
            adapter = load_adapter(path)
            model = build_model(adapter, config)
            load_hf_weights(model, adapter, path)
            model.eval()
            padded, packed = _batches(adapter.vocab_size)
            logits = forward_logits(model, [padded, packed], vocab_size=adapter.vocab_size)
            if logits is None:
                continue
            cp_group = ps.get_context_parallel_group()
            full_padded = zigzag_gather(logits[0], dim=1, cp_group=cp_group)
            full_packed = zigzag_gather_packed(logits[1], packed["cu_seqlens"], dim=1, cp_group=cp_group)
            if ctx.tp_rank == 0 and ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                results[(name, arch)] = {"padded": full_padded, "packed": full_packed[0, :sum(PACKED_LENGTHS)]}
    return results


def test_logits_equal_hf_in_every_layout(deepseek_models):
    per_rank = run_distributed(_logits_in_layouts, 4, args=(deepseek_models, LAYOUTS), timeout=600)
    merged = {key: value for result in per_rank for key, value in result.items()}
    assert set(merged) == {(layout[0], arch) for layout in LAYOUTS for arch in deepseek_models}
    for arch, path in deepseek_models.items():
        expected = _hf_logits(path)
        for layout in LAYOUTS:
            for kind in ("padded", "packed"):
                torch.testing.assert_close(merged[(layout[0], arch)][kind], expected[kind], atol=ATOL, rtol=0,
                                           msg=f"{arch} {layout[0]} {kind}")


def _add_mtp_layer(path: str, num_layers: int) -> dict[str, torch.Tensor]:
    """Tensors of one multi-token-prediction layer (layer ``num_layers``, named as DeepSeek-V3 ships them)
    added to the checkpoint: HF's model ignores them, conversion must carry them."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(5)
    p = f"model.layers.{num_layers}."
    mtp = {p + "enorm.weight": torch.randn(48, generator=generator),
           p + "hnorm.weight": torch.randn(48, generator=generator),
           p + "eh_proj.weight": torch.randn(48, 96, generator=generator),
           p + "self_attn.kv_a_layernorm.weight": torch.randn(20, generator=generator),
           p + "shared_head.norm.weight": torch.randn(48, generator=generator)}
    file = f"{path}/model.safetensors"
    save_file({**load_file(file), **mtp}, file, metadata={"format": "pt"})
    return mtp


def test_conversion_round_trips_bit_exact_and_exports_load_in_hf(deepseek_models, tmp_path):
    """HF -> Megatron (MoE model at PP=2 x EP=2 with an MTP layer; dense at TP=2, its rotary rows
    permuted on load) -> HF at one rank: every tensor bit-exact, the MTP layer carried unchanged, the
    router's e_score_correction_bias included; transformers loads the export with identical logits."""
    import shutil

    from tests.test_convert import _convert, _tensors

    sources = {"moe": str(shutil.copytree(deepseek_models["moe"], tmp_path / "moe-src")),
               "dense": deepseek_models["dense"]}
    mtp = _add_mtp_layer(sources["moe"], num_layers=4)
    layouts = {"moe": ["--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "2"],
               "dense": ["--tensor_model_parallel_size", "2"]}
    for arch, layout in layouts.items():
        source, mcore, exported = sources[arch], tmp_path / f"{arch}-mcore", tmp_path / f"{arch}-hf"
        _convert("tools.convert.hf_to_mcore", "--hf_path", source, "--save_path", str(mcore), *layout)
        _convert("tools.convert.mcore_to_hf", "--load_path", str(mcore), "--save_path", str(exported))
        original, roundtrip = _tensors(source), _tensors(str(exported))
        assert sorted(roundtrip) == sorted(original), arch
        for name, tensor in original.items():
            assert torch.equal(roundtrip[name], tensor), f"{arch}: {name} differs"
        logits, expected = _hf_logits(str(exported)), _hf_logits(source)
        assert all(torch.equal(logits[kind], expected[kind]) for kind in expected), arch
        if arch == "moe":
            assert set(mtp) <= set(original) and any(n.endswith("e_score_correction_bias") for n in original)


def test_sft_at_expert_parallel_2_equals_one_process(deepseek_models, tmp_path):
    """Three SFT steps of the MoE model (dense layer 0, MoE layers with the fixed router bias and the shared
    expert): EP=2 (each rank its own experts and data) gives the single process's loss curve."""
    from engine.tasks.arithmetic import make_rows, write_jsonl
    from tests.test_sft import _assert_same_curve, _run

    write_jsonl(make_rows(64, max_operand=9, seed=0), tmp_path / "train.jsonl")
    write_jsonl(make_rows(8, max_operand=9, seed=1), tmp_path / "test.jsonl")
    loop = {"train_batch_size": 8, "micro_train_batch_size": 2, "max_steps": 3}
    single = _run(deepseek_models["moe"], str(tmp_path), {}, 1, loop=loop)
    expert_parallel = _run(deepseek_models["moe"], str(tmp_path), {"expert_model_parallel_size": 2}, 2, loop=loop)
    _assert_same_curve(expert_parallel["loss"], single["loss"])
    assert single["loss"][-1] < single["loss"][0]


@pytest.mark.parametrize("field,value,message", [
    ("norm_topk_prob", False, "norm_topk_prob=false is not supported with sigmoid routing"),
    ("attention_bias", True, "attention_bias=true is not supported"),
    ("topk_group", 2, None),  # every group chosen: no group limit, accepted
    ("n_group", 4, "num_experts_per_tok // topk_group = 2"),  # accepted: top-2 sums, as HF
    ("num_experts_per_tok", 3, "num_experts_per_tok // topk_group = 3 is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 128,
                         "mscale_all_dim": 1.0, "mscale": 0.0}, "mscale_all_dim but no mscale"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "'linear' is not supported"),
    ("moe_layer_freq", 2, "moe_layer_freq=2 is not supported"),  # a key of DeepSeek's remote code (Moonlight: 1)
])
def test_unsupported_configs_are_refused_naming_the_field(field, value, message):
    from models.registry import get_adapter
    from models.tiny import tiny_config

    config = tiny_config("deepseek_v3", 100, **{field: value})
    if message is None or "= 2" in message:
        adapter = get_adapter(config)  # accepted
        assert adapter.num_experts == 8
        return
    with pytest.raises(ValueError, match=message):
        get_adapter(config)


def test_latent_norms_keep_hfs_epsilon_when_rms_norm_eps_differs():
    """Moonlight's rms_norm_eps is 1e-5, HF's latent norms stay at 1e-6: the local spec builds Megatron's q / kv
    latent norms with 1e-6 (whatever epsilon megatron-core passes), the layer norms with 1e-5; Transformer
    Engine's spec (one epsilon for the norms it fuses) is refused. (The "dense" model above, at 1e-5, gives
    HF's logits in every layout.)"""
    from megatron.core.transformer.spec_utils import build_module

    from models.builder import ModelBuildConfig, transformer_config
    from models.layer_spec import _local_layer, _te_layer
    from models.registry import get_adapter
    from models.tiny import tiny_config
    from parallel.config import ParallelConfig

    adapter = get_adapter(tiny_config("deepseek_v3", 100, rms_norm_eps=1e-5))
    options = adapter.layer_spec_options()
    config = transformer_config(adapter, ParallelConfig(), ModelBuildConfig())
    layer = _local_layer(options, moe=False, normalization="RMSNorm", ring_head_stride=None).submodules
    attention = layer.self_attention.submodules
    for norm in (attention.q_layernorm, attention.kv_layernorm):
        assert build_module(norm, config=config, hidden_size=20, eps=config.layernorm_epsilon).eps == 1e-6
    assert build_module(layer.input_layernorm, config=config, hidden_size=48, eps=config.layernorm_epsilon).eps == 1e-5
    assert get_adapter(tiny_config("deepseek_v3", 100)).layer_spec_options().latent_norm_eps is None
    with pytest.raises(ValueError, match="epsilon 1e-06 .* needs --transformer_impl local"):
        _te_layer(options, moe=False, ring_head_stride=None, moe_grouped_gemm=False)


def test_tensor_parallel_sizes_the_latents_do_not_split_by_are_refused():
    from models.registry import get_adapter
    from models.tiny import tiny_config

    adapter = get_adapter(tiny_config("deepseek_v3", 100))  # q_lora_rank 24, kv_lora_rank + rope 28
    adapter.check_parallel(tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match=r"--tensor_model_parallel_size 16 does not divide deepseek_v3.s q_lora_rank"):
        adapter.check_parallel(tensor_model_parallel_size=16)
    with pytest.raises(ValueError, match=r"kv_lora_rank \+ qk_rope_head_dim \(28\)"):
        get_adapter(tiny_config("deepseek_v3", 100, q_lora_rank=None)).check_parallel(tensor_model_parallel_size=8)


def test_the_router_bias_and_rotary_layout_change_hf_logits(deepseek_models, tmp_path):
    """The equalities above can fail: zeroing ``e_score_correction_bias`` (expert choice) or flipping
    ``rope_interleave`` changes HF's logits by far more than the tolerance."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    base = _hf_logits(deepseek_models["moe"])["padded"]
    unbiased = shutil.copytree(deepseek_models["moe"], tmp_path / "unbiased")
    tensors = load_file(str(unbiased / "model.safetensors"))
    save_file({n: torch.zeros_like(t) if n.endswith("e_score_correction_bias") else t for n, t in tensors.items()},
              str(unbiased / "model.safetensors"), metadata={"format": "pt"})
    assert (_hf_logits(str(unbiased))["padded"] - base).abs().max() > 20 * ATOL
    flipped = shutil.copytree(deepseek_models["moe"], tmp_path / "flipped")
    config = AutoConfig.from_pretrained(flipped)
    config.rope_interleave = False
    config.save_pretrained(flipped)
    assert (_hf_logits(str(flipped))["padded"] - base).abs().max() > 20 * ATOL


RATE = 0.01


def _train_step_with_bias_update(rank, world_size, path, save_dir):
    """One SFT-style step at --moe_router_bias_update_rate RATE; the router biases before and after, the
    HF export's e_score_correction_bias, and what a fresh engine loading the saved checkpoint holds."""
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig, build_model
    from models.mcore_checkpoint import load_model, save_model
    from models.weights import iter_hf_weights

    engine = TrainingEngine(EngineConfig(pretrain=path, build=ModelBuildConfig(moe_router_bias_update_rate=RATE),
                                         optim=OptimConfig(lr_warmup_ratio=0.0)))

    def biases(model):
        return {name: t.clone() for name, t in iter_hf_weights(model, engine.adapter)
                if name.endswith("e_score_correction_bias")}

    before = biases(engine.model)
    ids = _padded_ids(engine.vocab_size)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(ids.shape[1]).expand_as(ids),
             "loss_mask": torch.ones(ids.shape)}
    scale = engine.loss_scale([batch])

    def loss_fn(logits, data):
        loss_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"]).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": torch.tensor(float(ids.numel()))}

    engine.train_step([batch], loss_fn, normaliser_key="num_tokens")
    after = biases(engine.model)
    trainable = {name for name, p in engine.model.named_parameters() if p.requires_grad}
    engine.save_hf(f"{save_dir}/hf")
    # The Megatron checkpoint (what a resume loads) holds the moved bias: a fresh model gets it back.
    save_model(engine.model, f"{save_dir}/mcore", adapter=engine.adapter)
    fresh = build_model(engine.adapter, engine.ctx.config)
    load_model(fresh, f"{save_dir}/mcore")
    return before, after, trainable, biases(fresh)


def _hf_expert_loads(path: str) -> dict[str, torch.Tensor]:
    """Tokens per expert of each MoE layer of HF's model on the step's tokens (its routers' top-k)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loads = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            def hook(module, args, output, name=name):
                loads[name] = torch.bincount(output[2].flatten(), minlength=module.num_experts).float()
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(_padded_ids(model.config.vocab_size))
    return {f"{name}.e_score_correction_bias": load for name, load in loads.items()}


def test_router_bias_update_follows_megatrons_rule_and_is_exported(deepseek_models, tmp_path):
    """--moe_router_bias_update_rate: after one step every layer's bias moved by RATE x sign(mean load -
    the expert's load), the loads being HF's routing of the step's tokens; the bias is a buffer (no
    optimizer state); the HF export and the Megatron checkpoint carry the moved bias."""
    from tests.test_convert import _tensors

    (before, after, trainable, reloaded), = run_distributed(_train_step_with_bias_update, 1,
                                                            args=(deepseek_models["moe"], str(tmp_path)), timeout=300)
    loads = _hf_expert_loads(deepseek_models["moe"])
    assert sorted(loads) == sorted(before) and len(loads) == 3
    for name, load in loads.items():
        expected = before[name] + RATE * torch.sign(load.mean() - load)
        torch.testing.assert_close(after[name], expected, atol=1e-7, rtol=0, msg=name)
        assert not torch.equal(after[name], before[name])
    assert not any("expert_bias" in name for name in trainable)
    exported = _tensors(str(tmp_path / "hf"))
    for name, bias in after.items():
        assert torch.equal(exported[name], bias) and torch.equal(reloaded[name], bias)


def test_router_flags_are_refused_where_they_cannot_act():
    from models.builder import ModelBuildConfig, check_router_options
    from models.registry import get_adapter
    from models.tiny import tiny_config

    deepseek, mixtral = get_adapter(tiny_config("deepseek_v3", 100)), get_adapter(tiny_config("mixtral", 100))
    check_router_options(ModelBuildConfig(moe_router_bias_update_rate=0.01), deepseek)
    with pytest.raises(ValueError, match=r"--moe_router_bias_update_rate 0.01: the model's router has no expert bias"):
        check_router_options(ModelBuildConfig(moe_router_bias_update_rate=0.01), mixtral)
    with pytest.raises(ValueError, match="--moe_router_bias_update_rate must be >= 0"):
        check_router_options(ModelBuildConfig(moe_router_bias_update_rate=-1.0), deepseek)
    with pytest.raises(ValueError, match=r"--aux_loss_coef 0.01: HF's deepseek_v3 defines no load-balancing loss"):
        check_router_options(ModelBuildConfig(aux_loss_coef=0.01), deepseek)


MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")
#: LoRA layouts on 2 ranks (experts whole on their ranks: expert TP 1): TP=2 splits MLA's projections, EP=2 the experts.
LORA_LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1},
                "ep2": {"expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}}


def _lora_every_layout(rank, world_size, models, out_root):
    from tests.test_lora import _lora_logits

    return {layout: _lora_logits(rank, world_size, kwargs, models, f"{out_root}/{layout}", merged=layout == "ep2")
            for layout, kwargs in LORA_LAYOUTS.items()}


def assert_moe_lora_equals_peft(models: dict[str, tuple[str, tuple[str, ...]]], tmp_path) -> None:
    """``models``: {arch: (HF dir, --target_modules)}. At TP=2 and EP=2 (one spawn) the LoRA model's logits
    equal HF PEFT's with the exported adapter, which carries a pair per routed expert (PEFT 0.21 maps them onto
    transformers 5's fused experts) and none on the dense MLPs or shared experts; at EP=2 the merged export
    (W + scale B A, each expert from its owner: what the weight sync streams) loads in transformers with
    PEFT's logits, the experts changed and the shared experts not."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.test_convert import _tensors
    from tests.test_lora import _hf_logits as hf_logits
    from tests.test_lora import _peft_logits

    per_rank = run_distributed(_lora_every_layout, 2, args=(models, str(tmp_path)), timeout=600)
    for arch, (path, _) in models.items():
        base_logits, base = hf_logits(path), _tensors(path)
        for layout in LORA_LAYOUTS:
            exported = load_file(str(tmp_path / layout / arch / "adapter_model.safetensors"))
            assert any(".mlp.experts.7.down_proj.lora_B" in n for n in exported), f"{arch} {layout}"
            assert not any("shared_experts" in n or ".mlp.gate_proj" in n for n in exported), f"{arch} {layout}"
            expected = _peft_logits(path, str(tmp_path / layout / arch))
            torch.testing.assert_close(per_rank[0][layout][arch], expected, atol=ATOL, rtol=0, msg=f"{arch} {layout}")
            assert (expected - base_logits).abs().max() > 1e-2  # the adapters do change the output
        merged = {name: t for result in per_rank for name, t in result["ep2"][(arch, "merged")].items()}
        assert sorted(merged) == sorted(base)
        changed = {name for name in base if not torch.equal(merged[name], base[name])}
        assert any(".mlp.experts.7.up_proj." in name for name in changed) and not any(
            "shared_experts" in name for name in changed), arch
        merged_dir = shutil.copytree(path, tmp_path / f"{arch}-merged")
        save_file({n: t.contiguous() for n, t in merged.items()}, str(merged_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        # expected: PEFT's logits with the EP=2 export (the last layout)
        torch.testing.assert_close(hf_logits(str(merged_dir)), expected, atol=ATOL, rtol=0, msg=f"{arch} merged")


def test_lora_on_latent_attention_and_experts_equals_peft(deepseek_models, tmp_path):
    """LoRA on every MLA projection (the down-projections split over TP too) and on the routed experts gives
    HF PEFT's logits at TP=2 and EP=2, and the merged export PEFT's (``assert_moe_lora_equals_peft``). The
    expert names adapt the routed experts only, as PEFT means them (the job says what stays frozen); where
    Megatron permutes a projection's rows (HF rotates halves), LoRA on it is refused naming the modules."""
    from models.lora import LoraConfig
    from models.lora.targets import describe_targets, resolve_targets
    from models.registry import load_adapter

    assert_moe_lora_equals_peft({"moe": (deepseek_models["moe"], MLA_TARGETS + EXPERT_TARGETS)}, tmp_path)
    assert describe_targets(load_adapter(deepseek_models["moe"]), ("all-linear",)).endswith(
        "routed experts (a pair per expert): gate_proj up_proj down_proj; frozen: the routers, the dense MLP of "
        "layer 0, the shared experts")
    with pytest.raises(ValueError, match="--target_modules q_proj: LoRA on a projection whose rows Megatron permutes"):
        resolve_targets(load_adapter(deepseek_models["dense"]), LoraConfig(target_modules=("q_proj",)).target_modules)
