"""``--normalize_reward`` as OpenRLHF means it: a reward model's rewards (and a critic started from
it) are (r - mean) / std with the mean / std its trainer saved in config.json; the running-moments
normalisation is ``--normalize_reward_running``."""
from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed

MEAN, STD = 0.25, 2.0


@pytest.fixture(scope="module")
def reward_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, out = tmp_path_factory.mktemp("rm_norm"), {}
    for name, stats in (("with_stats", True), ("without", False)):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=1)
        if stats:
            model.config.mean, model.config.std = MEAN, STD
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _configs(policy, rm, *extra):
    from engine.cli import train_ppo_ray

    job = train_ppo_ray.parse_args(["--pretrain", policy, "--reward_pretrain", rm, "--prompt_data", "p.jsonl", *extra])
    return train_ppo_ray.role_configs(job, total_steps=1)


def test_reward_model_and_critic_take_the_saved_statistics(tiny_models, reward_models):
    policy = tiny_models["llama"]
    configs = _configs(policy, reward_models["with_stats"], "--normalize_reward")
    assert configs["reward0"].engine.build.value_normalisation == (MEAN, STD)
    assert configs["critic"].engine.build.value_normalisation == (MEAN, STD)  # started from the RM
    assert configs["actor"].engine.build.value_normalisation is None
    own = _configs(policy, reward_models["with_stats"], "--normalize_reward", "--critic_pretrain", policy)
    assert own["critic"].engine.build.value_normalisation is None  # a causal LM has no statistics
    plain = _configs(policy, reward_models["with_stats"])
    assert plain["reward0"].engine.build.value_normalisation is None
    with pytest.raises(ValueError, match=r"--normalize_reward: --reward_pretrain .*no 'mean' / 'std'"):
        _configs(policy, reward_models["without"], "--normalize_reward")


def _values(_rank, _world, engine_configs):
    import torch

    from engine.runtime.engine import TrainingEngine

    first = TrainingEngine(engine_configs[0], trainable=False)
    engines = [first] + [TrainingEngine(c, trainable=False, ctx=first.ctx) for c in engine_configs[1:]]
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        return [e.model(ids, positions, attention_mask=None)[..., 0] for e in engines]


def test_the_engine_applies_exactly_those(tiny_models, reward_models):
    normalised = _configs(tiny_models["llama"], reward_models["with_stats"], "--normalize_reward")["reward0"]
    raw = _configs(tiny_models["llama"], reward_models["with_stats"])["reward0"]
    plain, scaled = run_distributed(_values, world_size=1, args=([raw.engine, normalised.engine],))[0]
    assert plain.abs().max() > 0
    assert scaled.allclose((plain - MEAN) / STD, rtol=0, atol=1e-6)
