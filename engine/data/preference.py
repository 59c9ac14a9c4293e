"""Preference data: paired (reward model, DPO / IPO / cDPO) and unpaired (KTO).

Paired samples: ``{"chosen_ids", "rejected_ids", "prompt_len", "margin"}``. Both sequences
start with the same ``prompt_len`` prompt tokens (zero or just bos when there is no prompt)
and end with eos; ``margin`` is the row's ``margin`` column when present, else 0.0.
``collate.preference_collate`` turns them into one padded batch with response loss masks.

Unpaired samples (KTO): an SFT sample plus ``prompt_len`` and ``label`` (True: desirable).
"""
from __future__ import annotations

from engine.data.base import RowDataset
from engine.data.config import DataConfig
from engine.data.errors import DataError
from engine.data.fields import check_text, optional, require
from engine.data.loading import blend_datasets
from engine.data.sft import SFTDataset
from engine.data.templates import PromptTemplate
from engine.data.tokens import TokenEncoder, fit_to_length


class PreferenceDataset(RowDataset):
    """Rows with ``--chosen_key`` / ``--rejected_key`` and optionally ``--prompt_key``.

    - with ``--prompt_key``: the prompt is rendered like an SFT input, chosen and rejected are
      its two responses (strings, or assistant messages with ``--apply_chat_template``);
    - without it, with ``--apply_chat_template``: chosen and rejected are whole conversations
      that must agree on every turn but the last, which is the response;
    - without either: chosen and rejected are complete texts and there is no prompt.
    Identical chosen and rejected responses are a bad row: they carry no preference.
    """

    array_fields = ("chosen_ids", "rejected_ids")

    def __init__(self, rows, tokenizer, config: DataConfig):
        self.config = config
        self.encoder = TokenEncoder(tokenizer)
        self.template = PromptTemplate.from_config(config, tokenizer)
        self._build(rows, skip_bad_rows=config.skip_bad_rows)

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, *, split: str | None = None) -> "PreferenceDataset":
        return cls(blend_datasets(config, split=split), tokenizer, config)

    def build_sample(self, row: dict) -> dict | None:
        prompt, chosen, rejected = self._texts(row)
        if chosen == rejected:
            raise DataError("is identical to the chosen response, so the pair states no preference",
                            key=self.config.rejected_key)
        margin = _margin(row)
        prompt_ids = self.encoder.prompt_ids(prompt)  # just bos (or nothing) without a prompt
        max_len = self.config.max_len
        fitted_chosen = fit_to_length(prompt_ids, self.encoder.response_ids(chosen), max_len)
        fitted_rejected = fit_to_length(prompt_ids, self.encoder.response_ids(rejected), max_len)
        if fitted_chosen is None or fitted_rejected is None:
            return None
        return {"chosen_ids": fitted_chosen[0], "rejected_ids": fitted_rejected[0], "prompt_len": len(prompt_ids),
                "margin": margin}

    def _texts(self, row: dict) -> tuple[str, str, str]:
        """(prompt, chosen response, rejected response) text of a row."""
        c, template = self.config, self.template
        if c.prompt_key:
            prompt_value = require(row, c.prompt_key)
            prompt, chosen = template.prompt_and_response(
                prompt_value, require(row, c.chosen_key), prompt_key=c.prompt_key, response_key=c.chosen_key)
            _, rejected = template.prompt_and_response(
                prompt_value, require(row, c.rejected_key), prompt_key=c.prompt_key, response_key=c.rejected_key)
            return prompt, chosen, rejected
        if template.apply_chat_template:
            prompt, chosen = template.split_conversation(require(row, c.chosen_key), key=c.chosen_key)
            other_prompt, rejected = template.split_conversation(require(row, c.rejected_key), key=c.rejected_key)
            if other_prompt != prompt:
                raise DataError("the conversation differs from the chosen one before its last turn", key=c.rejected_key)
            return prompt, chosen, rejected
        chosen = check_text(require(row, c.chosen_key), key=c.chosen_key).rstrip("\n")
        rejected = check_text(require(row, c.rejected_key), key=c.rejected_key).rstrip("\n")
        return "", chosen, rejected


def _margin(row: dict) -> float:
    value = optional(row, "margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {type(value).__name__}", key="margin")
    return float(value)


class UnpairedPreferenceDataset(SFTDataset):
    """KTO rows: prompt (``--input_key``), completion (``--output_key`` or the last assistant
    turn) and a boolean ``--label_key`` (True or 1: desirable; False or 0: undesirable)."""

    def __init__(self, rows, tokenizer, config: DataConfig):
        if config.label_key is None:
            raise ValueError("--label_key is required for unpaired preference (KTO) data: the desirable label")
        if config.pretrain_mode:
            raise ValueError("--pretrain_mode does not apply to unpaired preference (KTO) data")
        super().__init__(rows, tokenizer, config)

    def build_sample(self, row: dict) -> dict | None:
        label = require(row, self.config.label_key)
        if not isinstance(label, bool) and label not in (0, 1):
            raise DataError(f"expected a boolean label (true/false or 1/0), got {label!r}", key=self.config.label_key)
        sample = super().build_sample(row)
        if sample is None:
            return None
        return {**sample, "prompt_len": sample["loss_mask"].index(1), "label": bool(label)}
