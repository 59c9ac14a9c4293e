"""Render raw inputs into prompt text, and split conversations into (prompt, response) text.

Two mutually exclusive ways to render (``DataConfig`` enforces it):
- ``--input_template`` ("User: {}\\nAssistant: "): the input string replaces ``{}``;
  without it the input string is the prompt as it is;
- ``--apply_chat_template``: the tokenizer's chat template (or ``--tokenizer_chat_template``)
  renders chat messages; a string input is one user turn.

The response text is what follows the prompt in the rendered conversation, so prompt text +
response text is exactly the conversation the template renders. Trailing newlines of the
response are dropped (as OpenRLHF does): the eos that the tokenizing step appends ends it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.data.config import DataConfig
from engine.data.errors import DataError
from engine.data.fields import as_messages, check_text, optional, require


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """How prompts and responses become text for one tokenizer."""

    tokenizer: Any
    input_template: str | None = None
    apply_chat_template: bool = False
    chat_template: str | None = None  # overrides tokenizer.chat_template without mutating the tokenizer

    def __post_init__(self) -> None:
        if self.apply_chat_template and not (self.chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise ValueError(
                "--apply_chat_template: the tokenizer has no chat template; pass one with --tokenizer_chat_template"
            )

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer) -> "PromptTemplate":
        return cls(
            tokenizer=tokenizer,
            input_template=config.template,
            apply_chat_template=config.apply_chat_template,
            chat_template=config.tokenizer_chat_template,
        )

    # ----- prompts ----------------------------------------------------------------------------
    def prompt(self, value: Any, *, key: str) -> str:
        """The generation prompt for an input: a string, or chat messages (with a chat template)."""
        if self.apply_chat_template:
            return self._render(as_messages(value, key=key, role="user"), generation_prompt=True, key=key)
        if isinstance(value, (list, dict)):
            raise DataError("is a list of chat messages; pass --apply_chat_template to render it", key=key)
        text = check_text(value, key=key)
        # str.replace, not str.format: braces in the user's own template text stay literal.
        return self.input_template.replace("{}", text, 1) if self.input_template else text

    # ----- prompt + response ------------------------------------------------------------------
    def prompt_and_response(self, prompt_value: Any, response_value: Any, *, prompt_key: str,
                            response_key: str) -> tuple[str, str]:
        """(prompt text, response text) of an input and its response (string or assistant messages)."""
        prompt = self.prompt(prompt_value, key=prompt_key)
        if not self.apply_chat_template:
            if isinstance(response_value, (list, dict)):
                raise DataError("is a list of chat messages; pass --apply_chat_template to render it", key=response_key)
            return prompt, _strip_response(check_text(response_value, key=response_key), key=response_key)
        conversation = as_messages(prompt_value, key=prompt_key, role="user") + as_messages(
            response_value, key=response_key, role="assistant"
        )
        full = self._render(conversation, generation_prompt=False, key=response_key)
        return prompt, self._response_after(prompt, full, key=response_key)

    def split_conversation(self, messages: Any, *, key: str) -> tuple[str, str]:
        """(prompt text, response text) of a conversation whose last turn is the assistant's response."""
        messages = self._conversation(messages, key=key)
        prompt = self._render(messages[:-1], generation_prompt=True, key=key)
        full = self._render(messages, generation_prompt=False, key=key)
        return prompt, self._response_after(prompt, full, key=key)

    def conversation_segments(self, messages: Any, *, key: str) -> list[tuple[str, bool]]:
        """A conversation ending in an assistant turn as consecutive ``(text, is_response)`` pieces
        whose concatenation is exactly its rendering: every assistant turn (as ``split_conversation``
        cuts the last one) is a response, the text in between (template markup, other turns) not."""
        messages = self._conversation(messages, key=key)
        segments, done = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or index == 0:
                continue
            prompt = self._render(messages[:index], generation_prompt=True, key=key)
            full = self._render(messages[:index + 1], generation_prompt=False, key=key)
            if not prompt.startswith(done):
                raise DataError("the chat template renders an earlier turn differently once later turns follow, so "
                                "the assistant turns cannot be cut out", key=key)
            response = self._response_after(prompt, full, key=key)
            segments += [(prompt[len(done):], False), (response, True)]
            done = prompt + response
        return [(text, loss) for text, loss in segments if text]

    def sft_pair(self, row: dict, *, input_key: str, output_key: str | None) -> tuple[str, str]:
        """(prompt, response) of an SFT/KTO row: ``output_key`` holds the response, or, when it is
        not set or absent, the input is a conversation whose last assistant turn is the response."""
        value = require(row, input_key)
        response = optional(row, output_key)
        if response is not None:
            return self.prompt_and_response(value, response, prompt_key=input_key, response_key=output_key)
        if isinstance(value, list):
            return self.split_conversation(value, key=input_key)
        if output_key:
            raise DataError("missing (absent or null)", key=output_key)
        raise DataError("has no response: set --output_key, or give a conversation ending in an assistant turn",
                        key=input_key)

    # ----- helpers ----------------------------------------------------------------------------
    def _conversation(self, messages: Any, *, key: str) -> list[dict]:
        """Validated chat messages ending in an assistant turn after at least one other turn."""
        if not self.apply_chat_template:
            raise DataError("is a list of chat messages; pass --apply_chat_template to render it", key=key)
        messages = as_messages(messages, key=key, role="user")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError("expected a conversation ending in an assistant turn after at least one other turn",
                            key=key)
        return messages

    def _render(self, messages: list[dict], *, generation_prompt: bool, key: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.chat_template
            )
        except Exception as error:  # noqa: BLE001 - template errors (e.g. role order) are row problems
            raise DataError(f"the chat template failed: {type(error).__name__}: {error}", key=key) from error

    @staticmethod
    def _response_after(prompt: str, full: str, *, key: str) -> str:
        if not full.startswith(prompt):
            # E.g. templates that rewrite earlier turns once an answer follows (reasoning stripping).
            raise DataError(
                "the chat template does not render the prompt as a prefix of the full conversation, so the "
                "response cannot be split off", key=key,
            )
        return _strip_response(full[len(prompt):], key=key)


def _strip_response(text: str, *, key: str) -> str:
    text = text.rstrip("\n")
    if not text.strip():
        raise DataError("the response is empty", key=key)
    return text
