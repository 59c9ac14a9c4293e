"""Prompts for RL rollouts (PPO / REINFORCE++ / RLOO / GRPO), from ``--prompt_data``.

Each sample is ``{"prompt", "prompt_ids", "raw_prompt", "label", "datasource"}``:
the rendered prompt text (template applied, ready for generation), its token ids (bos once),
the input as the user wrote it (the last user turn of a conversation), the ``--label_key``
value for verifiable rewards (None without the flag), and the row's ``datasource`` column
("default" when absent; OpenRLHF routes rewards by it).
"""
from __future__ import annotations

from engine.data.base import RowDataset
from engine.data.config import DataConfig
from engine.data.fields import require
from engine.data.loading import blend_datasets
from engine.data.templates import PromptTemplate
from engine.data.tokens import TokenEncoder


class PromptDataset(RowDataset):
    """Prompts rendered by ``--input_template`` or ``--apply_chat_template``; prompts longer
    than ``--prompt_max_len`` tokens are dropped (cutting one would cut off its generation
    prompt) and counted in ``num_too_long``."""

    array_fields = ("prompt_ids",)
    too_long_flag = "--prompt_max_len"

    def __init__(self, rows, tokenizer, config: DataConfig):
        self.config = config
        self.encoder = TokenEncoder(tokenizer)
        self.template = PromptTemplate.from_config(config, tokenizer)
        self._build(rows, skip_bad_rows=config.skip_bad_rows)

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, *, split: str | None = None) -> "PromptDataset":
        return cls(blend_datasets(config, split=split), tokenizer, config)

    def build_sample(self, row: dict) -> dict | None:
        key = self.config.input_key
        value = require(row, key)
        prompt = self.template.prompt(value, key=key)
        label = require(row, self.config.label_key) if self.config.label_key else None
        prompt_ids = self.encoder.prompt_ids(prompt)
        if len(prompt_ids) > self.config.prompt_max_len:
            return None
        return {"prompt": prompt, "prompt_ids": prompt_ids, "raw_prompt": _raw_text(value), "label": label,
                "datasource": str(row.get("datasource") or "default")}


def _raw_text(value) -> str:
    """The user's own words: the string, or the last user turn of a (validated) conversation."""
    if isinstance(value, str):
        return value
    messages = [value] if isinstance(value, dict) else value
    user_turns = [m["content"] for m in messages if m["role"] == "user"]
    return user_turns[-1] if user_turns else messages[-1]["content"]
