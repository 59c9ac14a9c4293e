"""A multi-turn guessing game: find a digit from "higher" / "lower" replies.

Prompts are ``"guess:"``; the label is the secret digit (1-9). After each guess (the first number
of the model's turn) the environment says ``higher`` or ``lower`` (environment tokens, masked
from the loss) until the guess is right. Reward: 1.0 for finding it at the first guess, 0.2 less
for each guess after (at least 0.2); 0 when the turns run out. Logged: agent/found and
agent/turns_to_find (the turns of the games won only; falling as the model learns to search).

``sft_rows`` writes demonstrations of two strategies: a scan upward from 1 (5 guesses on average)
and bisection of 1-9 (first guess 5; 2.8 guesses on average): a warm start on a mix of both, for
RL to prefer bisection (tests/test_agent_learning.py: from a 30 % mix of 384 games, 8 GRPO
rollouts take the mean turns to find the number from 4.6 to under 3).
"""
from __future__ import annotations

import random
import re

from engine.tasks.environment import Environment, Step

_NUMBER = re.compile(r"\d+")


def make_rows(num_rows: int, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "guess:", "label": str(rng.randint(1, 9))} for _ in range(num_rows)]


def hint(guess: int | None, target: int) -> str:
    """The environment's reply to a wrong guess."""
    return " higher\n" if guess is None or guess < target else " lower\n"


def guesses(target: int, strategy: str) -> list[int]:
    """The guesses of ``strategy`` ("scan": 1, 2, 3, ...; "bisect": the middle of what is left)
    until ``target``."""
    if strategy not in ("scan", "bisect"):
        raise ValueError(f"unknown strategy {strategy!r}: scan or bisect")
    low, high, out = 1, 9, []
    while True:
        guess = len(out) + 1 if strategy == "scan" else (low + high) // 2
        out.append(guess)
        if guess == target:
            return out
        low, high = (guess + 1, high) if guess < target else (low, guess - 1)


def sft_rows(rows: list[dict], *, eos: str, bisect: float = 1.0, seed: int = 0) -> list[dict]:
    """Every turn of each row's game as ``{"prompt", "answer"}`` rows (the trajectory so far, the
    next guess); a ``bisect`` fraction of the games bisects, the others scan (``eos``: the
    tokenizer's EOS text, which ends each of the model's turns)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        target = int(row["label"])
        context = row["prompt"]
        for guess in guesses(target, "bisect" if rng.random() < bisect else "scan"):
            out.append({"prompt": context, "answer": str(guess)})
            context += f"{guess}{eos}{hint(guess, target)}"
    return out


class GuessNumber(Environment):
    async def reset(self, prompt: str, label) -> None:
        self.target = int(label)
        self.guesses = 0

    async def step(self, action: str) -> Step:
        self.guesses += 1
        match = _NUMBER.search(action)
        guess = int(match.group(0)) if match else None
        if guess == self.target:
            return Step(reward=max(1.0 - 0.2 * (self.guesses - 1), 0.2), done=True,
                        info={"found": 1.0, "turns_to_find": float(self.guesses)})
        return Step(text=hint(guess, self.target), info={"found": 0.0})
