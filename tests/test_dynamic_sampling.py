"""DAPO's dynamic sampling with refill (``--dynamic_filtering``, ``engine.rl.dynamic_sampling``).

The loop (``PPOTrainer``) runs on a scripted rollout backend (the ``RolloutEngines`` protocol,
answering from a table: the loop's refill logic is under test, not generation) and a real reward
function file: prompts with an even id get the same answer n times (all rewards equal: dropped),
odd ones a mix of right and wrong answers (kept), so about half the groups of every round drop.
"""
from __future__ import annotations

import pytest
import torch

from engine.rl.dynamic_sampling import kept_groups
from engine.rl.rollout import RolloutSample

N = 4  # samples per prompt
ROLLOUT = 4  # --rollout_batch_size
REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [1.0 if r == "8" else 0.0 for r in responses]
'''


class ScriptedRollouts:
    """A ``RolloutEngines`` answering from a table (prompt ``[1, x]``: all "7" for even x, "7" / "8"
    alternating for odd x); records the prompt batches it was asked for."""

    def __init__(self):
        self.requests: list[list[int]] = []

    def generate(self, prompt_token_ids, sampling, rows=None):
        self.requests.append([ids[1] for ids in prompt_token_ids])
        return [RolloutSample(prompt_index=p, sample_index=j, finish_reason="stop", logprobs=[-1.0],
                              response_token_ids=[7 if ids[1] % 2 == 0 else 7 + j % 2])
                for p, ids in enumerate(prompt_token_ids) for j in range(sampling.n_samples_per_prompt)]

    def generate_async(self, prompt_token_ids, sampling, rows=None):
        samples = self.generate(prompt_token_ids, sampling)
        return type("Done", (), {"result": lambda self: samples})()

    def release_memory(self):
        pass

    def sync_weights(self):
        return {}


class Tokenizer:
    """Token ids as their decimal text (the reward function reads "7" / "8")."""

    pad_token_id = eos_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row) for row in ids]


def _trainer(tmp_path, **overrides):
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.ppo_trainer import PPOConfig, PPOTrainer
    from engine.rl.rewards import RewardFunction
    from engine.rl.rollout import SamplingConfig

    class RecordingTrainer(PPOTrainer):
        """Records what each rollout hands to training (the actor stays frozen: no role is needed)."""

        trained: list = []

        def train(self, experience, step):
            self.trained.append(experience)
            return super().train(experience, step)

    path = tmp_path / "reward.py"
    path.write_text(REWARD_FUNC)
    settings = dict(rollout_batch_size=ROLLOUT, n_samples_per_prompt=N, train_batch_size=ROLLOUT * N,
                    init_kl_coef=0.0, dynamic_filtering=True, freezing_actor_steps=1 << 30, max_steps=3)
    settings.update(overrides)
    config = PPOConfig(advantage=AdvantageConfig(estimator="grpo", n_samples_per_prompt=N), **settings)
    prompts = [{"prompt": f"p{i}", "prompt_ids": [1, 10 + i], "label": ""} for i in range(32)]
    trainer = RecordingTrainer(config, prompts=prompts, tokenizer=Tokenizer(), rollouts=ScriptedRollouts(),
                               actor=None, sampling=SamplingConfig(n_samples_per_prompt=N, max_new_tokens=2),
                               reward_sources=[RewardFunction(str(path))])
    trainer.trained = []
    return trainer


def test_kept_groups_drop_equal_rewards_and_means_outside_the_range():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0,  0.0, 0.0, 0.0, 0.0,  0.5, 0.5, 0.5, 0.5000001,
                            float("nan"), 1.0, 0.0, 0.0])
    assert kept_groups(rewards, N).tolist() == [True, False, True, False]
    # Means 0.75 and ~0.5: only the second inside (0.25, 0.6).
    assert kept_groups(rewards, N, (0.25, 0.6)).tolist() == [False, False, True, False]
    assert kept_groups(rewards, N, (0.75, 1.0)).tolist() == [False, False, False, False]  # at the bound: out


def test_refill_trains_full_rollouts_of_informative_groups(tmp_path):
    trainer = _trainer(tmp_path)
    history = [trainer.train_one_rollout(step) for step in range(3)]
    for metrics, experience in zip(history, trainer.trained):
        assert metrics["rollout/groups_trained"] == ROLLOUT and experience.batch_size == ROLLOUT * N
        assert metrics["rollout/groups_generated"] == metrics["rollout/groups_kept"] + metrics["rollout/groups_dropped"]
        assert metrics["rollout/groups_generated"] == ROLLOUT * metrics["rollout/gen_rounds"]
        assert metrics["filtered_ratio"] == pytest.approx(metrics["rollout/groups_dropped"] / metrics["rollout/groups_generated"])
        assert (experience.advantages.abs().sum(dim=1) > 0).all()  # every trained sample carries signal
        # The reward of every generated sample (1 on half the samples of kept groups only); "reward": the trained
        assert metrics["rollout/generated_reward"] == pytest.approx(
            metrics["rollout/groups_kept"] * N / 2 / (metrics["rollout/groups_generated"] * N))
        assert metrics["reward"] == pytest.approx(0.5)
    # Refills happened, and every prompt batch the engines generated is counted in the position.
    rounds = [m["rollout/gen_rounds"] for m in history]
    assert max(rounds) > 1 and len(trainer.rollouts.requests) == sum(rounds) == trainer.generation_batches
    assert trainer._state(3)["prompts"]["consumed"] == sum(rounds) * ROLLOUT
    # The batches are the prompt stream in order: the same as one batch per rollout would read.
    assert [sorted(r) for r in trainer.rollouts.requests] == [
        sorted(row["prompt_ids"][1] for row in trainer._prompt_rows(i)) for i in range(sum(rounds))]


def test_a_resume_continues_at_the_next_unconsumed_prompt(tmp_path):
    from engine.data.position import resumed_generation_batches

    straight = _trainer(tmp_path)
    for step in range(3):
        straight.train_one_rollout(step)
    first = _trainer(tmp_path)
    for step in range(2):
        first.train_one_rollout(step)
    resumed = _trainer(tmp_path)
    resumed.generation_batches = resumed_generation_batches(first._state(2)["prompts"], step=2)
    resumed.train_one_rollout(2)
    assert resumed.rollouts.requests == straight.rollouts.requests[len(first.rollouts.requests):]
    assert torch.equal(resumed.trained[0].input_ids, straight.trained[2].input_ids)


def test_async_prefetched_rollouts_refill_and_the_position_counts_them(tmp_path):
    trainer = _trainer(tmp_path, async_train=True)
    history = [trainer.train_one_rollout(step) for step in range(3)]
    assert [m["rollout/groups_trained"] for m in history] == [ROLLOUT] * 3
    assert all(e.batch_size == ROLLOUT * N for e in trainer.trained)
    # After rollout 2 (the last) nothing is prefetched; after rollout 1 the prefetched batch is where a
    # resume starts (it would generate it anew).
    rounds = [m["rollout/gen_rounds"] for m in history]
    assert trainer.generation_batches == sum(rounds)
    sync = _trainer(tmp_path)
    assert [sync.train_one_rollout(step)["rollout/gen_rounds"] for step in range(3)] == rounds
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(trainer.trained, sync.trained))


def test_one_round_trains_on_fewer_and_says_so(tmp_path, capsys):
    """--max_num_gen_batches 1: each rollout is its first round's kept groups. (With more than one
    optimizer step per rollout scoring needs the actor's log-probs: the rollouts and their advantages
    are checked here, the phases that decide what trains.)"""
    from engine.rl.experience import Experience

    trainer = _trainer(tmp_path, max_num_gen_batches=1, train_batch_size=N)
    kept = []
    for step in range(3):
        rollout = trainer._take_rollout(step)
        refill = rollout.meta["refill"]
        assert refill["rollout/gen_rounds"] == 1 and refill["rollout/groups_generated"] == ROLLOUT
        kept.append(refill["rollout/groups_kept"])
        assert refill["rollout/groups_trained"] == kept[-1]
        if rollout.batch is not None:
            experience, _ = trainer.advantages(Experience.from_rollout(rollout.batch), rollout.meta["rewards"])
            assert experience.batch_size == kept[-1] * N
    assert min(kept) < ROLLOUT
    out = capsys.readouterr().out
    step = kept.index(min(kept)) + 1
    assert (f"rollout {step}: {min(kept)} of --rollout_batch_size {ROLLOUT} prompt groups kept after "
            f"--max_num_gen_batches 1 rounds ({ROLLOUT} generated)") in out


@pytest.mark.parametrize("async_train", [False, True])
def test_a_rollout_abandoned_for_a_signal_gives_its_prompts_back(tmp_path, async_train):
    """SIGTERM while rollout 3 generates: the run stops after 2 rollouts and the position it would
    checkpoint is the one after rollout 2 (its refills included), not past rollout 3's batches, so a
    resume generates rollout 3 from the same prompts (a CI run once resumed one batch late)."""
    import signal
    import time

    from parallel.preemption import Preempted, PreemptionWatch

    straight = _trainer(tmp_path, async_train=async_train)
    for step in range(2):
        straight.train_one_rollout(step)
    consumed_after_two = straight._state(2)["prompts"]["consumed"]
    trainer = _trainer(tmp_path, async_train=async_train)
    watch = trainer.preemption = PreemptionWatch(grace_s=60, what="test")
    generate = trainer.rollouts.generate

    def signalled_during_rollout_3(prompt_token_ids, sampling, rows=None):
        if len(trainer.history) == 2:
            watch.signum, watch.signalled_at = signal.SIGTERM, time.monotonic()
        return generate(prompt_token_ids, sampling, rows)

    trainer.rollouts.generate = signalled_during_rollout_3
    with pytest.raises(Preempted, match="2 rollouts trained"):
        trainer.fit()
    assert len(trainer.trained) == 2 and trainer._ahead == []
    assert trainer._state(2)["prompts"]["consumed"] == consumed_after_two
