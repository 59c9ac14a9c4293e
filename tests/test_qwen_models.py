"""Qwen3, Qwen3-MoE and Qwen2-MoE (``models/qwen3.py``, ``qwen3_moe.py``, ``qwen2_moe.py``) against HF
transformers (fp32) on the same weights, in every layout: the logits of a padded and of a packed
batch equal HF's at TP=2, PP=2, CP=2, EP=2 and EP=2 x TP=2 (dense Qwen3: TP=2 x PP=2); the HF
checkpoint each layout exports is bit-exact with the source and loads in transformers; the
hf_to_mcore / mcore_to_hf CLIs round-trip bit-exactly through a sharded layout.

Also: the q/k norms' gradients at TP=2 equal HF's (summed over the TP ranks' heads).

One spawn per world size runs every layout and architecture (parallel state is re-initialised
between layouts): the suite's time grows by seconds, not by one spawn per case.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_convert import _convert, _tensors

ATOL = 1e-4  # fp32; observed ~3e-7
PACKED_LENGTHS = (8, 12, 4)  # multiples of 2 x CP: the zigzag split needs no padding
LAYOUTS = {  # name: (world, parallel sizes)
    "tp2": (2, dict(tensor_model_parallel_size=2)),
    "pp2": (2, dict(pipeline_model_parallel_size=2)),
    "cp2": (2, dict(context_parallel_size=2)),
    "ep2": (2, dict(expert_model_parallel_size=2)),
    "ep2_tp2": (4, dict(expert_model_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True)),
    "tp2_pp2": (4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
}
MOE_ONLY = {"ep2", "ep2_tp2"}
DENSE_ONLY = {"tp2_pp2"}  # the dense model's 4-rank layout (it has no experts to split)


def _batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    padded = torch.randint(5, vocab, (2, 24), generator=g)
    packed = torch.randint(5, vocab, (1, sum(PACKED_LENGTHS)), generator=g)
    positions = torch.cat([torch.arange(n) for n in PACKED_LENGTHS])[None]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(PACKED_LENGTHS), 0).tolist()], dtype=torch.int32)
    return [{"input_ids": padded, "position_ids": torch.arange(24).expand(2, 24)},
            {"input_ids": packed, "position_ids": positions, "cu_seqlens": cu}]


def _wanted(layout: str, arch: str) -> bool:
    if arch == "qwen3_moe_unnormed":  # the routing itself: once, with the experts split over ranks
        return layout == "ep2"
    moe = arch != "qwen3"
    return not ((layout in MOE_ONLY and not moe) or (layout in DENSE_ONLY and moe))


def _every_layout(rank, world_size, layouts, models, export_root):
    from megatron.core import parallel_state as ps

    from engine.runtime.schedule import forward_logits
    from models.builder import build_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights, save_hf_checkpoint
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    results = {}
    for layout in layouts:
        config = ParallelConfig(**LAYOUTS[layout][1])
        initialize_parallel(config)
        for arch, path in models.items():
            if not _wanted(layout, arch):
                continue
            adapter = load_adapter(path)
            model = build_model(adapter, config)
            load_hf_weights(model, adapter, path)
            model.eval()
            logits = forward_logits(model, _batches(adapter.vocab_size), vocab_size=adapter.vocab_size)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                results[(layout, arch)] = (ps.get_context_parallel_rank(), logits)
            save_hf_checkpoint(model, adapter, f"{export_root}/{layout}/{arch}", source_dir=path)
    return results


def _hf_logits(path: str) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    padded, packed = _batches(model.config.vocab_size)
    with torch.no_grad():
        samples = packed["input_ids"].split(list(PACKED_LENGTHS), dim=1)
        return [model(padded["input_ids"]).logits, torch.cat([model(s).logits for s in samples], dim=1)]


def _local(reference: list[torch.Tensor], cp_rank: int, cp_size: int) -> list[torch.Tensor]:
    """HF's logits cut like this CP rank's share (the zigzag of each row; of each packed sample)."""
    from parallel.context_parallel import zigzag_split, zigzag_split_packed

    padded, packed = reference
    cu = _batches(500)[1]["cu_seqlens"]
    return [zigzag_split(padded, dim=1, cp_rank=cp_rank, cp_size=cp_size),
            zigzag_split_packed(packed, cu, dim=1, cp_rank=cp_rank, cp_size=cp_size)[0]]


@pytest.mark.parametrize("world", [2, 4], ids=["two_ranks", "four_ranks"])
def test_logits_and_exports_equal_hf_in_every_layout(world, qwen_models, tmp_path):
    from transformers import AutoModelForCausalLM

    layouts = [name for name, (w, _) in LAYOUTS.items() if w == world]
    per_rank = run_distributed(_every_layout, world, args=(layouts, qwen_models, str(tmp_path)), timeout=600)
    merged: dict = {}
    for result in per_rank:
        for key, value in result.items():
            merged.setdefault(key, []).append(value)
    expected = {key for key in ((lay, arch) for lay in layouts for arch in qwen_models) if _wanted(*key)}
    assert set(merged) == expected
    reference = {arch: _hf_logits(path) for arch, path in qwen_models.items()}
    for (layout, arch), ranks in merged.items():
        cp_size = LAYOUTS[layout][1].get("context_parallel_size", 1)
        for cp_rank, logits in ranks:
            for ours, hf, kind in zip(logits, _local(reference[arch], cp_rank, cp_size), ("padded", "packed")):
                torch.testing.assert_close(ours, hf, atol=ATOL, rtol=0, msg=f"{arch} {layout} {kind}")
        source, exported = _tensors(qwen_models[arch]), _tensors(str(tmp_path / layout / arch))
        assert sorted(exported) == sorted(source), f"{arch} {layout}"
        assert all(torch.equal(exported[n], t) for n, t in source.items()), f"{arch} {layout}: export differs"
    exported_in = {arch: layout for layout, arch in sorted(merged)}
    for arch, layout in exported_in.items():  # one export per architecture loads in transformers, exactly
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / layout / arch, dtype=torch.float32).eval()
        ids = _batches(loaded.config.vocab_size)[0]["input_ids"]
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, reference[arch][0]), arch


ROUND_TRIPS = {  # through a sharded Megatron checkpoint, exported by one process (resharded)
    "qwen3": ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2"],
    "qwen3_moe": ["--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "2"],
    "qwen2_moe": ["--tensor_model_parallel_size", "2", "--expert_model_parallel_size", "2"],
}


@pytest.mark.parametrize("arch", list(ROUND_TRIPS))
def test_convert_round_trip_is_bit_exact(arch, qwen_models, tmp_path):
    source = qwen_models[arch]
    _convert("tools.convert.hf_to_mcore", "--hf_path", source, "--save_path", str(tmp_path / "mcore"),
             *ROUND_TRIPS[arch])
    _convert("tools.convert.mcore_to_hf", "--load_path", str(tmp_path / "mcore"), "--save_path", str(tmp_path / "hf"))
    original, roundtrip = _tensors(source), _tensors(str(tmp_path / "hf"))
    assert sorted(roundtrip) == sorted(original)
    for name, tensor in original.items():
        assert roundtrip[name].dtype == tensor.dtype and torch.equal(roundtrip[name], tensor), f"{arch}: {name}"


def _aux_every_arch(rank, world_size, paths, layout, coef):
    from tests.test_moe_aux_loss import _ours

    return {arch: _ours(rank, world_size, path, layout, coef) for arch, path in paths.items()}


@pytest.mark.parametrize("layout", ["ep1", "ep2"])
def test_aux_loss_coef_is_hfs_aux_loss_and_gradient(layout, qwen_models, tmp_path):
    """``--aux_loss_coef`` on Qwen3-MoE (a dense layer among the MoE ones: HF pools only the routers)
    and Qwen2-MoE (a gated shared expert): the logged aux loss is HF's ``aux_loss``, every gradient
    that of HF's token-mean CE + coef x aux_loss (``tests/test_moe_aux_loss.py``'s oracle)."""
    from tests.test_moe_aux_loss import COEF, GRAD_ATOL, LAYOUTS, _hf_reference

    paths = {arch: qwen_models[arch] for arch in ("qwen3_moe", "qwen2_moe")}
    results = run_distributed(_aux_every_arch, LAYOUTS[layout][0], args=(paths, layout, COEF), timeout=300)
    for arch, path in paths.items():
        hf_aux, hf_grads = _hf_reference(path, layout, COEF, tmp_path / arch)
        for rank_results in results:
            assert rank_results[arch][0]["aux_loss"] == pytest.approx(hf_aux, rel=1e-5), arch
        grads = {name: grad for rank_results in results for name, grad in rank_results[arch][1].items()}
        assert sorted(grads) == sorted(hf_grads)
        for name, expected in hf_grads.items():
            torch.testing.assert_close(grads[name], expected, atol=GRAD_ATOL, rtol=1e-4, msg=f"{arch} {name}")
        routers = [n for n in hf_grads if n.endswith("mlp.gate.weight")]
        assert len(routers) == 3 if arch == "qwen3_moe" else 2  # MoE layers only
        assert all(hf_grads[n].abs().sum() > 0 for n in routers)


LORA_LAYOUTS = {  # name: (ParallelConfig kwargs, {arch: --target_modules})
    "tp2": (dict(tensor_model_parallel_size=2), {"qwen3": ("all-linear",)}),
    "ep2": (dict(expert_model_parallel_size=2, expert_tensor_parallel_size=1),
            {"qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             "qwen2_moe": ("all-linear",)}),
}


def _lora_every_layout(rank, world_size, models, out_root):
    from tests.test_lora import _lora_logits

    return {layout: _lora_logits(rank, world_size, kwargs, {arch: (models[arch], t) for arch, t in targets.items()},
                                 f"{out_root}/{layout}")
            for layout, (kwargs, targets) in LORA_LAYOUTS.items()}


def _peft_converts_qwen2_moe():
    """PEFT 0.21.2 declares how qwen2_moe's per-expert LoRA maps onto transformers 5's fused experts
    (``_MOE_TARGET_MODULE_MAPPING["qwen2_moe"]``) but never applies it: its model-type table lists
    qwen3_moe (and deepseek_v3...) under the "qwen2_moe" pattern, not qwen2_moe itself (it adds that
    entry for mixtral only). The reference adds it, so PEFT loads the experts' adapters as it does Qwen3-MoE's."""
    from peft.utils import transformers_weight_conversion as conversion

    conversion._MODEL_TO_CONVERSION_PATTERN.setdefault("qwen2_moe", "qwen2_moe")


def test_lora_targets_map_and_the_peft_export_gives_our_logits(qwen_models, tmp_path):
    from models.lora.targets import available_targets, resolve_targets
    from models.registry import load_adapter
    from tests.test_lora import ATOL, _hf_logits, _peft_logits

    qwen2_moe = load_adapter(qwen_models["qwen2_moe"])
    assert available_targets(qwen2_moe) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # As PEFT means them on these architectures: the MLP names adapt the routed experts only.
    assert sorted(resolve_targets(qwen2_moe, ("all-linear",))) == [
        ("linear_fc1", True), ("linear_fc2", True), ("self_attention.linear_proj", False),
        ("self_attention.linear_qkv", False)]
    assert sorted(resolve_targets(load_adapter(qwen_models["qwen3"]), ("gate_proj",))) == [("mlp.linear_fc1", False)]
    _peft_converts_qwen2_moe()
    results = run_distributed(_lora_every_layout, 2, args=(qwen_models, str(tmp_path)), timeout=300)
    for layout, (_, targets) in LORA_LAYOUTS.items():
        merged = {arch: logits for result in results for arch, logits in result[layout].items()}
        for arch in targets:
            expected = _peft_logits(qwen_models[arch], str(tmp_path / layout / arch))
            torch.testing.assert_close(merged[arch], expected, atol=ATOL, rtol=0, msg=f"{arch} {layout}")
            assert (expected - _hf_logits(qwen_models[arch])).abs().max() > 1e-3  # the adapters change the output


def test_what_lora_adapts_on_an_moe_model_is_stated_and_the_router_refused(qwen_models, tiny_models):
    """The same names mean different modules per MoE architecture (as in PEFT): the start-up line says
    which, and what stays frozen; a router name (``gate``) is refused, naming the flag."""
    from models.lora.targets import describe_targets
    from models.registry import load_adapter

    qwen3_moe, qwen2_moe, mixtral = (load_adapter(p) for p in (qwen_models["qwen3_moe"], qwen_models["qwen2_moe"],
                                                               tiny_models["mixtral"]))
    assert describe_targets(qwen3_moe, ("all-linear",)) == (
        "LoRA adapters on attention: q_proj k_proj v_proj o_proj; routed experts (a pair per expert): gate_proj "
        "up_proj down_proj; frozen: the routers, the dense MLP of layer 1")
    assert describe_targets(qwen2_moe, ("q_proj", "down_proj")) == (
        "LoRA adapters on attention: q_proj; routed experts (a pair per expert): down_proj; frozen: the routers, "
        "the dense MLPs of layers 0, 2, the shared experts")
    assert describe_targets(mixtral, ("all-linear",)).endswith("routed experts (a pair per expert): w1 w3 w2; "
                                                                "frozen: the routers")
    for adapter in (qwen3_moe, qwen2_moe, mixtral):
        with pytest.raises(ValueError, match="--target_modules gate: the MoE router gets no adapter"):
            describe_targets(adapter, ("q_proj", "gate"))
    assert describe_targets(load_adapter(qwen_models["qwen3"]), ("all-linear",)) == (
        "LoRA adapters on attention: q_proj k_proj v_proj o_proj; MLPs: gate_proj up_proj down_proj")


def _tp2_grads(rank, world_size, path):
    """``tests/test_moe_aux_loss._ours`` (coefficient 0) at TP=2 without sequence parallelism: each TP rank's
    q/k norm gradient covers its heads only and must be summed over TP (megatron-core does it for
    ``config.qk_layernorm``, which the Qwen3 adapters set)."""
    import tests.test_moe_aux_loss as aux

    aux.LAYOUTS.setdefault("tp2", (2, dict(tensor_model_parallel_size=2)))
    return aux._ours(rank, world_size, path, "tp2", 0.0)


def _hf_lm_grads(path: str, tmp_path) -> dict[str, torch.Tensor]:
    """HF's gradients of the token-mean CE on ``tests/test_moe_aux_loss._rows(vocab, 0)``, on-disk names."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.test_moe_aux_loss import _rows

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = _rows(model.config.vocab_size, 0)
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    mask = rows["loss_mask"].bool()
    torch.nn.functional.cross_entropy(logits[mask], rows["labels"][mask]).backward()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.grad)
    model.save_pretrained(tmp_path / "grads")
    return load_file(str(tmp_path / "grads" / "model.safetensors"))


def test_qk_norm_gradients_under_tensor_parallelism_equal_hf(qwen_models, tmp_path):
    from tests.test_moe_aux_loss import GRAD_ATOL

    path = qwen_models["qwen3"]
    results = run_distributed(_tp2_grads, 2, args=(path,), timeout=300)
    hf_grads = _hf_lm_grads(path, tmp_path)
    grads = {name: grad for _, rank_grads in results for name, grad in rank_grads.items()}
    assert sorted(grads) == sorted(hf_grads)
    for name, expected in hf_grads.items():
        torch.testing.assert_close(grads[name], expected, atol=GRAD_ATOL, rtol=1e-4, msg=name)
    assert all(hf_grads[n].abs().sum() > 0 for n in hf_grads if n.endswith(("q_norm.weight", "k_norm.weight")))


def test_layer_pattern_routing_and_refusals():
    """The per-layer pattern as HF builds it (``mlp_only_layers``, ``decoder_sparse_step``), the routing
    and shared-expert fields given to megatron-core, and what the adapters refuse, naming the field."""
    from models.registry import get_adapter
    from models.tiny import tiny_config

    qwen3_moe, qwen2_moe = get_adapter(tiny_config("qwen3_moe", 500)), get_adapter(tiny_config("qwen2_moe", 500))
    assert qwen3_moe.moe_layer_pattern == (True, False, True, True)  # mlp_only_layers [1]
    assert qwen2_moe.moe_layer_pattern == (False, True, False, True)  # decoder_sparse_step 2
    q3, q2 = qwen3_moe.transformer_config_kwargs(), qwen2_moe.transformer_config_kwargs()
    assert q3["moe_layer_freq"] == [1, 0, 1, 1] and q2["moe_layer_freq"] == [0, 1, 0, 1]
    assert (q3["moe_ffn_hidden_size"], q3["ffn_hidden_size"], q3["kv_channels"]) == (40, 72, 20)
    assert q3["moe_router_pre_softmax"] is False and q2["moe_router_pre_softmax"] is True  # norm_topk_prob on / off
    assert q3["qk_layernorm"] and not q2["qk_layernorm"] and q2["add_qkv_bias"]
    assert (q2["moe_shared_expert_intermediate_size"], q2["moe_shared_expert_gate"]) == (56, True)
    assert "moe_shared_expert_intermediate_size" not in q3
    assert get_adapter(tiny_config("mixtral", 500)).transformer_config_kwargs()["moe_layer_freq"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="attention_bias"):
        get_adapter(tiny_config("qwen3", 500, attention_bias=True))
    with pytest.raises(ValueError, match="use_sliding_window"):
        get_adapter(tiny_config("qwen3_moe", 500, use_sliding_window=True))
