"""Multi-turn trajectories, token-in, token-out, many at once.

Each trajectory is a coroutine: the model's turn continues from the trajectory's exact token ids
so far (the prompt's, the engine's own outputs, the environment's replies), the environment's
reply is tokenised and appended as ids, and the sample records which tokens are the model's
(``loss_mask`` 1, with the engine's log-probs) and which the environment's (0). The model's
tokens are decoded only for the environment to read, never tokenised again. While one
trajectory awaits its environment, the others' turns go on generating (``engine.rl.agents.turns``
batches whatever turns are ready).

Finish reasons of a trajectory: "stop" (the environment said done), "max_turns" (--max_turns
model turns without done), "length" (--max_len reached: truncated), "error" (the environment
raised or passed --agent_step_timeout: reward 0, counted as agent/failed; an error instead under
--agent_fail_fast).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Protocol

from engine.rl.agents.render import encode_text, observation_ids
from engine.rl.rollout import RolloutSample, SamplingConfig
from engine.tasks.environment import Environment, Step

SAMPLING_OVERRIDES = {"temperature", "top_p", "top_k", "max_new_tokens"}


class AgentError(RuntimeError):
    """An environment failed under --agent_fail_fast (names the sample, the turn and the cause)."""


class TurnGenerator(Protocol):
    async def generate(self, token_ids: list[int], sampling: SamplingConfig) -> RolloutSample:
        """One continuation of ``token_ids`` (``sampling.n_samples_per_prompt`` is 1)."""


@dataclass(frozen=True)
class AgentRequest:
    """One prompt of a rollout: its token ids (what the model starts from), text and label."""

    prompt_ids: list[int]
    prompt: str
    label: Any = None


@dataclass
class _Trajectory:
    prompt_ids: list[int]
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)
    # Per model token, the version of the weights that sampled it (--partial_rollout: the engine
    # calls say; None elsewhere), by response position.
    versions: dict[int, int] = field(default_factory=dict)
    reward: float = 0.0
    turn_rewards: list[float] = field(default_factory=list)  # one per model turn (segment)
    turns: int = 0
    info: dict[str, float] = field(default_factory=dict)

    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response)

    def add_model(self, tokens: list[int], logprobs: list[float] | None, versions=None) -> None:
        start = len(self.response)
        if versions is not None:
            self.versions.update(zip(range(start, start + len(tokens)), versions))
        self.response += tokens
        self.mask += [1] * len(tokens)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)
        self.segments.append((start, len(self.response)))
        self.turn_rewards.append(0.0)
        self.turns += 1

    def add_environment(self, tokens: list[int]) -> None:
        self.response += tokens
        self.mask += [0] * len(tokens)
        self.logprobs += [0.0] * len(tokens)

    def token_versions(self) -> tuple[int, ...] | None:
        """Per response token, the version of the weights that sampled it; an environment token (trained
        by nothing) takes the version of the model token before it (the first model token's when none)."""
        if not self.versions or len(self.versions) != sum(self.mask):
            return None
        current = self.versions[min(self.versions)]
        out = []
        for position in range(len(self.response)):
            current = self.versions.get(position, current)
            out.append(current)
        return tuple(out)


class _EnvironmentFailed(Exception):
    def __init__(self, what: str, cause: BaseException, *, timed_out: bool):
        super().__init__(what)
        self.what, self.cause, self.timed_out = what, cause, timed_out


@dataclass(kw_only=True)
class AgentExecutor:
    """Runs every trajectory of a rollout through one environment instance each."""

    make_environment: Callable[[], Environment]
    tokenizer: Any
    max_turns: int
    max_len: int
    step_timeout_s: float
    fail_fast: bool = False
    failures: list[str] = field(default_factory=list)  # the last rollout's failure messages

    async def run(self, requests: list[AgentRequest], sampling: SamplingConfig,
                  generator: TurnGenerator) -> list[RolloutSample]:
        """``sampling.n_samples_per_prompt`` trajectories of each request, ordered by (prompt, sample)."""
        self.failures = []
        n = sampling.n_samples_per_prompt
        turn_sampling = replace(sampling, n_samples_per_prompt=1)
        tasks = [asyncio.ensure_future(self.trajectory(i, j, request, turn_sampling, generator))
                 for i, request in enumerate(requests) for j in range(n)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # --agent_fail_fast or an engine error: nothing keeps running
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def trajectory(self, prompt_index: int, sample_index: int, request: AgentRequest,
                         sampling: SamplingConfig, generator: TurnGenerator) -> RolloutSample:
        where = f"prompt {prompt_index} sample {sample_index}"
        trajectory = _Trajectory(list(request.prompt_ids))
        finish = "max_turns"
        try:
            environment = self.make_environment()
            first = await self._call(environment.reset(request.prompt, request.label), f"{where}: reset")
            trajectory.add_environment(self._first_observation(first, request))
            finish = await self._turns(environment, trajectory, sampling, generator, where)
        except _EnvironmentFailed as failed:
            finish = "error"
            self._failed(trajectory, failed)
        return self._sample(prompt_index, sample_index, trajectory, finish)

    async def _turns(self, environment: Environment, trajectory: _Trajectory, sampling: SamplingConfig,
                     generator: TurnGenerator, where: str) -> str:
        for turn in range(self.max_turns):
            budget = self.max_len - trajectory.length()
            if budget <= 0:
                return "length"
            tokens = min(sampling.max_new_tokens, budget)
            turn_sampling = replace(sampling, max_new_tokens=tokens, min_new_tokens=min(sampling.min_new_tokens, tokens))
            output = await generator.generate(trajectory.prompt_ids + trajectory.response, turn_sampling)
            trajectory.add_model(list(output.response_token_ids), output.logprobs, output.token_versions)
            action = self.tokenizer.decode(output.response_token_ids, skip_special_tokens=True)  # for reading only
            if hasattr(environment, "bind_sampling"):  # OpenRLHF agents see the turn's sampling settings
                environment.bind_sampling(turn_sampling)
            step = await self._call(environment.step(action), f"{where}: step of turn {turn + 1}")
            if not isinstance(step, Step):
                raise TypeError(f"{type(environment).__name__}.step returned a {type(step).__name__}, not a "
                                "engine.tasks.environment.Step")
            trajectory.reward += float(step.reward)
            trajectory.turn_rewards[-1] = float(step.reward)
            trajectory.info.update({k: float(v) for k, v in step.info.items()})
            if step.done:
                return "stop"
            if turn + 1 == self.max_turns:
                break  # no model turn follows: the environment's last reply is not appended
            reply = observation_ids(self.tokenizer, step)
            if trajectory.length() + len(reply) >= self.max_len:  # no room for the reply and one model token
                return "length"
            trajectory.add_environment(reply)
            sampling = _override(sampling, step)
        return "max_turns"

    def _first_observation(self, first: str | None, request: AgentRequest) -> list[int]:
        """The environment's extra first-observation tokens: none when ``reset`` kept the prompt."""
        if first is None or first == request.prompt:
            return []
        if not first.startswith(request.prompt):
            raise ValueError("an environment's reset returned an observation that does not start with the prompt "
                             f"({first[:60]!r} for {request.prompt[:60]!r}): return the prompt, or the prompt "
                             "with text appended")
        return encode_text(self.tokenizer, first[len(request.prompt):])

    async def _call(self, call: Awaitable, what: str):
        try:
            return await asyncio.wait_for(call, timeout=self.step_timeout_s)
        except asyncio.TimeoutError as err:
            failed = _EnvironmentFailed(f"{what} took longer than --agent_step_timeout {self.step_timeout_s:g} s",
                                        err, timed_out=True)
        except Exception as err:  # the environment's own error: one trajectory's failure
            failed = _EnvironmentFailed(f"{what} raised {type(err).__name__}: {err}", err, timed_out=False)
        if self.fail_fast:
            raise AgentError(f"environment failed ({failed.what}); --agent_fail_fast stops the run") from failed.cause
        raise failed

    def _failed(self, trajectory: _Trajectory, failed: _EnvironmentFailed) -> None:
        self.failures.append(failed.what)
        trajectory.reward = 0.0
        trajectory.turn_rewards = [0.0] * len(trajectory.turn_rewards)
        trajectory.info.update(failed=1.0, timed_out=float(failed.timed_out))
        if not trajectory.response:  # failed before the model's first turn: one token that trains nothing
            eos = self.tokenizer.eos_token_id
            trajectory.add_environment([eos if eos is not None else 0])

    def _sample(self, prompt_index: int, sample_index: int, trajectory: _Trajectory, finish: str) -> RolloutSample:
        info = {"turns": float(trajectory.turns), "failed": 0.0, "timed_out": 0.0,
                "truncated": float(finish == "length"), **trajectory.info}
        return RolloutSample(prompt_index=prompt_index, sample_index=sample_index,
                             response_token_ids=trajectory.response, logprobs=trajectory.logprobs,
                             finish_reason=finish, loss_mask=tuple(trajectory.mask),
                             segments=tuple(trajectory.segments), reward=trajectory.reward,
                             turn_rewards=tuple(trajectory.turn_rewards), info=info,
                             token_versions=trajectory.token_versions())


def _override(sampling: SamplingConfig, step: Step) -> SamplingConfig:
    if not step.sampling:
        return sampling
    unknown = set(step.sampling) - SAMPLING_OVERRIDES
    if unknown:
        raise ValueError(f"an environment step asked for sampling settings {sorted(unknown)}; known: "
                         f"{sorted(SAMPLING_OVERRIDES)}")
    return replace(sampling, **step.sampling)


def agent_metrics(samples: list[RolloutSample]) -> dict[str, float]:
    """agent/<name>: the mean of each number over the trajectories that report it (a number an
    environment reports only sometimes, e.g. the turns of the games that were won, is not averaged
    with zeros); agent/failed, agent/timed_out and agent/truncated as counts."""
    infos = [s.info for s in samples if s.info is not None]
    if not infos:
        return {}
    keys = sorted({k for info in infos for k in info})
    metrics = {}
    for key in keys:
        values = [info[key] for info in infos if key in info]
        metrics[f"agent/{key}"] = sum(values) / len(values)
    for count in ("failed", "timed_out", "truncated"):
        metrics[f"agent/{count}"] = sum(info.get(count, 0.0) for info in infos)
    return metrics
