"""Multi-turn agent rollouts (issue 32): token-in, token-out trajectories, loss masks, failures,
concurrency, OpenRLHF agent files, the built-in environments.

The executor's tests drive it with ``Scripted``: a ``TurnGenerator`` (the executor's own
interface to generation) whose outputs are a function of the token ids it is handed, so every
turn's input is checked to be the exact trajectory so far. The engines themselves run in
tests/test_ppo_e2e.py (test_agent_file_runs_multi_turn_grpo...).
"""
from __future__ import annotations

import asyncio
import textwrap

import pytest
import torch

from engine.rl.agents.executor import AgentError, AgentExecutor, AgentRequest, agent_metrics
from engine.rl.rollout import RolloutSample, SamplingConfig
from engine.tasks.environment import Environment, Step

EOS = 2


class LossyTokenizer:
    """Decode and encode that do not round-trip: decoding maps every id to a letter, encoding maps
    every character to an id in [400, 490) (no engine output here is ever one; inside the tiny
    models' vocabulary). A model token that went through text would come back as a different id."""

    eos_token_id = EOS
    chat_template = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == EOS))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [400 + ord(c) % 90 for c in text]}


class Scripted:
    """A turn generator: the continuation of ``ids`` is ``[len(ids) % 50 + 3, 7, EOS]`` (capped at
    ``max_new_tokens``), log-prob ``-0.1 * k`` for its k-th token. Records each turn's input."""

    def __init__(self):
        self.inputs: list[list[int]] = []

    async def generate(self, token_ids, sampling):
        self.inputs.append(list(token_ids))
        await asyncio.sleep(0)
        tokens = [len(token_ids) % 50 + 3, 7, EOS][:sampling.max_new_tokens]
        reason = "stop" if tokens[-1] == EOS else "length"
        return RolloutSample(prompt_index=0, sample_index=0, response_token_ids=tokens,
                             logprobs=[-0.1 * (k + 1) for k in range(len(tokens))], finish_reason=reason)


class Turns(Environment):
    """Done after ``turns`` model turns; replies ``"r<turn>"`` as text; reward 0.25 per turn."""

    def __init__(self, turns=3, fail=None):
        self.turns, self.fail = turns, fail

    async def reset(self, prompt, label):
        self.seen, self.label = [], label
        if self.fail == "reset":
            raise RuntimeError("no sandbox")

    async def step(self, action):
        self.seen.append(action)
        if self.fail == "raise" and len(self.seen) == 2:
            raise RuntimeError("the tool crashed")
        if self.fail == "hang" and len(self.seen) == 2:
            await asyncio.sleep(60)
        return Step(reward=0.25, done=len(self.seen) == self.turns, text=f"r{len(self.seen)}", info={"seen": 1.0})


def _executor(make, **overrides):
    return AgentExecutor(**{"make_environment": make, "tokenizer": LossyTokenizer(), "max_turns": 5, "max_len": 64,
                            "step_timeout_s": 5.0, **overrides})


def _run(executor, requests, n=1, generator=None, max_new_tokens=8):
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, n_samples_per_prompt=n)
    return asyncio.run(executor.run(requests, sampling, generator or Scripted()))


PROMPT = AgentRequest(prompt_ids=[11, 12, 13], prompt="3+4=", label="7")


def test_trajectory_is_the_engine_outputs_and_environment_ids_never_retokenised():
    generator = Scripted()
    [sample] = _run(_executor(Turns), [PROMPT], generator=generator)
    tokenizer = LossyTokenizer()
    # Rebuilt from what the engine returned and what the environment said.
    expected, model_positions = [], []
    for turn, given in enumerate(generator.inputs):
        assert given == PROMPT.prompt_ids + expected  # each turn continues from the exact ids so far
        output = [len(given) % 50 + 3, 7, EOS]
        model_positions += range(len(expected), len(expected) + len(output))
        expected += output
        if turn < 2:
            expected += tokenizer(f"r{turn + 1}")["input_ids"]
    assert len(generator.inputs) == 3
    assert sample.response_token_ids == expected
    assert sample.loss_mask == tuple(1 if t in model_positions else 0 for t in range(len(expected)))
    assert [sample.response_token_ids[t] for t in model_positions] == [t for given in generator.inputs
                                                                       for t in (len(given) % 50 + 3, 7, EOS)]
    # The engine's log-probs on the model's tokens, zero on the environment's.
    assert sample.logprobs == [(-0.1 * (1 + model_positions.index(t) % 3)) if t in model_positions else 0.0
                               for t in range(len(expected))]
    assert sample.segments == ((0, 3), (5, 8), (10, 13))
    assert sample.reward == pytest.approx(0.75) and sample.finish_reason == "stop"
    assert sample.info["turns"] == 3 and sample.info["failed"] == 0
    assert sample.trained_tokens() == [float(m) for m in sample.loss_mask]


def test_turns_and_length_budgets_end_a_trajectory():
    [turns] = _run(_executor(lambda: Turns(turns=10), max_turns=2), [PROMPT])
    assert turns.finish_reason == "max_turns" and turns.info["turns"] == 2 and not turns.truncated
    assert turns.response_token_ids[-1] == EOS  # the environment's reply after the last turn is not appended
    # 3 prompt tokens + 3 + 2 (reply) + 3 + 2 = 13; a budget of 15 leaves 2 tokens for the third turn.
    [cut] = _run(_executor(lambda: Turns(turns=10), max_len=15), [PROMPT])
    assert cut.finish_reason == "length" and cut.truncated and cut.info["truncated"] == 1.0
    assert len(PROMPT.prompt_ids) + len(cut.response_token_ids) == 15
    assert cut.loss_mask[-2:] == (1, 1)


def test_an_environment_that_raises_or_hangs_fails_its_trajectory_only():
    kinds = ["raise", "hang", None, "reset"]
    made = iter(kinds)
    executor = _executor(lambda: Turns(fail=next(made)), step_timeout_s=0.3)
    samples = _run(executor, [PROMPT] * 4)
    assert [s.finish_reason for s in samples] == ["error", "error", "stop", "error"]
    assert [s.reward for s in samples] == [0.0, 0.0, pytest.approx(0.75), 0.0]
    assert [s.info["timed_out"] for s in samples] == [0.0, 1.0, 0.0, 0.0]
    assert samples[3].loss_mask == (0,)  # failed before any turn: one token that trains nothing
    assert sorted(executor.failures) == [
        "prompt 0 sample 0: step of turn 2 raised RuntimeError: the tool crashed",
        "prompt 1 sample 0: step of turn 2 took longer than --agent_step_timeout 0.3 s",
        "prompt 3 sample 0: reset raised RuntimeError: no sandbox"]
    metrics = agent_metrics(samples)
    assert metrics["agent/failed"] == 3 and metrics["agent/timed_out"] == 1
    made = iter(["raise"])
    with pytest.raises(AgentError, match="prompt 0 sample 0: step of turn 2 raised RuntimeError.*--agent_fail_fast"):
        _run(_executor(lambda: Turns(fail=next(made)), fail_fast=True), [PROMPT])


def test_agent_metrics_average_a_number_over_the_trajectories_that_report_it():
    def sample(**info):
        return RolloutSample(prompt_index=0, sample_index=0, response_token_ids=[1], logprobs=[0.0],
                             finish_reason="stop", info={"failed": 0.0, **info})

    metrics = agent_metrics([sample(turns=3.0, found=1.0, turns_to_find=3.0),
                             sample(turns=5.0, found=1.0, turns_to_find=5.0),
                             sample(turns=9.0, found=0.0, failed=1.0)])
    assert metrics["agent/turns_to_find"] == 4.0  # the lost game reports none: not averaged as a 0
    assert metrics["agent/turns"] == pytest.approx(17 / 3) and metrics["agent/found"] == pytest.approx(2 / 3)
    assert metrics["agent/failed"] == 1.0  # a count


class _ThreadPool:
    """A pool whose ``submit_generate`` answers from a thread (as the Ray pool's wait does), with
    the Scripted rule; records each batch."""

    def __init__(self):
        self.batches = []

    def submit_generate(self, prompt_token_ids, sampling):
        self.batches.append(len(prompt_token_ids))
        outs = [[len(ids) % 50 + 3, 7, EOS][:sampling.max_new_tokens] for ids in prompt_token_ids]
        samples = [RolloutSample(prompt_index=i, sample_index=0, response_token_ids=o, logprobs=[-0.1] * len(o),
                                 finish_reason="stop") for i, o in enumerate(outs)]

        class Done:
            def result(self):
                return samples
        return Done()


class SlowTool(Turns):
    in_flight = peak = 0

    async def step(self, action):
        SlowTool.in_flight += 1
        SlowTool.peak = max(SlowTool.peak, SlowTool.in_flight)
        await asyncio.sleep(0.05)
        SlowTool.in_flight -= 1
        return await super().step(action)


def test_trajectories_interleave_and_turns_are_batched():
    """Eight trajectories of three turns: every environment step is awaited while the others run
    (all eight in flight at once), and each round of turns reaches the engines as one batch."""
    from engine.rl.agents.turns import PoolTurns

    pool = _ThreadPool()
    samples = _run(_executor(SlowTool), [PROMPT] * 4, n=2, generator=PoolTurns(pool))
    assert SlowTool.peak == 8
    assert pool.batches == [8, 8, 8]
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(4) for j in range(2)]
    assert all(s.finish_reason == "stop" and s.info["turns"] == 3 for s in samples)


# ------------------------------------------------------------------ per-turn rewards

class Graded(Turns):
    """Three turns rewarded 0.5, 0 and 1."""

    async def step(self, action):
        step = await super().step(action)
        return Step(reward=(0.5, 0.0, 1.0)[len(self.seen) - 1], done=step.done, text=step.text)


def test_per_turn_rewards_sit_on_each_turns_last_token_and_are_discounted():
    """--turn_rewards per_turn: a turn's reward on its own last token, so reinforce's return of a
    token is the discounted sum of the rewards of its turn and the later ones, over the model's tokens
    only (environment tokens skipped); --turn_rewards sum (the default) keeps the summed reward on
    the last token; a group estimator refuses per-turn rewards."""
    from engine.rl.advantages import AdvantageInputs, compute_advantages, per_turn_rewards
    from engine.rl.config import AdvantageConfig
    from engine.rl.ppo_trainer import _earlier_turns
    from engine.rl.sequences import build_rollout_batch

    [sample] = _run(_executor(Graded), [PROMPT])
    assert sample.turn_rewards == (0.5, 0.0, 1.0) and sample.reward == pytest.approx(1.5)
    assert sample.segments == ((0, 3), (5, 8), (10, 13))
    batch = build_rollout_batch([PROMPT.prompt_ids], [sample.response_token_ids], pad_id=0,
                                response_loss_masks=[sample.loss_mask])
    mask = batch.action_mask
    placed = per_turn_rewards([_earlier_turns(sample, len(PROMPT.prompt_ids))], mask)
    # Response token i is predicted at label position len(prompt) - 1 + i: turns 1 and 2 end at 2 and 7.
    assert placed[0].nonzero()[:, 0].tolist() == [4] and placed[0, 4] == 0.5  # turn 2's reward is 0
    gamma = 0.9
    rewards = torch.tensor([sample.reward])
    config = AdvantageConfig(estimator="reinforce", gamma=gamma)
    _, returns = compute_advantages(AdvantageInputs(rewards=rewards, action_mask=mask, turn_rewards=placed), config)
    trained = mask[0].nonzero()[:, 0].tolist()
    ends = {2 + 2: 0.5, 2 + 7: 0.0, 2 + 12: 1.0}  # label position of each turn's last token: its reward
    expected = [sum(ends.get(q, 0.0) * gamma ** k for k, q in enumerate(trained[i:])) for i in range(len(trained))]
    assert returns[0, trained].tolist() == pytest.approx(expected)
    assert returns[0, trained[0]] < rewards[0]  # discounted: the last turn's reward counts 0.9 ** 8 there
    # Summed (the default): the trajectory's reward on its last token; undiscounted, every token's return.
    _, summed = compute_advantages(AdvantageInputs(rewards=rewards, action_mask=mask),
                                   AdvantageConfig(estimator="reinforce", gamma=1.0))
    assert summed[0, trained].tolist() == pytest.approx([1.5] * len(trained))
    _, undiscounted = compute_advantages(AdvantageInputs(rewards=rewards, action_mask=mask, turn_rewards=placed),
                                         AdvantageConfig(estimator="reinforce", gamma=1.0))
    assert undiscounted[0, trained[0]] == pytest.approx(1.5)  # the same total from the first token
    assert undiscounted[0, trained[3]] == pytest.approx(1.0)  # turn 1's reward is not credited to turn 2
    with pytest.raises(ValueError, match="grpo baselines whole trajectories"):
        compute_advantages(AdvantageInputs(rewards=rewards.repeat(2), action_mask=mask.repeat(2, 1),
                                           turn_rewards=placed.repeat(2, 1)),
                           AdvantageConfig(estimator="grpo", n_samples_per_prompt=2))


def test_the_loop_scores_per_turn_rewards_from_its_trajectories():
    """The trainer's scoring and advantage phases on executor trajectories (two prompts, two samples
    each; the second prompt's games end after one turn): with per-turn rewards the returns
    are the discounted per-turn ones; without, every token of a trajectory gets its summed reward."""
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.ppo_trainer import PPOConfig, PPOTrainer

    class Tokenizer(LossyTokenizer):
        pad_token_id = 0

        def batch_decode(self, ids, skip_special_tokens=False):
            return [self.decode(i, skip_special_tokens) for i in ids]

    class Short(Graded):
        async def reset(self, prompt, label):
            await super().reset(prompt, label)
            self.turns = int(label)

    requests = [AgentRequest(prompt_ids=[11 + i, 12], prompt=f"p{i}", label=turns) for i, turns in enumerate((3, 1))]
    samples = _run(_executor(Short), requests, n=2)
    rows = [{"prompt": r.prompt, "prompt_ids": r.prompt_ids, "label": r.label} for r in requests]
    gamma = 0.9

    def returns(per_turn):
        config = PPOConfig(advantage=AdvantageConfig(estimator="reinforce", gamma=gamma, n_samples_per_prompt=2),
                           rollout_batch_size=2,
                           n_samples_per_prompt=2, train_batch_size=4, init_kl_coef=0.0)
        trainer = PPOTrainer(config, prompts=rows, tokenizer=Tokenizer(), rollouts=None, actor=None,
                             sampling=SamplingConfig(), turn_rewards=per_turn)
        batch, meta = trainer.to_batch(rows, samples)
        experience, rewards, _ = trainer.score(batch, meta)
        experience, _ = trainer.advantages(experience, rewards)
        return experience.returns, experience.action_mask

    per_turn, mask = returns(True)
    summed, _ = returns(False)
    for row in range(4):
        trained = mask[row].nonzero()[:, 0].tolist()
        ends = [trained[k] for k in range(len(trained)) if k == len(trained) - 1 or trained[k + 1] != trained[k] + 1]
        earned = dict(zip(ends, (0.5, 0.0, 1.0)))
        expected = [sum(earned.get(q, 0.0) * gamma ** k for k, q in enumerate(trained[i:])) for i in range(len(trained))]
        assert per_turn[row, trained].tolist() == pytest.approx(expected)
        assert len(ends) == (3, 3, 1, 1)[row]
        assert summed[row, trained].tolist() == pytest.approx([samples[row].reward * gamma ** (len(trained) - 1 - i)
                                                               for i in range(len(trained))])


def test_turn_rewards_flag_is_refused_where_it_cannot_act():
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    base = ["--pretrain", "x", "--prompt_data", "y"]
    agent = base + ["--agent_task", "guess_number", "--turn_rewards", "per_turn"]
    with pytest.raises((OptionError, ValueError), match="--turn_rewards need multi-turn rollouts"):
        train_ppo_ray.parse_args(base + ["--turn_rewards", "per_turn"])
    with pytest.raises(OptionError, match="per_turn with --advantage_estimator grpo: .* gae or reinforce"):
        train_ppo_ray.parse_args(agent + ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "4"])
    with pytest.raises(OptionError, match="per_turn with --remote_rm_url"):
        train_ppo_ray.parse_args(agent + ["--advantage_estimator", "reinforce", "--remote_rm_url", "r.py"])
    job = train_ppo_ray.parse_args(agent + ["--advantage_estimator", "reinforce", "--gamma", "0.9"])
    assert job.agent.turn_rewards == "per_turn"


# ------------------------------------------------------------------ OpenRLHF's agent protocol

# OpenRLHF's examples/python/agent_func.py (a random 1-3 step environment), rewritten: only the
# import line differs from the original's `from openrlhf.utils.agent import ...`.
OPENRLHF_EXAMPLE = '''
import random
from typing import Any, Dict

import torch
from engine.rl.agents.openrlhf import AgentExecutorBase, AgentInstanceBase


class ExampleAgent(AgentInstanceBase):
    async def __init__(self, *args, **kwargs):
        self.step_idx = 0
        self.max_steps = random.randint(1, 3)

    async def reset(self, states: dict, **kwargs):
        return {"observation": states["observation"]}

    async def step(self, states: dict, **kwargs) -> Dict[str, Any]:
        done = self.step_idx >= self.max_steps
        reward = torch.randint(0, 2, (1,)).float() if done else torch.tensor(0)
        environment_feedback = (
            "\\n\\nHuman: [CORRECT]\\n</s>"
            if done
            else "\\n\\nHuman: [INCORRECT]\\nPlease analyze the issues and try again.\\n</s>\\n\\nAssistant: "
        )
        self.step_idx += 1
        return {
            "rewards": reward,
            "scores": reward,
            "environment_feedback": environment_feedback,
            "done": done,
            "sampling_params": states.get("sampling_params", None),
            "extra_logs": {"dummy_scores": reward},
        }


class AgentExecutor(AgentExecutorBase):
    def __init__(self, max_steps, max_length, llm_engine, hf_tokenizer, result_queue):
        super().__init__(ExampleAgent, max_steps, max_length, llm_engine, hf_tokenizer, result_queue)

    async def execute(self, prompt, label, sampling_params):
        return await super().execute(prompt, label, sampling_params)
'''
# The test's additions: the n-th trajectory of every PER_ROLLOUT raises at its first step, the (n+2)-th hangs.
FAILURES = '''
import asyncio
import itertools

_COUNT = itertools.count()


class AgentInstance(ExampleAgent):
    async def __init__(self, *args, **kwargs):
        await super().__init__(*args, **kwargs)
        self.index = next(_COUNT) % PER_ROLLOUT

    async def step(self, states, **kwargs):
        if self.index == FAIL_AT:
            raise RuntimeError("the tool crashed")
        if self.index == FAIL_AT + 2:
            await asyncio.sleep(60)
        return await super().step(states, **kwargs)
'''


def write_agent_file(path, *, fail_at: int | None = None, per_rollout: int = 64) -> str:
    failures = FAILURES.replace("FAIL_AT", str(fail_at)).replace("PER_ROLLOUT", str(per_rollout))
    text = OPENRLHF_EXAMPLE + (failures if fail_at is not None
                               else "\nAgentInstance = ExampleAgent\n")
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_openrlhf_example_agent_runs_through_the_executor(tmp_path):
    from engine.rl.agents.openrlhf import environment_factory

    random_ = __import__("random")
    random_.seed(0)
    torch.manual_seed(0)
    make = environment_factory(write_agent_file(tmp_path / "agent_func.py"))
    samples = _run(_executor(make, max_len=400), [PROMPT] * 6)
    tokenizer = LossyTokenizer()
    incorrect = tokenizer("\n\nHuman: [INCORRECT]\nPlease analyze the issues and try again.\n</s>\n\nAssistant: ")
    for sample in samples:
        turns = int(sample.info["turns"])
        assert 2 <= turns <= 4 and sample.finish_reason == "stop"  # done after max_steps + 1 steps
        assert sample.reward in (0.0, 1.0) and sample.info["dummy_scores"] == sample.reward
        # Between the turns: the feedback's ids, masked.
        feedback = incorrect["input_ids"]
        assert len(sample.response_token_ids) == 3 * turns + len(feedback) * (turns - 1)
        assert sample.response_token_ids[3:3 + len(feedback)] == feedback
        assert sample.loss_mask[3:3 + len(feedback)] == (0,) * len(feedback)
    assert len({int(s.info["turns"]) for s in samples}) > 1  # random.randint(1, 3) per instance


def test_an_agent_file_with_openrlhfs_import_line_is_refused_saying_what_to_change(tmp_path):
    from engine.rl.agents.openrlhf import load_agent_class

    path = tmp_path / "agent.py"
    path.write_text(OPENRLHF_EXAMPLE.replace("engine.rl.agents.openrlhf", "openrlhf.utils.agent"))
    with pytest.raises(ValueError, match="imports openrlhf.*from engine.rl.agents.openrlhf import AgentExecutorBase"):
        load_agent_class(str(path))
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no AgentInstance class"):
        load_agent_class(str(path))
    with pytest.raises(ValueError, match="--agent_func_path .*missing.py: no such file"):
        load_agent_class(str(tmp_path / "missing.py"))


def test_agent_flags_are_refused_without_an_environment():
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    base = ["--pretrain", "x", "--prompt_data", "y"]
    with pytest.raises((OptionError, ValueError), match="--max_turns, --agent_fail_fast need multi-turn rollouts"):
        train_ppo_ray.parse_args(base + ["--max_turns", "3", "--agent_fail_fast"])
    with pytest.raises((OptionError, ValueError), match="--agent_task 'chess' is not known"):
        from engine.tasks.environment import environment_factory
        environment_factory("chess")
    job = train_ppo_ray.parse_args(base + ["--agent_task", "calculator_tool", "--max_turns", "3", "--max_len", "96"])
    assert job.agent.turns == 3 and train_ppo_ray.trajectory_len(job) == 96


# ------------------------------------------------------------------ built-in environments

def test_calculator_tool_and_guessing_game():
    from engine.tasks.calculator_tool import CalculatorTool, make_rows, sft_rows
    from engine.tasks.guess_number import GuessNumber

    async def play(env, label, actions):
        await env.reset("7*8=", label)
        return [await env.step(a) for a in actions]

    call, answer = asyncio.run(play(CalculatorTool(), "56", ["calc(7*8)", "56"]))
    assert call.text == "=56\n" and not call.done and call.info == {"tool_use": 1.0}
    assert answer.done and answer.reward == 1.0 and answer.info == {"tool_use": 1.0, "correct": 1.0}
    [direct] = asyncio.run(play(CalculatorTool(), "56", ["56"]))
    assert direct.reward == 0.5 and direct.done
    bad, wrong = asyncio.run(play(CalculatorTool(), "56", ["calc(__import__('os'))", "54"]))
    assert bad.text == "=error\n" and wrong.reward == 0.0
    rows = make_rows(4, seed=1)
    assert all(int(r["label"]) == eval(r["prompt"].rstrip("=")) for r in rows)
    demo = sft_rows(rows[:1], eos="</s>")
    assert demo[0]["answer"] == f"calc({rows[0]['prompt'][:-1]})"
    assert demo[1]["prompt"].endswith(f"</s>={rows[0]['label']}\n") and demo[1]["answer"] == rows[0]["label"]

    # The learning tests' warm start: some first turns answer at once, every row shows the answer after the tool.
    mixed = sft_rows(make_rows(200, seed=2), eos="</s>", tool_use=0.3)
    first = mixed[::2]
    assert all(r["answer"].startswith("calc(") or r["answer"].isdigit() for r in first)
    assert 0.2 < sum(r["answer"].startswith("calc(") for r in first) / len(first) < 0.4
    assert all(r["prompt"].endswith("\n") and r["answer"].isdigit() for r in mixed[1::2])

    steps = asyncio.run(play(GuessNumber(), "6", ["3", "8", "6"]))
    assert [s.text for s in steps[:2]] == [" higher\n", " lower\n"]
    assert steps[2].done and steps[2].reward == pytest.approx(0.6)
    assert steps[2].info == {"found": 1.0, "turns_to_find": 3.0} and "turns_to_find" not in steps[1].info
    from engine.tasks.guess_number import guesses
    from engine.tasks.guess_number import sft_rows as guess_rows
    assert [guesses(t, "scan") for t in (1, 3)] == [[1], [1, 2, 3]]
    assert guesses(6, "bisect") == [5, 7, 6] and max(len(guesses(t, "bisect")) for t in range(1, 10)) == 4
    game = guess_rows([{"prompt": "guess:", "label": "3"}], eos="</s>", bisect=1.0)
    assert game == [{"prompt": "guess:", "answer": "5"}, {"prompt": "guess:5</s> lower\n", "answer": "2"},
                    {"prompt": "guess:5</s> lower\n2</s> higher\n", "answer": "3"}]


def test_environment_messages_render_with_the_chat_template():
    from engine.rl.agents.render import observation_ids, render_messages
    from models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    text = render_messages(tokenizer, [{"role": "tool", "content": "56"}])
    assert text == "<|im_start|>tool\n56<|im_end|>\n<|im_start|>assistant\n"
    ids = observation_ids(tokenizer, Step(messages=[{"role": "tool", "content": "56"}]))
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        render_messages(LossyTokenizer(), [{"role": "tool", "content": "56"}])


# ------------------------------------------------------------------ the loss sees the model's tokens only

def _three_turn_experiences():
    """Four 3-turn trajectories as the trainer's rows, three ways: advantages on every response
    token (environment tokens included) with the executor's masks; the same with other advantages
    on the environment tokens; and every response token trained (no masks). Also the mask built
    directly from the generator's record of what it emitted."""
    from engine.rl.experience import Experience
    from engine.rl.rollout import rollout_loss_masks
    from engine.rl.sequences import build_rollout_batch

    requests = [AgentRequest(prompt_ids=list(range(60 + 20 * i, 60 + 20 * i + k)), prompt="p", label=None)
                for i, k in enumerate((2, 3, 5, 4))]  # no prompt is a prefix of another
    generator = Scripted()
    samples = _run(_executor(Turns), requests, generator=generator)
    prompts = [r.prompt_ids for r in requests]
    responses = [s.response_token_ids for s in samples]
    batch = build_rollout_batch(prompts, responses, pad_id=0, response_loss_masks=rollout_loss_masks(samples))
    direct = torch.zeros_like(batch.action_mask)  # label position t holds token t + 1
    for given in generator.inputs:  # each turn's input is prompt + response so far: its output follows
        row = next(i for i, (p, r) in enumerate(zip(prompts, responses)) if (p + r)[:len(given)] == given)
        direct[row, len(given) - 1:len(given) + 2] = 1.0  # the turn's 3 tokens
    g = torch.Generator().manual_seed(0)
    response = build_rollout_batch(prompts, responses, pad_id=0).action_mask
    advantages = torch.randn(response.shape, generator=g) * response
    other = torch.where(batch.action_mask.bool(), advantages, torch.randn(response.shape, generator=g) * response)
    masked = Experience.from_rollout(batch).with_fields(advantages=advantages)
    return {"masked": masked, "other_env_advantages": masked.with_fields(advantages=other),
            "unmasked": masked.with_fields(action_mask=response)}, direct


def _multi_turn_mask_body(rank, world, path, grid, experiences):
    from tests.test_policy_losses import _frozen_worker, _gradient, _settings

    actor = _frozen_worker(rank, world, path, grid)
    out = {}
    for packed in (False, True):
        settings = _settings(train_batch_size=4, micro_train_batch_size=2, packing_samples=packed,
                             loss_agg_mode="token-mean")
        for name, experience in experiences.items():
            metrics = actor.train(experience, "policy", settings)
            out[name, packed] = (metrics["policy_loss"], metrics["num_tokens"], _gradient(actor))
    return out


def test_three_turn_loss_touches_exactly_the_model_tokens_at_tp2_and_packed(tiny_models):
    """The executor's masks are exactly the model's tokens (equal to the mask built from what the
    generator emitted); trained at TP=2, padded and packed: the policy loss is the direct token-mean
    of -A over those tokens, the gradient does not change when the environment tokens' advantages
    do, and training every response token gives another gradient."""
    from tests.dist_harness import run_distributed
    from tests.test_policy_losses import _assert_same_gradient, _direct_policy_loss

    experiences, direct = _three_turn_experiences()
    masked = experiences["masked"]
    assert torch.equal(masked.action_mask, direct)
    assert 0 < masked.action_mask.sum() < experiences["unmasked"].action_mask.sum()
    expected_loss = _direct_policy_loss(masked.with_fields(action_mask=direct), "token-mean")
    results = run_distributed(_multi_turn_mask_body, 2, args=(tiny_models["llama"],
                                                              {"tensor_model_parallel_size": 2}, experiences),
                              timeout=400)
    for result in results:
        reference = result["masked", False][2]
        for packed in (False, True):
            loss, num_tokens, gradient = result["masked", packed]
            assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-7), packed
            assert num_tokens == int(direct.sum())
            _assert_same_gradient(gradient, reference, ("packed", packed))
            _assert_same_gradient(result["other_env_advantages", packed][2], gradient, ("env advantages", packed))
            unmasked = result["unmasked", packed][2]
            assert max(float((a - b).abs().max()) for a, b in zip(gradient, unmasked)) > 1e-4


def test_tool_calls_in_the_hermes_format_run_and_answer_as_tool_messages():
    from engine.tasks.tool_environment import ToolEnvironment, parse_tool_calls, tool_schemas

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    async def lookup(key: str):
        await asyncio.sleep(0)
        return {"key": key, "value": 3}

    class Tools(ToolEnvironment):
        tools = {"multiply": multiply, "lookup": lookup}

        async def finish(self, answer):
            return Step(reward=float(answer.strip() == self.label), done=True)

    async def play(actions):
        env = Tools()
        await env.reset("p", "56")
        return [await env.step(a) for a in actions]

    calls = ('<tool_call>{"name": "multiply", "arguments": {"a": 7, "b": 8}}</tool_call>'
             '<tool_call>{"name": "lookup", "arguments": {"key": "x"}}</tool_call>')
    first, second, last = asyncio.run(play([calls, "<tool_call>{oops}</tool_call><tool_call>{\"name\": \"nope\"}"
                                                   "</tool_call>", "56"]))
    assert first.messages == [{"role": "tool", "content": "56"},
                              {"role": "tool", "content": '{"key": "x", "value": 3}'}]
    assert second.messages[0]["content"].startswith("malformed tool call")
    assert second.messages[1]["content"] == "unknown tool 'nope'; tools: lookup, multiply"
    assert last.done and last.reward == 1.0
    assert parse_tool_calls("no call") == []
    assert tool_schemas({"multiply": multiply})[0]["function"] == {
        "name": "multiply", "description": "Multiply two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}
