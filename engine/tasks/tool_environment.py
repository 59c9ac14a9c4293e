"""An environment of tools the model calls in the Hermes / Qwen format of chat templates.

Chat templates that take ``tools=`` (Qwen2.5 / Qwen3, Hermes, Llama 3.1 in its JSON mode) show
the model the tools' JSON schemas and expect each call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; the result goes back as a
``{"role": "tool", "content": ...}`` message, which the executor renders with the same template.

    class Search(ToolEnvironment):
        tools = {"search": search_fn}                      # sync or async callables
        async def finish(self, answer):                    # a turn without a tool call
            return Step(reward=float(self.label in answer), done=True)

The prompt itself is rendered by the data pipeline (``--apply_chat_template``); ``tool_schemas``
gives the ``tools=`` list for a template, from the callables' signatures and docstrings.
"""
from __future__ import annotations

import inspect
import json
import re
import typing
from typing import Any, Callable

from engine.tasks.environment import Environment, Step

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def parse_tool_calls(text: str) -> list[dict]:
    """Every ``<tool_call>{json}</tool_call>`` of ``text`` as ``{"name", "arguments"}``; a call
    that is not valid JSON comes back as ``{"error": ...}`` (the model is told, not crashed)."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
            calls.append({"name": str(call["name"]), "arguments": dict(call.get("arguments") or {})})
        except (ValueError, KeyError, TypeError) as err:
            calls.append({"error": f"malformed tool call ({type(err).__name__}): {body[:80]}"})
    return calls


def tool_schemas(tools: dict[str, Callable]) -> list[dict]:
    """OpenAI-style function schemas of ``tools`` (what ``apply_chat_template(tools=...)`` takes)."""
    schemas = []
    for name, fn in tools.items():
        parameters = inspect.signature(fn).parameters
        hints = typing.get_type_hints(fn)  # resolves string annotations (``from __future__ import annotations``)
        properties = {p: {"type": _JSON_TYPES.get(hints.get(p), "string")} for p in parameters}
        required = [p for p, param in parameters.items() if param.default is inspect.Parameter.empty]
        schemas.append({"type": "function", "function": {
            "name": name, "description": inspect.getdoc(fn) or "",
            "parameters": {"type": "object", "properties": properties, "required": required}}})
    return schemas


class ToolEnvironment(Environment):
    """Runs the tool calls of each model turn; a turn without one goes to ``finish``."""

    tools: dict[str, Callable] = {}

    async def reset(self, prompt: str, label: Any) -> None:
        self.label = label
        self.num_calls = 0

    async def step(self, action: str) -> Step:
        calls = parse_tool_calls(action)
        if not calls:
            return await self.finish(action)
        replies = [{"role": "tool", "content": await self._call(call)} for call in calls]
        self.num_calls += len(calls)
        return Step(messages=replies, info={"tool_calls": float(len(calls))})

    async def _call(self, call: dict) -> str:
        if "error" in call:
            return call["error"]
        fn = self.tools.get(call["name"])
        if fn is None:
            return f"unknown tool {call['name']!r}; tools: {', '.join(sorted(self.tools))}"
        try:
            result = fn(**call["arguments"])
            if inspect.isawaitable(result):
                result = await result
        except TypeError as err:  # wrong arguments: the model's mistake, shown to it
            return f"bad arguments for {call['name']}: {err}"
        return result if isinstance(result, str) else json.dumps(result)

    async def finish(self, answer: str) -> Step:
        """The model answered (no tool call): the episode's last step."""
        return Step(done=True)
