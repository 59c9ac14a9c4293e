"""Two-number addition as a verifiable task: the demo's SFT data and its RL reward.

Prompts look like ``"12+7="``; the answer is the sum's digits. ``reward_func`` follows the
remote-reward-function contract (``--remote_rm_url path/to/file.py``): 1.0 for a response whose
first number equals the label, 0.0 otherwise.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

_NUMBER = re.compile(r"-?\d+")


def make_rows(num_rows: int, *, max_operand: int = 49, seed: int = 0) -> list[dict]:
    """``{"prompt", "answer", "label"}`` rows; ``label`` is the sum as a string."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "label": str(a + b)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def score(response: str, label: str) -> float:
    match = _NUMBER.search(response)
    return 1.0 if match is not None and match.group(0) == str(label).strip() else 0.0


def reward_func(prompts: list[str], responses: list[str], labels: list | None) -> list[float]:
    if labels is None:
        raise ValueError("the arithmetic reward needs labels: pass --label_key label")
    return [score(response, label) for response, label in zip(responses, labels)]
