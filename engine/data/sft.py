"""Supervised fine-tuning and continued pre-training samples.

Each sample is ``{"input_ids": list[int], "loss_mask": list[int]}`` with ``loss_mask[i] == 1``
when token ``i`` is trained on: the response tokens including the final eos (SFT), or every
token (``--pretrain_mode``). The mask is per token, not yet shifted; ``collate.py`` aligns it
with the next-token labels.
"""
from __future__ import annotations

from engine.data.base import RowDataset
from engine.data.config import DataConfig
from engine.data.fields import require, require_text
from engine.data.loading import blend_datasets
from engine.data.templates import PromptTemplate
from engine.data.tokens import TokenEncoder, fit_to_length


class SFTDataset(RowDataset):
    """Prompt (``--input_key``) + response (``--output_key``, or the last assistant turn).

    Prompts are rendered by ``--input_template`` or ``--apply_chat_template``. Samples longer
    than ``--max_len`` keep their prompt and a cut response ending in eos; rows whose prompt
    alone leaves under two tokens are dropped (``num_too_long``). ``--pretrain_mode`` takes
    the raw ``--input_key`` text (no template, no response), cut to ``--max_len``.
    """

    array_fields = ("input_ids", "loss_mask")

    def __init__(self, rows, tokenizer, config: DataConfig):
        self.config = config
        self.encoder = TokenEncoder(tokenizer)
        self.template = None if config.pretrain_mode else PromptTemplate.from_config(config, tokenizer)
        self.num_truncated = 0
        self._build(rows, skip_bad_rows=config.skip_bad_rows)

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, *, split: str | None = None) -> "SFTDataset":
        """Load and mix ``--dataset`` (split ``split``, default ``--train_split``) and tokenize it."""
        return cls(blend_datasets(config, split=split), tokenizer, config)

    def build_sample(self, row: dict) -> dict | None:
        if self.config.pretrain_mode:
            return self._pretrain_sample(row)
        if self.config.multiturn:
            return self._multiturn_sample(row)
        prompt, response = self.template.sft_pair(row, input_key=self.config.input_key,
                                                  output_key=self.config.output_key)
        prompt_ids = self.encoder.prompt_ids(prompt)
        fitted = fit_to_length(prompt_ids, self.encoder.response_ids(response), self.config.max_len)
        if fitted is None:
            return None
        input_ids, truncated = fitted
        self.num_truncated += truncated
        return {"input_ids": input_ids, "loss_mask": [0] * len(prompt_ids) + [1] * (len(input_ids) - len(prompt_ids))}

    def _multiturn_sample(self, row: dict) -> dict | None:
        """Every assistant turn of the conversation in ``--input_key`` is trained on (OpenRLHF's
        --multiturn); each piece is tokenized on its own so the masks follow the turns exactly."""
        segments = self.template.conversation_segments(require(row, self.config.input_key), key=self.config.input_key)
        input_ids, loss_mask = [], []
        last_response = max(i for i, (_, loss) in enumerate(segments) if loss)
        for index, (text, loss) in enumerate(segments[:last_response + 1]):
            ids = (self.encoder.prompt_ids(text) if index == 0 else
                   self.encoder.response_ids(text) if index == last_response else self.encoder.encode(text))
            input_ids += ids
            loss_mask += [int(loss)] * len(ids)
        fitted = fit_to_length(input_ids[:loss_mask.index(1)], input_ids[loss_mask.index(1):], self.config.max_len)
        if fitted is None:
            return None
        cut, truncated = fitted
        self.num_truncated += truncated
        return {"input_ids": cut, "loss_mask": loss_mask[:len(cut) - 1] + [1]}

    def _pretrain_sample(self, row: dict) -> dict:
        input_ids = self.encoder.document_ids(require_text(row, self.config.input_key))
        if len(input_ids) > self.config.max_len:
            # A cut document did not end: no eos forced here, unlike a cut response.
            input_ids = input_ids[: self.config.max_len]
            self.num_truncated += 1
        return {"input_ids": input_ids, "loss_mask": [1] * len(input_ids)}
