"""Reward sources besides Megatron reward-model roles: remote reward servers and Python functions.

``--remote_rm_url`` takes a comma-separated list of
- HTTP URLs of reward servers speaking OpenRLHF's protocol: POST JSON
  ``{"query": [prompt + response, ...], "prompts": [...], "labels": [...]}`` -> ``{"rewards": [...]}``;
- paths of Python files defining ``reward_func(prompts, responses, labels) -> list[float]``
  (verifiable rewards; ``--label_key`` names the dataset column passed as ``labels``).
Several sources are averaged per sample (``combine_rewards``). A non-finite reward from any source
(these or a reward model) is found by ``nonfinite_rewards`` and named by ``nonfinite_reward_error``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol


class RewardServerError(RuntimeError):
    """A reward server was unreachable, timed out or answered something unusable."""


class RewardFunctionError(RuntimeError):
    """A reward function file is missing, malformed, raised, or returned the wrong thing."""


class NonFiniteRewardError(RuntimeError):
    """A reward source gave a sample NaN or inf (``--nonfinite_reward_policy error``)."""


class RewardSource(Protocol):
    name: str  # named in errors

    def score(self, prompts: list[str], responses: list[str], labels: list | None) -> list[float]: ...


def _check_rewards(rewards, expected: int, where: str, error: type[Exception]) -> list[float]:
    if hasattr(rewards, "tolist"):
        rewards = rewards.tolist()
    if not isinstance(rewards, (list, tuple)) or len(rewards) != expected:
        size = len(rewards) if isinstance(rewards, (list, tuple)) else type(rewards).__name__
        raise error(f"{where} returned {size} rewards for {expected} samples")
    try:
        return [float(r) for r in rewards]
    except (TypeError, ValueError) as exc:
        raise error(f"{where} returned a non-numeric reward: {exc}") from exc


class RemoteRewardModel:
    """Client of a reward server (``python -m engine.cli.serve_rm`` or any OpenRLHF-compatible one)."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, max_retries: int = 3, batch_size: int = 64):
        self.url = url
        self.name = f"reward server {url} (--remote_rm_url)"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.batch_size = batch_size

    def score(self, prompts, responses, labels):
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            payload = {
                "query": [p + r for p, r in zip(prompts[start:stop], responses[start:stop])],
                "prompts": list(prompts[start:stop]),
                "labels": list(labels[start:stop]) if labels is not None else None,
            }
            answer = self._post(payload)
            rewards += _check_rewards(answer.get("rewards"), len(payload["query"]),
                                      f"reward server {self.url} (--remote_rm_url)", RewardServerError)
        return rewards

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # the request itself is wrong: retrying will not help
                    raise RewardServerError(f"reward server {self.url} (--remote_rm_url) rejected the request: "
                                            f"HTTP {exc.code} {exc.read()[:200]!r}") from exc
                last_error = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                last_error = exc
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise RewardServerError(
            f"reward server {self.url} (--remote_rm_url) unreachable after {self.max_retries + 1} attempts "
            f"(timeout {self.timeout_s:.0f}s each): {last_error}"
        )


class RewardFunction:
    """``reward_func(prompts, responses, labels)`` loaded from a Python file."""

    def __init__(self, path: str):
        self.path = path
        self.name = f"reward_func of {path} (--remote_rm_url)"
        file = Path(path)
        if not file.is_file():
            raise RewardFunctionError(f"--remote_rm_url {path}: no such file")
        spec = importlib.util.spec_from_file_location(f"reward_func_{abs(hash(path))}", file)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise RewardFunctionError(f"--remote_rm_url {path}: importing it failed: {exc!r}") from exc
        self.func = getattr(module, "reward_func", None)
        if not callable(self.func):
            raise RewardFunctionError(f"--remote_rm_url {path} defines no reward_func(prompts, responses, labels)")

    def score(self, prompts, responses, labels):
        try:
            rewards = self.func(list(prompts), list(responses), labels)
        except Exception as exc:
            raise RewardFunctionError(f"reward_func of {self.path} raised {exc!r}") from exc
        return _check_rewards(rewards, len(prompts), f"reward_func of {self.path}", RewardFunctionError)


def make_reward_sources(remote_rm_url: str | None, *, timeout_s: float = 60.0, max_retries: int = 3) -> list:
    sources = []
    for item in (remote_rm_url or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith(("http://", "https://")):
            sources.append(RemoteRewardModel(item, timeout_s=timeout_s, max_retries=max_retries))
        else:
            sources.append(RewardFunction(item))
    return sources


def combine_rewards(per_source: list[list[float]]) -> list[float]:
    """Mean over sources per sample: keeps the scale of one source whatever their number."""
    if not per_source:
        raise ValueError("no reward source")
    return [sum(values) / len(values) for values in zip(*per_source)]


def nonfinite_rewards(per_source: list[tuple[str, list[float]]]) -> dict[int, tuple[str, float]]:
    """{sample index: (the first source naming it, its value)} for every sample some source gave a
    NaN or inf reward: one such sample would turn the advantages, the loss and the weights NaN."""
    found: dict[int, tuple[str, float]] = {}
    for name, rewards in per_source:
        for index, value in enumerate(rewards):
            if not math.isfinite(value) and index not in found:
                found[index] = (name, value)
    return found


def nonfinite_reward_error(found: dict[int, tuple[str, float]], meta: dict, n_samples_per_prompt: int
                           ) -> NonFiniteRewardError:
    """The error naming the first bad sample (its source, index, prompt and response) and the count."""
    index = min(found)
    name, value = found[index]
    prompt, response = meta["prompts"][index], meta["responses"][index]
    return NonFiniteRewardError(
        f"{name} gave a non-finite reward ({value}) to sample {index} of the rollout (prompt "
        f"{index // n_samples_per_prompt}, its sample {index % n_samples_per_prompt}): {prompt!r} -> "
        f"{response!r}; {len(found)} sample(s) of {len(meta['prompts'])} in all (samples "
        f"{sorted(found)[:8]}). Fix the reward source, or pass --nonfinite_reward_policy skip to drop those "
        "samples' prompt groups from the rollout")
