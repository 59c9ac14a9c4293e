"""Fully asynchronous rollouts: ``--async_train --max_staleness K`` and ``--partial_rollout``
(``engine.rl.rollout_stream``).

The loop (``PPOTrainer``) runs on a scripted rollout backend whose every token says which weights
sampled it and where: token ``1000 * (version + 1) + position`` with log-prob
``-0.1 * (version + 1) - 0.001 * position``, ``version`` the number of weight syncs the engines have
had. A prompt ``[1, x]`` answers 2 tokens for even x and 12 for odd x (the long tail). Training is
an actor update counted, nothing computed: the loop's admission, versions and resumption are under
test. One small real run (vLLM engine, Megatron actor, Ray) closes the module.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.rl.rollout import RolloutSample
from engine.tasks.environment import Environment, Step

N = 2  # samples per prompt
ROLLOUT = 4  # --rollout_batch_size
REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [float(len(r.split()) % 3) for r in responses]
'''


def _length(x: int) -> int:
    return 2 if x % 2 == 0 else 12


def _token(version: int, position: int) -> int:
    return 1000 * (version + 1) + position


def _logprob(version: int, position: int) -> float:
    return -0.1 * (version + 1) - 0.001 * position


class VersionedRollouts:
    """A ``RolloutEngines`` answering from a table, continuing a response from its token ids (a prompt
    longer than 2 ids is ``[1, x]`` + the response so far). ``delay_s`` per engine call."""

    def __init__(self, delay_s: float = 0.0):
        self.version = 0
        self.delay_s = delay_s
        self.calls = 0

    def generate(self, prompt_token_ids, sampling, rows=None):
        time.sleep(self.delay_s)
        self.calls += 1
        samples = []
        for p, ids in enumerate(prompt_token_ids):
            done, length = len(ids) - 2, _length(ids[1])
            stop = min(length, done + sampling.max_new_tokens)
            for j in range(sampling.n_samples_per_prompt):
                samples.append(RolloutSample(
                    prompt_index=p, sample_index=j, finish_reason="stop" if stop == length else "length",
                    response_token_ids=[_token(self.version, k) for k in range(done, stop)],
                    logprobs=[_logprob(self.version, k) for k in range(done, stop)]))
        return samples

    def generate_async(self, prompt_token_ids, sampling, rows=None):
        samples = self.generate(prompt_token_ids, sampling)
        return type("Done", (), {"result": lambda self: samples})()

    def release_memory(self):
        pass

    def sync_weights(self):
        self.version += 1
        return {}


class Tokenizer:
    pad_token_id = eos_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row) for row in ids]


def _trainer(tmp_path, *, rollouts=None, settle=True, **overrides):
    """``settle``: each train step waits until the stream has generated everything admitted (the
    engines run ahead as far as the bound lets them: deterministic versions); else until the stream
    made one more engine call (a sync then falls inside the long samples' generation)."""
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.ppo_trainer import PPOConfig, PPOTrainer
    from engine.rl.rewards import RewardFunction
    from engine.rl.rollout import SamplingConfig

    class CountingTrainer(PPOTrainer):
        """Records what each rollout trains on; an update is counted, nothing computed (no roles)."""

        def train(self, experience, step):
            self.trained.append(experience)
            stream, calls = self._stream, self.rollouts.calls
            deadline = time.monotonic() + 30
            while stream is not None and time.monotonic() < deadline:
                with stream._cond:
                    pending = [b for b in stream.batches if not b.done]
                if not pending or (not settle and self.rollouts.calls > calls):
                    break
                time.sleep(0.001)
            self.actor_version += 1
            return {}

    path = tmp_path / "reward.py"
    path.write_text(REWARD_FUNC)
    settings = dict(rollout_batch_size=ROLLOUT, n_samples_per_prompt=N, train_batch_size=ROLLOUT * N,
                    init_kl_coef=0.0, async_train=True, max_steps=6)
    settings.update(overrides)
    config = PPOConfig(advantage=AdvantageConfig(estimator="grpo", n_samples_per_prompt=N), **settings)
    prompts = [{"prompt": f"p{i}", "prompt_ids": [1, 10 + i], "label": ""} for i in range(32)]
    trainer = CountingTrainer(config, prompts=prompts, tokenizer=Tokenizer(), rollouts=rollouts or VersionedRollouts(),
                              actor=None, sampling=SamplingConfig(n_samples_per_prompt=N, max_new_tokens=16),
                              reward_sources=[RewardFunction(str(path))])
    trainer.trained = []
    return trainer


def _run(trainer, steps: int) -> list[dict]:
    try:
        return [trainer.train_one_rollout(step) for step in range(steps)]
    finally:
        trainer._close_stream()


def _responses(experience) -> list[list[tuple[int, int, float]]]:
    """Per row, its response tokens as (version, position, the engine log-prob the batch carries)."""
    rows = []
    for i in range(experience.batch_size):
        trained = experience.action_mask[i].nonzero()[:, 0].tolist()
        rows.append([(int(experience.labels[i, t]) // 1000 - 1, int(experience.labels[i, t]) % 1000,
                      float(experience.rollout_log_probs[i, t])) for t in trained])
    return rows


def test_max_staleness_1_trains_what_async_train_trains(tmp_path):
    """The stream with K = 1 is the one-step-off-policy loop: the same samples, from the same weights."""
    prefetch = _trainer(tmp_path)
    stream = _trainer(tmp_path, max_staleness=1)
    before, after = _run(prefetch, 5), _run(stream, 5)
    assert [m["rollout/staleness"] for m in after] == [m["rollout/staleness"] for m in before] == [0, 1, 1, 1, 1]
    for a, b in zip(prefetch.trained, stream.trained):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.rollout_log_probs, b.rollout_log_probs)
    assert stream._state(5)["prompts"] == prefetch._state(5)["prompts"]


def test_max_staleness_2_runs_two_rollouts_ahead_and_logs_the_histogram(tmp_path):
    trainer = _trainer(tmp_path, max_staleness=2)
    history = _run(trainer, 6)
    # Rollout r is admitted once the engines hold the updates of rollouts < r - 2 and, with the
    # engines always ahead here, generated then: 2 updates old from the third rollout on.
    assert [m["rollout/staleness"] for m in history] == [0, 1, 2, 2, 2, 2]
    for step, (metrics, experience) in enumerate(zip(history, trainer.trained)):
        versions = {v for row in _responses(experience) for v, _, _ in row}
        assert versions == {max(0, step - 2)}  # every token of the rollout from those weights
        assert metrics[f"rollout/staleness_hist/{metrics['rollout/staleness']}"] == 1.0
        assert metrics["rollout/resumed_samples"] == 0
    # The checkpoint's prompt position is that of the synchronous loop: the rollouts generated ahead
    # are generated anew by a resume.
    sync = _trainer(tmp_path, async_train=False)
    _run(sync, 3)
    trainer_at_3 = _trainer(tmp_path, max_staleness=2)
    _run(trainer_at_3, 3)
    assert trainer_at_3._state(3)["prompts"] == sync._state(3)["prompts"]


def test_partial_rollouts_resume_on_new_weights_with_each_tokens_log_prob(tmp_path):
    """--partial_rollout: engine calls of 3 tokens; each train step lets the engines make one call
    and then syncs, so the 12-token samples are interrupted and resumed from their token ids on the
    new weights. Every token then carries the version and log-prob of the weights that sampled it
    (the --vllm_is_correction weights read these), and the bound holds on the oldest token."""
    trainer = _trainer(tmp_path, rollouts=VersionedRollouts(delay_s=0.005), settle=False, max_staleness=2,
                       partial_rollout=True, partial_rollout_chunk=3, max_steps=8)
    history = _run(trainer, 8)
    resumed = 0
    for step, (metrics, experience) in enumerate(zip(history, trainer.trained)):
        assert 0 <= metrics["rollout/staleness"] <= 2
        assert sum(metrics[f"rollout/staleness_hist/{k}"] for k in range(3)) == pytest.approx(1.0)
        for i, row in enumerate(_responses(experience)):
            versions = [v for v, _, _ in row]
            assert [p for _, p, _ in row] == list(range(_length(int(experience.input_ids[i, 1]))))
            assert versions == sorted(versions)  # resumed on newer weights, never older
            assert all(lp == pytest.approx(_logprob(v, p)) for v, p, lp in row)
            resumed += len(set(versions)) > 1
            assert step - min(versions) <= 2  # trained after `step` updates
        assert metrics["rollout/resumed_samples"] == sum(
            len({v for v, _, _ in row}) > 1 for row in _responses(experience))
    assert resumed > 0  # some samples hold tokens of two or more versions
    assert max(m["rollout/staleness"] for m in history) == 2


def test_a_failing_engine_call_fails_the_rollout_that_needed_it(tmp_path):
    class Failing(VersionedRollouts):
        def generate(self, prompt_token_ids, sampling, rows=None):
            if self.version >= 1:
                raise RuntimeError("engine 0 died")
            return super().generate(prompt_token_ids, sampling, rows)

    trainer = _trainer(tmp_path, rollouts=Failing(), max_staleness=1)
    with pytest.raises(RuntimeError, match="engine 0 died"):
        _run(trainer, 4)
    assert not any(t.name == "rollout-stream" and t.is_alive() for t in threading.enumerate())


def test_a_stop_leaves_the_prompts_generated_ahead_to_the_resume(tmp_path):
    """SIGTERM while rollout 2 trains: the run stops after 2 rollouts, the stream stops, and the
    position a checkpoint would hold is the synchronous loop's (the rollouts generated ahead are not
    consumed: a resume generates them anew)."""
    import signal

    from parallel.preemption import Preempted, PreemptionWatch

    sync = _trainer(tmp_path, async_train=False)
    _run(sync, 2)
    trainer = _trainer(tmp_path, max_staleness=2)
    watch = trainer.preemption = PreemptionWatch(grace_s=60, what="test")
    train = trainer.train

    def signalled_in_rollout_2(experience, step):
        if step == 1:
            watch.signum, watch.signalled_at = signal.SIGTERM, time.monotonic()
        return train(experience, step)

    trainer.train = signalled_in_rollout_2
    with pytest.raises(Preempted, match="2 rollouts trained"):
        trainer.fit()
    assert len(trainer.trained) == 2 and trainer._stream is None
    assert [a.step for a in trainer._ahead] == [2, 3, 4]  # admitted after the sync of rollout 2
    assert trainer._state(2)["prompts"] == sync._state(2)["prompts"]
    assert not any(t.name == "rollout-stream" and t.is_alive() for t in threading.enumerate())


class VersionedPool:
    """The engines of multi-turn rollouts (``AgentRollouts``): a pool answering each turn with 2
    tokens of the weights' version, and the weight sync counted."""

    def __init__(self):
        self.pool, self.version = self, 0

    def submit_generate(self, prompt_token_ids, sampling):
        samples = [RolloutSample(prompt_index=p, sample_index=0, finish_reason="stop", logprobs=[-0.5, -0.5],
                                 response_token_ids=[_token(self.version, len(ids)), 2]) for p, ids in
                   enumerate(prompt_token_ids) for _ in range(sampling.n_samples_per_prompt)]
        return type("Done", (), {"result": lambda self: samples})()

    def prepare_generate(self):
        pass

    def release_memory(self):
        pass

    def sync_weights(self):
        self.version += 1
        return {}


class TwoTurns(Environment):
    """An environment done after two model turns, replying "ok" (token ids [5, 5]) in between."""

    async def reset(self, prompt, label):
        self.turns = 0

    async def step(self, action):
        self.turns += 1
        return Step(reward=float(self.turns + len(action) % 2), done=self.turns == 2, text="ok")


class TurnTokenizer(Tokenizer):
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5] * len(text)}


def _agent_rollouts(engines):
    from engine.rl.agents.executor import AgentExecutor
    from engine.rl.agents.rollouts import AgentRollouts

    class Counted(AgentRollouts):
        calls = property(lambda self: getattr(engines, "calls", 0))  # the settling train step reads it

    return Counted(engines, AgentExecutor(make_environment=TwoTurns, tokenizer=TurnTokenizer(), max_turns=3,
                                          max_len=64, step_timeout_s=5.0))


def test_multi_turn_rollouts_stream_with_their_versions(tmp_path):
    """--max_staleness without --partial_rollout runs the agent executor's rollouts as they are: a
    trajectory's turns all come from the weights the stream generated its rollout with."""
    trainer = _trainer(tmp_path, rollouts=_agent_rollouts(VersionedPool()), max_staleness=2)
    trainer.tokenizer, trainer.reward_sources = TurnTokenizer(), []
    history = _run(trainer, 5)
    assert [m["rollout/staleness"] for m in history] == [0, 1, 2, 2, 2]
    for step, experience in enumerate(trainer.trained):
        model_tokens = experience.labels[experience.action_mask > 0]
        model_tokens = model_tokens[model_tokens >= 1000]
        assert len(model_tokens) == 2 * ROLLOUT * N  # two turns per trajectory
        assert set((model_tokens // 1000 - 1).tolist()) == {max(0, step - 2)}


TURN = 6  # model tokens per turn of TurnPool


class TurnPool(VersionedPool):
    """Multi-turn engines that continue a turn from its token ids: a turn is ``TURN`` tokens, the
    model's tokens at the end of the ids handed in are the turn so far. Token at sequence position
    ``p`` (prompt + response) from weights ``v``: ``_token(v, p)``, log-prob ``_logprob(v, p)``."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s, self.calls = delay_s, 0

    def submit_generate(self, prompt_token_ids, sampling):
        time.sleep(self.delay_s)
        self.calls += 1
        samples = []
        for p, ids in enumerate(prompt_token_ids):
            done = next((k for k, token in enumerate(reversed(ids)) if token < 1000), len(ids))
            stop = min(TURN, done + sampling.max_new_tokens)
            positions = range(len(ids), len(ids) + stop - done)
            samples.append(RolloutSample(prompt_index=p, sample_index=0, finish_reason="stop" if stop == TURN else "length",
                                         response_token_ids=[_token(self.version, q) for q in positions],
                                         logprobs=[_logprob(self.version, q) for q in positions]))
        return type("Done", (), {"result": lambda self: samples})()


def test_partial_rollouts_resume_multi_turn_trajectories_on_new_weights(tmp_path):
    """--partial_rollout with the agent executor: engine calls of 2 tokens (3 per turn of 6) and a sync
    after each train step's engine call, so trajectories are interrupted inside a turn and between
    turns and resume from their token ids on the new weights, the environment's state kept. Every
    model token carries the version and log-prob of the weights that sampled it (what
    --vllm_is_correction reads), and the bound holds on the oldest token."""
    trainer = _trainer(tmp_path, rollouts=_agent_rollouts(TurnPool(delay_s=0.005)), settle=False, max_staleness=2,
                       partial_rollout=True, partial_rollout_chunk=2, max_steps=8)
    trainer.tokenizer, trainer.reward_sources = TurnTokenizer(), []
    history = _run(trainer, 8)
    split_turns = resumed = 0
    for step, (metrics, experience) in enumerate(zip(history, trainer.trained)):
        assert 0 <= metrics["rollout/staleness"] <= 2, [m["rollout/staleness"] for m in history]
        assert sum(metrics[f"rollout/staleness_hist/{k}"] for k in range(3)) == pytest.approx(1.0)
        for row in _responses(experience):
            # Only the model's tokens train: the prompt's 2, turn 1, the environment's "ok", turn 2 (and
            # no third: the environment's turn count lived on across the syncs).
            assert [p for _, p, _ in row] == [*range(2, 2 + TURN), *range(4 + TURN, 4 + 2 * TURN)]
            versions = [v for v, _, _ in row]
            assert versions == sorted(versions)  # resumed on newer weights, never older
            assert all(lp == pytest.approx(_logprob(v, p)) for v, p, lp in row)
            assert step - min(versions) <= 2
            resumed += len(set(versions)) > 1
            split_turns += any(len(set(versions[t * TURN:(t + 1) * TURN])) > 1 for t in range(2))
        assert metrics["rollout/resumed_samples"] == sum(
            len({v for v, _, _ in row}) > 1 for row in _responses(experience))
    assert split_turns > 0 and resumed > 0  # turns interrupted by a sync hold tokens of two versions


BASE = ["--pretrain", "m", "--prompt_data", "p.jsonl", "--remote_rm_url", "r.py"]


@pytest.mark.parametrize("argv,message", [
    (["--max_staleness", "2"], "--max_staleness .* needs --async_train"),
    (["--async_train", "--max_staleness", "0"], "--max_staleness must be >= 1"),
    (["--async_train", "--partial_rollout"], "--partial_rollout .* needs --async_train --max_staleness"),
    (["--async_train", "--max_staleness", "1", "--partial_rollout_chunk", "8"], "pass --partial_rollout too"),
    (["--async_train", "--max_staleness", "1", "--n_samples_per_prompt", "2", "--dynamic_filtering"],
     "--max_staleness with --dynamic_filtering"),
    (["--async_train", "--max_staleness", "1", "--partial_rollout", "--router_replay"],
     "--partial_rollout with --router_replay"),
    (["--async_train", "--max_staleness", "2", "--colocate_all_models"], "--async_train with --colocate_all_models"),
])
def test_flags_are_refused_where_they_cannot_act(argv, message):
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    with pytest.raises((OptionError, SystemExit, ValueError), match=message):
        train_ppo_ray.parse_args([*BASE, *argv])
    job = train_ppo_ray.parse_args([*BASE, "--async_train", "--max_staleness", "2", "--partial_rollout",
                                    "--partial_rollout_chunk", "8"])
    assert (job.ppo.max_staleness, job.ppo.partial_rollout, job.ppo.partial_rollout_chunk) == (2, True, 8)


# ----- end to end: a vLLM engine, a Megatron actor, Ray ------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """The demo's tiny model as it is (no SFT: nothing here needs it to learn) for test_ppo_e2e's flags."""
    from engine.cli import demo

    root = tmp_path_factory.mktemp("staleness")
    model, data = demo.prepare(root)
    reward = root / "odd_length.py"  # varies over the untrained model's answers: the actor updates
    reward.write_text("def reward_func(prompts, responses, labels):\n"
                      "    return [float(len(r.strip()) % 2) for r in responses]\n")
    return {"model": model, "prompts": f"json@{data}", "reward": str(reward), "root": root}


def test_fully_async_grpo_with_partial_rollouts_on_a_vllm_engine(tiny_setup, ray_cluster):
    """Chunks of 2 tokens (3 engine calls per response): the first rollout, resumed twice on the
    same weights, has the actor's own log-probs (the engine continued each sample from its token ids);
    later ones are up to 2 updates old, and the truncated IS weights correct them."""
    from engine.cli import train_ppo_ray
    from tests.rl_harness import ppo_args

    history = train_ppo_ray.main(ppo_args(
        tiny_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "3",
        "--n_samples_per_prompt", "4", "--rollout_batch_size", "8", "--train_batch_size", "32",
        "--micro_rollout_batch_size", "32", "--learning_rate", "1e-3",
        "--async_train", "--max_staleness", "2", "--partial_rollout", "--partial_rollout_chunk", "2",
        "--vllm_is_correction", "--vllm_is_truncated_threshold", "1.5",
    ))
    staleness = [h["rollout/staleness"] for h in history]
    assert len(history) == 3 and staleness[0] == 0 and max(staleness) <= 2, staleness
    for h in history:
        assert sum(h[f"rollout/staleness_hist/{k}"] for k in range(3)) == pytest.approx(1.0)
        assert h["vllm_is/max"] <= 1.5 + 1e-6
    assert history[0]["rollout_logprob_abs_diff"] < 1e-4
    assert min(h["rollout_logprob_abs_diff"] for h in history if h["rollout/staleness"] > 0) > 1e-4
