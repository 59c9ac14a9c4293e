"""An environment's answer as the token ids appended to a trajectory.

Only the environment's text is tokenised here; the model's own tokens stay as the engine produced
them. Messages are rendered with the tokenizer's chat template as a continuation: the template's
text of a stand-in conversation plus the messages (with the generation prompt), minus the text of
the stand-in alone (the way veRL's and OpenRLHF's multi-turn loops render tool turns).
"""
from __future__ import annotations

from engine.tasks.environment import Step

_STAND_IN = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def render_messages(tokenizer, messages: list[dict]) -> str:
    """The chat-template text that appends ``messages`` to a conversation, ending with the
    assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the environment answered with chat messages, but the tokenizer has no chat template: "
                         "return Step(text=...) instead, or use a model whose tokenizer has one")
    before = tokenizer.apply_chat_template(_STAND_IN, tokenize=False)
    after = tokenizer.apply_chat_template(_STAND_IN + list(messages), tokenize=False, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the tokenizer's chat template renders a conversation differently once messages are "
                         "appended (its text of the earlier turns changed): return Step(text=...) instead")
    return after[len(before):]


def observation_ids(tokenizer, step: Step) -> list[int]:
    """The token ids of what the environment shows the model next (none: the model goes on)."""
    if step.text is not None:
        return encode_text(tokenizer, step.text)
    if step.messages:
        return encode_text(tokenizer, render_messages(tokenizer, list(step.messages)))
    return []
