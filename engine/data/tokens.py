"""Text to token ids with bos and eos each exactly once, and truncation to ``--max_len``.

Prompt and response are tokenized separately and concatenated. That makes the loss mask
exact (no BPE merge across the boundary can blur which token is the response's first), and
the prompt ids are the ones generation will later see for the same prompt.

bos: added only when the tokenizer adds one by default (Llama yes, Qwen2 no), and only when
the rendered text (e.g. a chat template writing ``<|begin_of_text|>``) does not already start
with it. eos: appended to the response unless the text already ends with it.
"""
from __future__ import annotations


class TokenEncoder:
    """Encode prompts and responses for one tokenizer."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; samples need one to mark the end of a response")
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos_id = _default_bos(tokenizer)

    def encode(self, text: str) -> list[int]:
        """Plain ids of ``text``: no special tokens added (those in the text are kept)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, text: str) -> list[int]:
        """Ids of a sample's beginning: bos first when the tokenizer uses one."""
        ids = self.encode(text)
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def response_ids(self, text: str) -> list[int]:
        """Ids of a response, ending in eos."""
        ids = self.encode(text)
        if ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def document_ids(self, text: str) -> list[int]:
        """A whole document (pretraining): bos (when the tokenizer uses one), the text, eos."""
        ids = self.prompt_ids(text)
        if ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids


def fit_to_length(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[list[int], bool] | None:
    """``prompt_ids + response_ids`` cut to ``max_len`` tokens, the last kept token forced to
    the response's eos (as OpenRLHF, so a truncated sample still teaches stopping).

    Returns ``(ids, truncated)``, or None when the prompt leaves fewer than two tokens for
    the response (OpenRLHF drops such samples too).
    """
    if len(prompt_ids) > max_len - 2:
        return None
    if len(prompt_ids) + len(response_ids) <= max_len:
        return prompt_ids + response_ids, False
    kept = response_ids[: max_len - len(prompt_ids) - 1] + response_ids[-1:]
    return prompt_ids + kept, True


def _default_bos(tokenizer) -> int | None:
    """The bos id when the tokenizer puts one in front by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids[:1] == [bos] else None
