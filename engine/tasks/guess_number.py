"""A multi-turn guessing game: find a digit from "higher" / "lower" replies.

Prompts are ``"guess:"``; the label is the secret digit (1-9). After each guess (the first number
of the model's turn) the environment says ``higher`` or ``lower`` (environment tokens, masked
from the loss) until the guess is right. Reward: 1.0 for finding it at the first guess, 0.2 less
for each guess after (at least 0.2); 0 when the turns run out. Logged: agent/found and
agent/turns (mean turns; falling as the model learns to search).
"""
from __future__ import annotations

import random
import re

from engine.tasks.environment import Environment, Step

_NUMBER = re.compile(r"\d+")


def make_rows(num_rows: int, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "guess:", "label": str(rng.randint(1, 9))} for _ in range(num_rows)]


class GuessNumber(Environment):
    async def reset(self, prompt: str, label) -> None:
        self.target = int(label)
        self.guesses = 0

    async def step(self, action: str) -> Step:
        self.guesses += 1
        match = _NUMBER.search(action)
        guess = int(match.group(0)) if match else None
        if guess == self.target:
            return Step(reward=max(1.0 - 0.2 * (self.guesses - 1), 0.2), done=True, info={"found": 1.0})
        hint = "higher" if guess is None or guess < self.target else "lower"
        return Step(text=f" {hint}\n", info={"found": 0.0})
