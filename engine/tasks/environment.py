"""The typed environment interface of multi-turn agent rollouts (the recommended form for new code).

One ``Environment`` instance plays one trajectory: ``reset`` sees the prompt, then after each of
the model's turns ``step`` gets that turn's text and answers with a ``Step``: the reward of the
turn (summed over the trajectory), whether the episode is over, and what the model sees next,
as chat messages (rendered with the tokenizer's chat template) or as raw text. The executor
(``engine.rl.agents.executor``) appends those as token ids after the model's own tokens, masked
out of the loss; the model's tokens are never re-tokenised.

    class Guess(Environment):
        async def reset(self, prompt, label):
            self.target = int(label)
        async def step(self, action):
            guess = int(action.strip() or -1)
            if guess == self.target:
                return Step(reward=1.0, done=True)
            return Step(messages=[{"role": "user", "content": "higher" if guess < self.target else "lower"}])

OpenRLHF's agent files (``--agent_func_path``) are adapted to this interface
(``engine.rl.agents.openrlhf``). Nothing here imports torch or Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Step:
    """What the environment answers to one model turn."""

    reward: float = 0.0  # this turn's reward; the trajectory's is the sum
    done: bool = False
    # The next observation: chat messages (role "user" / "tool" / ..., rendered with the chat
    # template, ending with the assistant's generation prompt) or raw text appended as it is.
    messages: tuple[dict, ...] | list[dict] = ()
    text: str | None = None
    info: dict[str, float] = field(default_factory=dict)  # numbers logged as agent/<name> (mean over samples)
    # Sampling overrides for the next turn (temperature, top_p, top_k, max_new_tokens); None: unchanged.
    sampling: dict[str, Any] | None = None

    def __post_init__(self):
        if self.messages and self.text is not None:
            raise ValueError("a Step has either messages or text, not both")


class Environment:
    """One trajectory's environment (subclass it; a fresh instance per trajectory)."""

    async def reset(self, prompt: str, label: Any) -> str | None:
        """Start an episode on ``prompt`` (the prompt text, chat template applied) and its label.
        Returns None to let the model start from the prompt's token ids, or a text that replaces
        the prompt as the first observation (tokenised as it is)."""
        return None

    async def step(self, action: str) -> Step:
        """The model's turn as text (decoded for reading only); what follows it."""
        raise NotImplementedError


# A name -> factory of built-in environments (``--agent_task``); each factory takes no argument.
ENVIRONMENTS: dict[str, str] = {
    "calculator_tool": "engine.tasks.calculator_tool:CalculatorTool",
    "guess_number": "engine.tasks.guess_number:GuessNumber",
}


def environment_factory(name: str) -> Callable[[], Environment]:
    """The class of the built-in environment ``name`` (``--agent_task``)."""
    import importlib

    if name not in ENVIRONMENTS:
        raise ValueError(f"--agent_task {name!r} is not known; known: " + ", ".join(sorted(ENVIRONMENTS)))
    module, attribute = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
