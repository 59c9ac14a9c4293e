"""Process reward model (PRM) data: a solution in steps, each step followed by a placeholder
token at which the model is trained to predict that step's label.

Each sample is ``{"input_ids", "step_positions", "step_labels"}``: ``step_positions[j]`` is
the index in ``input_ids`` of step ``j``'s placeholder, and ``step_labels[j]`` its label, a
token id (string labels such as "+" / "-") or a float (numeric labels). The label belongs to
the placeholder position itself (it is not shifted like next-token labels).
"""
from __future__ import annotations

from engine.data.base import RowDataset
from engine.data.config import DataConfig
from engine.data.errors import DataError
from engine.data.fields import check_text, require
from engine.data.loading import blend_datasets
from engine.data.templates import PromptTemplate
from engine.data.tokens import TokenEncoder


class ProcessRewardDataset(RowDataset):
    """``--input_key`` holds the steps: a list of step strings (joined by the placeholder, one
    after every step), or one text that already has the placeholder after each step.
    ``--label_key`` holds one label per step. With ``--prompt_key`` the question is rendered
    like a prompt and put first. Samples are cut to ``--max_len``, dropping the labels of
    steps cut off; a sample left with no step is dropped (``num_too_long``)."""

    array_fields = ("input_ids", "step_positions")

    def __init__(self, rows, tokenizer, config: DataConfig, *, placeholder_token: str,
                 reward_tokens: list[str] | None = None):
        if config.label_key is None:
            raise ValueError("--label_key is required for process reward data: one label per step")
        self.config = config
        self.encoder = TokenEncoder(tokenizer)
        self.template = PromptTemplate.from_config(config, tokenizer)
        self.placeholder_token = placeholder_token
        self.placeholder_id = single_token_id(tokenizer, placeholder_token, flag="--placeholder_token")
        self.reward_token_ids = None if reward_tokens is None else {
            token: single_token_id(tokenizer, token, flag="--reward_tokens") for token in reward_tokens
        }
        self._build(rows, skip_bad_rows=config.skip_bad_rows)

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, *, split: str | None = None, placeholder_token: str,
                    reward_tokens: list[str] | None = None) -> "ProcessRewardDataset":
        return cls(blend_datasets(config, split=split), tokenizer, config, placeholder_token=placeholder_token,
                   reward_tokens=reward_tokens)

    def build_sample(self, row: dict) -> dict | None:
        input_ids = self._input_ids(row)
        positions = [i for i, token in enumerate(input_ids) if token == self.placeholder_id]
        if not positions:
            raise DataError(f"has no placeholder {self.placeholder_token!r} after any step", key=self.config.input_key)
        labels = self._labels(row, len(positions))
        input_ids = input_ids[: self.config.max_len]
        kept = sum(position < len(input_ids) for position in positions)
        if kept == 0:
            return None
        return {"input_ids": input_ids, "step_positions": positions[:kept], "step_labels": labels[:kept]}

    def _input_ids(self, row: dict) -> list[int]:
        c = self.config
        prefix = self.template.prompt(require(row, c.prompt_key), key=c.prompt_key) if c.prompt_key else ""
        steps = require(row, c.input_key)
        if isinstance(steps, str):
            ids = self.encoder.prompt_ids(prefix + check_text(steps, key=c.input_key))
            if ids.count(self.placeholder_id) != steps.count(self.placeholder_token):
                raise DataError(f"the placeholder {self.placeholder_token!r} merges with neighbouring text when "
                                "tokenized; surround it with whitespace or give the steps as a list", key=c.input_key)
            return ids
        if not isinstance(steps, list) or not steps:
            raise DataError("expected a text or a non-empty list of step strings", key=c.input_key)
        # Tokenize step by step and insert the placeholder id itself: exactly one token per step.
        ids = self.encoder.prompt_ids(prefix)  # bos (if any) even without a question
        for step in steps:
            ids += self.encoder.encode(check_text(step, key=c.input_key)) + [self.placeholder_id]
        return ids

    def _labels(self, row: dict, num_steps: int) -> list:
        key = self.config.label_key
        labels = require(row, key)
        if not isinstance(labels, list) or len(labels) != num_steps:
            found = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise DataError(f"expected a list of {num_steps} labels, one per step, got {found}", key=key)
        if all(isinstance(label, str) for label in labels):
            return [self._label_token_id(label, key) for label in labels]
        if all(isinstance(label, (int, float)) and not isinstance(label, bool) for label in labels):
            return [float(label) for label in labels]
        raise DataError("labels must be all reward-token strings or all numbers", key=key)

    def _label_token_id(self, label: str, key: str) -> int:
        if self.reward_token_ids is not None:
            if label not in self.reward_token_ids:
                raise DataError(f"label {label!r} is not one of --reward_tokens {list(self.reward_token_ids)}", key=key)
            return self.reward_token_ids[label]
        ids = self.encoder.encode(label)
        if len(ids) != 1:
            raise DataError(f"label {label!r} is not a single token", key=key)
        return ids[0]


def single_token_id(tokenizer, token: str, *, flag: str) -> int:
    """The id of ``token``, which must tokenize to exactly one token (ValueError naming ``flag``)."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{flag} {token!r} must be a single token of the tokenizer, but it tokenizes to {len(ids)}")
    return int(ids[0])
