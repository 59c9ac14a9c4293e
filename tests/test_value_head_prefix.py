"""``--value_head_prefix``: a reward / critic head saved as ``<prefix>.weight`` (OpenRLHF's RMs may
use ``value_head``) loads, scores and saves under that name, and a value-head checkpoint without
its head is an error naming the file and the tensor -- never a silently random head.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_value_head import _values_and_export


@pytest.fixture(scope="module")
def reward_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The same reward model saved with its head as ``score.weight`` and as ``value_head.weight``."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("value_heads")
    score = root / "score"
    run_distributed(_values_and_export, 1, args=(1, 1, tiny_models["llama"], str(score)), timeout=300)
    renamed = root / "value_head"
    shutil.copytree(score, renamed)
    (weights,) = renamed.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["value_head.weight"] = tensors.pop("score.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    index = renamed / "model.safetensors.index.json"
    if index.exists():
        index.write_text(index.read_text().replace('"score.weight"', '"value_head.weight"'))
    return {"score": str(score), "value_head": str(renamed)}


TEXTS = ["1+2=3", "the house near the water", "4+4=9"]


def test_hf_scorer_reads_the_named_head_and_refuses_a_missing_one(reward_models):
    from engine.inference.batch import RewardScorer

    expected = RewardScorer(reward_models["score"]).score_texts(TEXTS)
    renamed = RewardScorer(reward_models["value_head"], value_head_prefix="value_head").score_texts(TEXTS)
    assert renamed == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"has no value head 'score.weight' \(tensors outside the decoder: "
                                         r"\['value_head.weight'\]\)"):
        RewardScorer(reward_models["value_head"], flag="--reward_pretrain")


def _frozen_values(rank, world_size, path, prefix, save_dir):
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig
    from models.hf_checkpoint import CheckpointError

    try:
        engine = TrainingEngine(EngineConfig(pretrain=path, build=ModelBuildConfig(value_head=True,
                                                                                   value_head_prefix=prefix)),
                                trainable=False)
    except CheckpointError as err:
        return str(err)
    ids = torch.randint(5, engine.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    values = forward_logits(engine.model, [{"input_ids": ids, "position_ids": torch.arange(10).expand_as(ids)}],
                            vocab_size=1)[0]
    engine.save_hf(save_dir)
    return values


def test_megatron_reads_and_writes_the_named_head(reward_models, tmp_path):
    from safetensors import safe_open

    (expected,) = run_distributed(_frozen_values, 1, args=(reward_models["score"], "score", str(tmp_path / "a")),
                                  timeout=300)
    (renamed,) = run_distributed(_frozen_values, 1,
                                 args=(reward_models["value_head"], "value_head", str(tmp_path / "b")), timeout=300)
    torch.testing.assert_close(renamed, expected, atol=0, rtol=0)
    with safe_open(next((tmp_path / "b").glob("*.safetensors")), framework="pt") as saved:
        names = set(saved.keys())
    assert "value_head.weight" in names and "score.weight" not in names  # written back under its name
    (error,) = run_distributed(_frozen_values, 1, args=(reward_models["value_head"], "score", str(tmp_path / "c")),
                               timeout=300)
    assert f"{reward_models['value_head']} has no value head 'score.weight'" in error
    assert "--value_head_prefix" in error


def _trainable_value_model(rank, world_size, path):
    import contextlib
    import io

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from models.builder import ModelBuildConfig

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        engine = TrainingEngine(EngineConfig(pretrain=path, build=ModelBuildConfig(value_head=True)))
    return engine.model.output_layer.weight.detach().clone(), printed.getvalue()


def test_a_critic_from_a_causal_lm_starts_a_fresh_head_and_says_so(tiny_models):
    ((head, printed),) = run_distributed(_trainable_value_model, 1, args=(tiny_models["llama"],), timeout=300)
    assert head.abs().sum() > 0
    assert "is a causal LM: the value head starts fresh" in printed
