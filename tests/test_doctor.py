"""The mismatch doctor: the Megatron actor and a vLLM engine run the same tokens with the same
synced weights; the doctor reports per layer where they part.

A clean sync (fp32 on both sides) reports no jump, every layer within fp32 noise and identical
routing; after one tensor of the engine is pushed again with a small delta, the doctor names that
tensor's layer (and, for a router, the layer and the tokens whose experts differ). The tool
(``python -m tools.doctor``) runs a Megatron checkpoint on a TP=2 actor.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_vllm_engine import VLLM_TINY, stream_checkpoint

FP32_NOISE = 1e-5  # relative hidden-state difference; seen: ~3e-7 (embedding exact)
LOGPROB_ATOL = 1e-4  # as tests/test_vllm_engine.py
SEQUENCES = [[1, 17, 230, 45, 99, 12, 7, 300, 5], [1, 80, 81, 82, 3]]


# ----- the diagnosis on made-up records (no engines) ------------------------------------------------
def _records(rel_diffs: list[float], *, dtype: str = "float32") -> tuple[list[dict], list[dict]]:
    """One 3-token sequence whose engine side differs from the actor's by ``rel_diffs[i]`` (relative
    to the actor's scale 2.0) in row i (embedding, layer.0 ..., final_norm)."""
    names = ["embedding", *(f"layer.{i}" for i in range(len(rel_diffs) - 2)), "final_norm"]
    actor = {name: torch.full((3, 4), 2.0, dtype=torch.float64) for name in names}  # exact small deltas
    engine = {name: actor[name].clone() for name in names}
    for name, rel in zip(names, rel_diffs):
        engine[name][1, 2] += 2.0 * rel
    actor["log_probs"], engine["log_probs"] = torch.zeros(2), torch.tensor([0.0, -0.5])
    return [{**actor, "dtype": dtype}], [{**engine, "dtype": dtype}]


@pytest.mark.parametrize("rel_diffs,jump", [
    ([0, 2e-7, 3e-7, 4e-7, 6e-7, 5e-7], None),  # fp32 rounding noise
    ([0, 1e-7, 3e-7, 9e-7, 2.7e-6, 8e-6], None),  # noise growing 3x per layer: gradual, no jump
    ([0, 2e-7, 3e-7, 2e-4, 3e-4, 3e-4], "layer.2"),  # a difference of its own at layer 2
    ([0, 2e-5, 3e-5, 3e-5, 3e-5, 3e-5], "layer.0"),  # above 10x the noise floor at once
    ([0, 2e-7, 3e-7, 3e-7, 4e-7, 1e-3], "final_norm"),
])
def test_first_jump_is_ten_times_every_row_before_it_and_the_noise_floor(rel_diffs, jump):
    from engine.rl.doctor import diagnose, format_table

    actor, engine = _records(rel_diffs)
    report = diagnose(actor, engine, [[1, 2, 3]])
    assert [row["rel_diff"] for row in report["rows"]] == pytest.approx(rel_diffs, rel=1e-3, abs=1e-12)
    assert (report["first_jump"] or {}).get("name") == jump
    assert report["noise_floor"] == 8 * 2.0 ** -23
    assert report["log_probs"]["max_abs_diff"] == 0.5 and report["log_probs"]["worst_token"] == {
        "sequence": 0, "position": 2, "token_id": 3}
    assert all(row["worst_token"] == {"sequence": 0, "position": 1} for row in report["rows"][1:] if row["rel_diff"])
    table = format_table(report)
    assert ("<- first jump" in table) == (jump is not None) and ("no jump" in table) == (jump is None)


def test_bf16_noise_floor_tolerates_bf16_rounding():
    from engine.rl.doctor import diagnose

    actor, engine = _records([0, 4e-3, 8e-3, 1e-2, 1.2e-2, 1e-2], dtype="bfloat16")
    engine[0]["dtype"] = "float32"  # the coarser side sets the floor
    assert diagnose(actor, engine, [[1, 2, 3]])["first_jump"] is None


def test_doctor_every_needs_an_eager_engine():
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    base = ["--pretrain", "m", "--prompt_data", "p.jsonl", "--doctor_every", "2"]
    with pytest.raises(OptionError, match="--doctor_every needs --enforce_eager"):
        train_ppo_ray.parse_args(base)
    with pytest.raises(OptionError, match="--doctor_every must be >= 0"):
        train_ppo_ray.parse_args([*base[:-1], "-1", "--enforce_eager"])
    assert train_ppo_ray.parse_args([*base, "--enforce_eager"]).doctor.due(4)


# ----- the Megatron actor against a vLLM engine ---------------------------------------------------
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    from models.tiny import build_tiny_model

    return build_tiny_model("mixtral", tmp_path_factory.mktemp("doctor") / "mixtral", seed=0, **VLLM_TINY)


@pytest.fixture(scope="module")
def doctor(ray_cluster, mixtral):
    """A TP=1 Mixtral actor, one vLLM engine synced from it, and the doctor over both."""
    from engine.ray.doctor import RayDoctor
    from engine.ray.role_worker import RoleConfig
    from engine.ray.vllm_engine import VLLMEngineConfig, start_pool
    from engine.ray.weight_sync import ActorWeightSync, WeightSyncConfig
    from engine.rl.doctor import DoctorConfig
    from engine.runtime.engine import EngineConfig
    from tools.doctor import start_actor_and_engine

    actor, pool = start_actor_and_engine(
        RoleConfig(name="actor", engine=EngineConfig(pretrain=mixtral)),
        VLLMEngineConfig(pretrain=mixtral, dtype="float32", enforce_eager=True, max_model_len=64, seed=0),
        start_engines=start_pool)
    try:
        sync = ActorWeightSync(actor, pool, WeightSyncConfig(), backend="gloo", timeout_s=120)
        sync.push()
        yield RayDoctor(DoctorConfig(), actor=actor, engines=pool, run_dir=None), sync
    finally:
        pool.shutdown()
        actor.shutdown()


def _perturbed(path: str, name: str, delta: float):
    """The checkpoint's tensors with ``delta`` x N(0, 1) (seeded) added to tensor ``name``."""
    generator = torch.Generator().manual_seed(0)
    for key, tensor in stream_checkpoint(path):
        yield key, tensor + delta * torch.randn(tensor.shape, generator=generator) if key == name else tensor


def _diagnose_perturbed(doctor, mixtral: str, name: str, delta: float) -> dict:
    from engine.ray.weight_sync import sync_weights

    diagnosis, sync = doctor
    sync_weights(diagnosis.engines, _perturbed(mixtral, name, delta), backend="gloo", timeout_s=120)
    try:
        return diagnosis.diagnose(SEQUENCES)
    finally:
        sync.push()  # the actor's weights again, for the next test


def test_clean_sync_reports_no_jump(doctor):
    report = doctor[0].diagnose(SEQUENCES)
    names = [row["name"] for row in report["rows"]]
    assert names == ["embedding", "layer.0", "layer.1", "layer.2", "layer.3", "final_norm"]
    assert report["first_jump"] is None, report["first_jump"]
    assert report["rows"][0]["max_abs_diff"] == 0.0  # an embedding lookup is exact
    assert max(row["rel_diff"] for row in report["rows"]) < FP32_NOISE
    assert report["log_probs"]["max_abs_diff"] < LOGPROB_ATOL
    assert report["routing"]["num_moe_layers"] == 4 and report["routing"]["mismatched_tokens"] == 0
    assert report["num_tokens"] == sum(map(len, SEQUENCES)) and report["unmatched_records"] == []


def test_perturbed_layer_is_named(doctor, mixtral):
    """Layer 2's attention output projection off by 1e-3 x N(0, 1) in the engine only."""
    report = _diagnose_perturbed(doctor, mixtral, "model.layers.2.self_attn.o_proj.weight", 1e-3)
    assert report["first_jump"]["name"] == "layer.2", report["first_jump"]
    rows = {row["name"]: row for row in report["rows"]}
    assert max(rows[f"layer.{i}"]["rel_diff"] for i in (0, 1)) < FP32_NOISE
    assert rows["layer.2"]["rel_diff"] > 100 * FP32_NOISE
    assert report["log_probs"]["max_abs_diff"] > LOGPROB_ATOL


def test_perturbed_router_shows_the_routing_difference(doctor, mixtral):
    report = _diagnose_perturbed(doctor, mixtral, "model.layers.1.block_sparse_moe.gate.weight", 0.05)
    first = report["routing"]["first_layer"]
    assert first["layer"] == 1 and first["num_tokens"] == len(first["tokens"]) > 0
    for token in first["tokens"]:
        assert token["actor_experts"] != token["engine_experts"] and len(token["engine_experts"]) == 2
        assert token["token_id"] == SEQUENCES[token["sequence"]][token["position"]]
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["layer.0"]["mismatched_tokens"] == 0 and rows["layer.1"]["mismatched_tokens"] == first["num_tokens"]
    assert rows["layer.0"]["router_logit_max_diff"] < 1e-5 < rows["layer.1"]["router_logit_max_diff"]
    assert report["first_jump"]["name"] == "layer.1"


def test_tool_on_a_megatron_checkpoint_at_tp2(ray_cluster, tmp_path):
    """``python -m tools.doctor``: a Megatron checkpoint (hf_to_mcore) on a TP=2 actor with sequence
    parallelism (each rank holds half of every hidden state: gathered): no jump, and the same report
    in <run_dir>/doctor/step_0.json. (PP=2, each stage reporting its layers: tests/test_ppo_e2e_critic.py.)"""
    from models.tiny import build_tiny_model
    from tests.test_convert import _convert
    from tools import doctor

    hf = build_tiny_model("llama", tmp_path / "hf", seed=3, **VLLM_TINY)
    mcore = tmp_path / "mcore"
    _convert("tools.convert.hf_to_mcore", "--hf_path", hf, "--save_path", str(mcore))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("3+4=", "the water near the house")))
    report = doctor.main([
        "--actor_ckpt", str(mcore), "--prompts", str(prompts), "--input_key", "prompt", "--generate_max_len", "4",
        "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2", "--actor_sequence_parallel",
        "--vllm_dtype", "float32",
        "--run_dir", str(tmp_path / "run"),
    ])
    assert [row["name"] for row in report["rows"]] == ["embedding", *(f"layer.{i}" for i in range(4)), "final_norm"]
    assert report["num_sequences"] == 2 and report["first_jump"] is None
    assert max(row["rel_diff"] for row in report["rows"]) < FP32_NOISE
    assert report["log_probs"]["max_abs_diff"] < LOGPROB_ATOL
    assert report["routing"]["num_moe_layers"] == 0
    written = json.loads((tmp_path / "run" / "doctor" / "step_0.json").read_text())
    assert written == {"step": 0, **json.loads(json.dumps(report))}
