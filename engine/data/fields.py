"""Read typed fields out of raw rows, raising ``DataError`` that names the key."""
from __future__ import annotations

from typing import Any

from engine.data.errors import DataError


def optional(row: dict, key: str | None) -> Any:
    """``row[key]``, or None when ``key`` is None, absent or null."""
    if key is None:
        return None
    return row.get(key)


def require(row: dict, key: str) -> Any:
    """``row[key]``; absent and null are both missing (columnar formats store absent as null)."""
    value = row.get(key)
    if value is None:
        raise DataError("missing (absent or null)", key=key)
    return value


def require_text(row: dict, key: str) -> str:
    """A non-empty string at ``row[key]``."""
    return check_text(require(row, key), key=key)


def check_text(value: Any, *, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", key=key)
    if not value.strip():
        raise DataError("is empty", key=key)
    return value


def as_messages(value: Any, *, key: str, role: str) -> list[dict]:
    """Chat messages from a string (one ``role`` turn), a message dict or a list of them."""
    if isinstance(value, str):
        return [{"role": role, "content": check_text(value, key=key)}]
    messages = [value] if isinstance(value, dict) else value
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a string or a non-empty list of chat messages, got {_describe(value)}", key=key)
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"message {position} is not a dict with a 'role' string", key=key)
        if not isinstance(message.get("content"), str):
            raise DataError(f"message {position} has no 'content' string", key=key)
    return messages


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type(value).__name__
