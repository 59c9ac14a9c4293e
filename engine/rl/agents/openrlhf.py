"""OpenRLHF's agent protocol (``--agent_func_path``), adapted to ``engine.tasks.environment``.

An OpenRLHF agent file runs here with its import line changed from

    from openrlhf.utils.agent import AgentExecutorBase, AgentInstanceBase

to

    from engine.rl.agents.openrlhf import AgentExecutorBase, AgentInstanceBase

Its ``AgentInstance`` class (one instance per trajectory; an ``async def __init__`` is awaited)
is used as OpenRLHF's ``MultiTurnAgentExecutor`` uses it: ``reset({"observation", "prompt",
"label"})`` returns ``{"observation": text}``; ``step({"observation_text", "action_text", "label",
"sampling_params"})`` returns ``rewards`` (summed over the turns), ``scores``, ``environment_feedback``
(text appended after the model's turn, masked from the loss), ``done``, optionally
``sampling_params`` and ``extra_logs`` (logged as agent/<name>). Tensors are read with ``float``.
An ``AgentExecutor`` class in the file is not used: trajectories run through this engine's
executor (``engine.rl.agents.executor``), which keeps the model's tokens as the engine made them.
``sampling_params`` is this engine's ``SamplingConfig`` (as handed in), or a dict of its
overridable fields (temperature, top_p, top_k, max_new_tokens; vLLM's ``max_tokens`` is read as
max_new_tokens).
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

from engine.rl.rollout import SamplingConfig
from engine.tasks.environment import Environment, Step


class AgentInstanceBase:
    """OpenRLHF's base class of an agent (one instance per trajectory)."""

    def __init__(self, *args, **kwargs):
        pass

    async def reset(self, states: dict, **kwargs):
        return states

    async def step(self, states: dict, **kwargs) -> dict:
        raise NotImplementedError("AgentInstance.step is not implemented")


class AgentExecutorBase:
    """Present so that agent files subclassing it import; this engine runs its own executor."""

    def __init__(self, *args, **kwargs):
        pass


def load_agent_class(path: str) -> type:
    """The ``AgentInstance`` class of the agent file ``path`` (--agent_func_path)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--agent_func_path {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"agent_func_{abs(hash(str(file.resolve())))}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("openrlhf"):
            raise ValueError(f"--agent_func_path {path} imports {err.name}: change its import line to "
                             "`from engine.rl.agents.openrlhf import AgentExecutorBase, AgentInstanceBase`") from err
        raise
    cls = getattr(module, "AgentInstance", None)
    if not inspect.isclass(cls) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise ValueError(f"--agent_func_path {path} defines no AgentInstance class with async reset and step methods")
    return cls


def environment_factory(path: str) -> Callable[[], Environment]:
    cls = load_agent_class(path)
    return lambda: OpenRLHFEnvironment(cls, name=path)


class OpenRLHFEnvironment(Environment):
    """One OpenRLHF ``AgentInstance`` as an ``Environment``: it keeps the observation text the
    agent's ``step`` reads (the prompt, then every action and feedback appended)."""

    def __init__(self, cls: type, *, name: str):
        self.cls, self.name = cls, name
        self.agent = None
        self.label = None
        self.observation_text = ""
        self.sampling: SamplingConfig | None = None

    async def _instantiate(self):
        if inspect.iscoroutinefunction(self.cls.__init__):  # OpenRLHF's example declares `async def __init__`
            agent = self.cls.__new__(self.cls)
            await self.cls.__init__(agent)
            return agent
        return self.cls()

    async def reset(self, prompt: str, label: Any) -> str | None:
        self.agent = await self._instantiate()
        self.label = label
        result = await self.agent.reset({"observation": prompt, "prompt": prompt, "label": label})
        observation = result.get("observation", prompt) if isinstance(result, dict) else prompt
        self.observation_text = observation
        return observation

    def bind_sampling(self, sampling: SamplingConfig) -> None:
        """The sampling settings of the turns (what ``states["sampling_params"]`` shows the agent)."""
        self.sampling = sampling

    async def step(self, action: str) -> Step:
        states = {"observation_text": self.observation_text, "action_text": action, "label": self.label,
                  "sampling_params": self.sampling}
        result = await self.agent.step(states)
        if not isinstance(result, dict) or "environment_feedback" not in result or "done" not in result:
            raise ValueError(f"{self.name}: AgentInstance.step must return a dict with rewards, environment_feedback "
                             f"and done; got {type(result).__name__}")
        feedback = str(result["environment_feedback"])
        self.observation_text += action + feedback
        info = {k: float(v) for k, v in (result.get("extra_logs") or {}).items()}
        if result.get("scores") is not None:
            info["scores"] = float(result["scores"])
        return Step(reward=float(result.get("rewards", 0.0)), done=bool(result["done"]), text=feedback, info=info,
                    sampling=self._sampling_overrides(result.get("sampling_params")))

    def _sampling_overrides(self, params) -> dict | None:
        if params is None or params is self.sampling:
            return None
        if isinstance(params, SamplingConfig):
            params = asdict(params)
        if not isinstance(params, dict):
            raise ValueError(f"{self.name}: step returned sampling_params of type {type(params).__name__}; return "
                             "states['sampling_params'] or a dict")
        params = dict(params)
        if "max_tokens" in params:
            params["max_new_tokens"] = params.pop("max_tokens")
        known = {f.name for f in fields(SamplingConfig)}
        current = asdict(self.sampling) if self.sampling is not None else {}
        return {k: v for k, v in params.items()
                if k in {"temperature", "top_p", "top_k", "max_new_tokens"} and k in known and current.get(k) != v}
