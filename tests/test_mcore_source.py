"""Megatron checkpoints as a start: a ``tools.convert.hf_to_mcore`` directory or a training
checkpoint (``<ckpt_path>/global_stepN``) works wherever an HF ``--pretrain`` does, under any other
layout; ``mcore_to_hf`` exports a training checkpoint; bad paths fail naming the flag."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_convert import _convert, _tensors


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The tiny Llama as HF and converted under TP=2, and a short TP=1 SFT run started from the
    conversion, with a training checkpoint at its last step and the HF export of that step."""
    from engine.cli import train_sft
    from engine.tasks.arithmetic import make_rows, write_jsonl

    root = tmp_path_factory.mktemp("mcore_source")
    hf = tiny_models["llama"]
    out = {"hf": hf, "tp2": str(root / "tp2")}
    _convert("tools.convert.hf_to_mcore", "--hf_path", hf, "--save_path", out["tp2"], "--tensor_model_parallel_size", "2")
    write_jsonl(make_rows(32, max_operand=9, seed=0), root / "data" / "train.jsonl")
    train_sft.main([
        "--pretrain", out["tp2"], "--dataset", f"json@{root / 'data'}", "--input_key", "prompt", "--output_key",
        "answer", "--max_len", "32", "--train_batch_size", "8", "--micro_train_batch_size", "8", "--max_steps", "2",
        "--learning_rate", "1e-3", "--ckpt_path", str(root / "ckpt"), "--save_steps", "2",
        "--save_path", str(root / "sft"),
    ])
    out.update(sft=str(root / "sft"), ckpt=str(root / "ckpt" / "global_step2"), root=str(root))
    return out


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))


def _same_logits(rank, world_size, layout, pairs, divisible_by):
    """Frozen engines on one grid: for each (reference, candidate) pair, whether the candidate's
    full logits equal the reference's bit for bit (None off the last stage)."""
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    build = ModelBuildConfig(make_vocab_size_divisible_by=divisible_by)
    ctx, results = None, []
    for pair in pairs:
        logits = []
        for path in pair:
            engine = TrainingEngine(EngineConfig(pretrain=path, parallel=ParallelConfig(**layout), build=build),
                                    trainable=False, ctx=ctx)
            ctx = engine.ctx
            ids = _ids(engine.vocab_size)
            batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
            logits.append(forward_logits(engine.model, [batch], vocab_size=engine.vocab_size))
        results.append(None if logits[0] is None else torch.equal(logits[0][0], logits[1][0]))
    return None if results[0] is None else results  # None: not the last pipeline stage


@pytest.mark.parametrize("case", ["tp2_as_tp1", "tp1_as_tp2", "tp2_as_pp2"])
def test_start_from_megatron_equals_start_from_hf(case, sources):
    # make_vocab_size_divisible_by: the loading layout pads the vocabulary to 600 (more rows than
    # the 512 saved) or 504 (fewer): the padding follows the loading layout, not the writer's.
    layout, world_size, pairs, divisible_by = {
        "tp2_as_tp1": ({}, 1, [("hf", "tp2")], 100),
        # The training checkpoint (of a TP=1 run) under TP=2 equals that run's own HF export.
        "tp1_as_tp2": ({"tensor_model_parallel_size": 2}, 2, [("sft", "ckpt")], 128),
        "tp2_as_pp2": ({"pipeline_model_parallel_size": 2}, 2, [("hf", "tp2")], 8),
    }[case]
    pairs = [(sources[a], sources[b]) for a, b in pairs]
    results = run_distributed(_same_logits, world_size, args=(layout, pairs, divisible_by), timeout=300)
    last_stage = [r for r in results if r is not None]  # every TP rank of the last stage
    assert last_stage and all(r == [True] * len(pairs) for r in last_stage), results


def _critic_values(rank, world_size, paths):
    """Values of a value-head model started from each causal LM (the head stays fresh)."""
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig, build_model
    from models.sources import ModelSource
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=3)
    values = []
    for path in paths:
        source = ModelSource.open(path)
        adapter = source.adapter()
        model = build_model(adapter, parallel, ModelBuildConfig(value_head=True))
        source.load_weights(model, adapter)
        ids = _ids(adapter.vocab_size)
        batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
        values.append(forward_logits(model.eval(), [batch], vocab_size=1)[0])
    return values


def test_critic_from_a_megatron_policy_gets_a_fresh_head_as_from_hf(sources):
    # Not the first row of the LM head (megatron-core would read it into the [1, hidden] head).
    hf, mcore = run_distributed(_critic_values, 1, args=([sources["hf"], sources["tp2"]],), timeout=120)[0]
    assert torch.equal(hf, mcore) and hf.std() > 0


def test_mcore_to_hf_of_a_training_checkpoint_equals_the_runs_hf_export(sources, tmp_path):
    ckpt = Path(sources["ckpt"])
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2
    assert (ckpt / "common_state.pt").exists()  # a training checkpoint: optimizer and schedule too, not read here
    exported = tmp_path / "hf"
    # Written by a TP=1 run, exported under TP=2.
    _convert("tools.convert.mcore_to_hf", "--load_path", str(ckpt), "--save_path", str(exported),
             "--tensor_model_parallel_size", "2")
    expected, actual = _tensors(sources["sft"]), _tensors(str(exported))
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name
    # The tokenizer travelled HF -> hf_to_mcore -> training checkpoint -> HF.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(exported).vocab == AutoTokenizer.from_pretrained(sources["hf"]).vocab


def test_reward_model_checkpoint_scores_like_its_hf_source(tiny_models, tmp_path):
    """hf_to_mcore keeps a reward model's value head; the HF-only scorer (batch_inference --eval_task
    rm, serve_rm) takes the Megatron directory through a temporary export."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.inference.batch import RewardScorer
    from models.sources import ModelSource

    torch.manual_seed(1)
    rm, mcore = tmp_path / "rm", tmp_path / "rm_mcore"
    AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(rm)
    _convert("tools.convert.hf_to_mcore", "--hf_path", str(rm), "--save_path", str(mcore))
    assert ModelSource.open(mcore).value_head is True
    texts = ["1+1=2", "12+30=42 and more", "9+9=19"]
    expected = RewardScorer(str(rm)).score_texts(texts)
    assert RewardScorer(str(mcore), flag="--reward_pretrain").score_texts(texts) == expected
    assert len(set(expected)) == 3


# ----- the resolver and its errors ------------------------------------------------------------
def test_resolver_tells_the_kinds_apart(sources):
    from models.sources import ModelSource

    hf, converted, ckpt = (ModelSource.open(sources[k]) for k in ("hf", "tp2", "ckpt"))
    assert (hf.is_megatron, converted.is_megatron, ckpt.is_megatron) == (False, True, True)
    assert hf.hf_dir == sources["hf"] and converted.hf_dir == f"{sources['tp2']}/hf"
    assert (hf.value_head, converted.value_head, ckpt.value_head) == (False, False, False)
    assert ckpt.meta["step"] == 2 and "step 2" in ckpt.describe()
    assert ModelSource.open("org/model").kind == "hf"  # a hub id: HF resolves it
    assert converted.tokenizer().vocab == hf.tokenizer().vocab


def test_bad_paths_fail_naming_the_flag(sources, tmp_path):
    import shutil

    from models.hf_checkpoint import CheckpointError
    from models.sources import ModelSource

    with pytest.raises(ValueError, match=r"--teacher_model /nonexistent/m: no such directory"):
        ModelSource.open("/nonexistent/m", flag="--teacher_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--ref_pretrain .*empty is neither an HF model directory \(no config.json\) "
                                         r"nor a Megatron checkpoint"):
        ModelSource.open(tmp_path / "empty", flag="--ref_pretrain")
    with pytest.raises(ValueError, match=r"--pretrain .*ckpt is a --ckpt_path directory.*global_step2"):
        ModelSource.open(Path(sources["ckpt"]).parent)
    broken = tmp_path / "broken"
    shutil.copytree(sources["tp2"], broken)
    shard = next(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"--critic_pretrain {broken}: .*{shard.name} has 100 bytes.*truncated"):
        ModelSource.open(broken, flag="--critic_pretrain")
    (broken / "manifest.json").unlink()  # a half-written directory
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ModelSource.open(broken)


def test_value_head_and_policy_checkpoints_are_not_swapped(sources, tmp_path):
    from engine.cli import train_ppo_ray
    from models.sources import ModelSource

    meta = json.loads(Path(sources["tp2"], "meta.json").read_text())
    critic = ModelSource("critic", "megatron", "--critic_pretrain", {**meta, "value_head": True})
    with pytest.raises(ValueError, match="--critic_pretrain critic .*is a value-head model .*needs a policy"):
        critic.check_role(value_head=False, trainable=True)
    policy = ModelSource.open(sources["ckpt"], flag="--reward_pretrain")
    policy.check_role(value_head=True, trainable=True)  # a critic may start from a causal LM
    with pytest.raises(ValueError, match="--reward_pretrain .*without a value head: a reward model"):
        policy.check_role(value_head=True, trainable=False)
    # Before anything starts, the RL job names the flag that brought the policy in as a reward model.
    job = train_ppo_ray.parse_args(["--pretrain", sources["tp2"], "--reward_pretrain", sources["ckpt"],
                                    "--prompt_data", "p.jsonl", "--advantage_estimator", "grpo",
                                    "--n_samples_per_prompt", "2"])
    with pytest.raises(ValueError, match="--reward_pretrain .*global_step2 .*without a value head"):
        train_ppo_ray.check_job(job)


# ----- vLLM engines of an RL run ----------------------------------------------------------------
def test_vllm_engines_start_from_the_hf_config_and_wait_for_the_first_sync(sources):
    """With a Megatron --pretrain the engines start from its hf/ config with dummy weights, and the
    RL loop's first generation is preceded by a weight sync (an HF --pretrain: no extra sync)."""
    from engine.ray import rollouts
    from engine.ray.vllm_engine import VLLMEngineConfig, engine_start_config, loads_own_weights

    hf, mcore = VLLMEngineConfig(pretrain=sources["hf"]), VLLMEngineConfig(pretrain=sources["ckpt"])
    assert engine_start_config(hf) == hf and loads_own_weights(hf)
    with pytest.raises(ValueError, match=r"Megatron checkpoint of step 2\): vLLM engines load HF weights.*mcore_to_hf"):
        engine_start_config(mcore)  # batch inference: nobody would sync the weights
    started = engine_start_config(VLLMEngineConfig(pretrain=sources["ckpt"], weights_from_trainer=True))
    assert (started.pretrain, started.load_format) == (f"{sources['ckpt']}/hf", "dummy")
    # What a sync must carry: the HF tensors the model came from, kept in hf/ through the conversion
    # and the training run (the engine has no safetensors to read them from).
    from engine.ray.vllm_worker_ext import checkpoint_tensor_shapes

    assert checkpoint_tensor_shapes(started.pretrain) == checkpoint_tensor_shapes(sources["hf"])
    assert not loads_own_weights(started.__class__(pretrain=sources["ckpt"]))

    calls = []

    class Sync:
        def push(self):
            calls.append("sync")
            return {}

    class Pool:
        def submit_generate(self, ids, sampling):
            calls.append("generate")

    fresh = rollouts.EngineRollouts(Pool(), Sync(), synced=False)
    fresh.generate_async([[1]], None)
    fresh.generate_async([[1]], None)
    fresh.sync_weights()
    assert calls == ["sync", "generate", "generate", "sync"]
    calls.clear()
    rollouts.EngineRollouts(Pool(), Sync()).generate_async([[1]], None)
    assert calls == ["generate"]
