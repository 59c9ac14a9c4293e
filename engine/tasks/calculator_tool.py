"""A tool-use task: multiply two numbers by calling a calculator, then answer.

Prompts look like ``"7*8="``; the label is the product. The model's first turn should be a tool
call ``calc(7*8)``; the environment answers ``=56`` plus a newline (the tool's output: environment
tokens, masked from the loss); the model's next turn is the answer. Reward: 1.0 for the right
answer after a tool call, 0.5 for the right answer without one, else 0. Logged per trajectory:
agent/tool_use (a tool call was made) and agent/correct.
"""
from __future__ import annotations

import random
import re

from engine.tasks.environment import Environment, Step

_CALL = re.compile(r"calc\((.*)\)")  # greedy: the outermost parentheses of the call
_EXPRESSION = re.compile(r"^\s*\d+\s*([*+-]\s*\d+\s*)*$")
_NUMBER = re.compile(r"-?\d+")


def make_rows(num_rows: int, *, low: int = 2, high: int = 9, seed: int = 0) -> list[dict]:
    """``{"prompt", "label"}`` rows of products ``a*b`` with ``a, b`` in ``[low, high]``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(low, high), rng.randint(low, high)
        rows.append({"prompt": f"{a}*{b}=", "label": str(a * b)})
    return rows


def sft_rows(rows: list[dict], *, eos: str, tool_use: float = 1.0, seed: int = 0) -> list[dict]:
    """Demonstrations of both turns as ``{"prompt", "answer"}`` rows: the tool call, and the answer
    after the tool's output (``eos``: the tokenizer's EOS text, which ends the model's first turn).
    ``tool_use < 1``: that fraction of the first turns is demonstrated as the tool call, the others
    answer at once (the answer after the tool's output is still shown for every row): a warm start
    that uses the tool only sometimes, for RL to raise the rate."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        call = f"calc({row['prompt'].rstrip('=')})"
        direct = tool_use < 1.0 and rng.random() >= tool_use
        out.append({"prompt": row["prompt"], "answer": row["label"] if direct else call})
        out.append({"prompt": f"{row['prompt']}{call}{eos}{tool_output(row['label'])}", "answer": row["label"]})
    return out


def tool_output(value: str) -> str:
    return f"={value}\n"


def evaluate(expression: str) -> str:
    """The calculator: integers with + - * only (anything else is an error message, not an exception)."""
    if not _EXPRESSION.match(expression):
        return "error"
    total, sign, term = 0, 1, 1
    for token in re.findall(r"\d+|[*+-]", expression):
        if token == "*":
            continue
        if token in "+-":
            total += sign * term
            sign, term = (1 if token == "+" else -1), 1
        else:
            term *= int(token)
    return str(total + sign * term)


class CalculatorTool(Environment):
    async def reset(self, prompt: str, label) -> None:
        self.label = str(label).strip()
        self.called = False

    async def step(self, action: str) -> Step:
        call = _CALL.search(action)
        if call is not None and not self.called:
            self.called = True
            return Step(text=tool_output(evaluate(call.group(1))), info={"tool_use": 1.0})
        answer = _NUMBER.search(action)
        correct = answer is not None and answer.group(0) == self.label
        reward = (1.0 if self.called else 0.5) if correct else 0.0
        return Step(reward=reward, done=True, info={"tool_use": float(self.called), "correct": float(correct)})
