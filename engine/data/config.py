"""What to load and how to turn rows into tokens: the dataset flags (OpenRLHF names), validated."""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.options import option

# OpenRLHF's train_sft / train_kto / train_kd default template: those jobs render plain-text
# inputs with it unless --input_template ("" for none), --apply_chat_template or --pretrain_mode says otherwise.
OPENRLHF_INPUT_TEMPLATE = "User: {}\nAssistant: "


@dataclass(kw_only=True)
class DataConfig:
    """Which datasets, which columns, how rows become tokens (OpenRLHF's names)."""

    dataset: str = option(help="comma-separated: local json/jsonl/parquet/arrow/csv files or dirs, TYPE@DIR, "
                               "HF save_to_disk dirs or hub names")
    dataset_probs: str | None = option(None, help="comma-separated mixing probabilities, one per dataset "
                                                  "(default: concatenate)")
    input_key: str = option("input", help="prompt / text column")
    output_key: str | None = option("output", help="response column")
    label_key: str | None = option(None, help="label column")
    chosen_key: str = option("chosen", help="preferred response column")
    rejected_key: str = option("rejected", help="dispreferred response column")
    prompt_key: str | None = option(None, help="prompt column of paired rows (chosen / rejected are its responses)")
    input_template: str | None = option(None, help='prompt template with one {}, e.g. "User: {}\\nAssistant: " '
                                                   '("": none; train_sft / train_kto / train_kd default to that one '
                                                   'unless --apply_chat_template or --pretrain_mode)')
    apply_chat_template: bool = option(False, help="render prompts with the tokenizer's chat template")
    tokenizer_chat_template: str | None = option(None, help="a Jinja chat template overriding the tokenizer's")
    max_len: int = option(2048, help="tokens per sample (prompt + response); longer samples are cut")
    prompt_max_len: int = option(1024, help="tokens per prompt")
    max_samples: int | None = option(None, help="cap per dataset and on the mixture")
    train_split: str = option("train", help="split to train on")
    eval_split: str | None = option(None, help="held-out split to evaluate on")
    pretrain_mode: bool = option(False, help="continued pre-training: loss on every token of --input_key")
    multiturn: bool = option(False, help="a conversation in --input_key trains on every assistant turn, not only "
                                         "the last (needs --apply_chat_template)")
    packing_samples: bool = option(False, help="several samples per sequence, attention kept inside each")
    skip_bad_rows: bool = option(False, help="skip (and count) malformed rows, and lines that are not valid JSON, "
                                             "instead of failing")
    seed: int = 42  # orders the mixing (the job's --seed)
    # The template used without --input_template, --apply_chat_template and --pretrain_mode (set by
    # the jobs that follow OpenRLHF's default, OPENRLHF_INPUT_TEMPLATE); read ``template``.
    default_input_template: str | None = None

    def __post_init__(self) -> None:
        self._check_datasets()
        self._check_lengths()
        self._check_templates()
        for flag in ("input_key", "chosen_key", "rejected_key", "train_split"):
            if not getattr(self, flag):
                raise ValueError(f"--{flag} must not be empty")
        for flag in ("output_key", "label_key", "prompt_key", "eval_split"):
            if getattr(self, flag) == "":
                raise ValueError(f"--{flag} must not be empty (leave it out instead)")

    # ----- derived views --------------------------------------------------------------------
    @property
    def template(self) -> str | None:
        """The prompt template rows are rendered with (None: the input as it is, or the chat template)."""
        if self.input_template is not None:
            return self.input_template or None  # "": explicitly none (OpenRLHF's spelling)
        return None if self.apply_chat_template or self.pretrain_mode else self.default_input_template

    @property
    def dataset_specs(self) -> list[str]:
        """The entries of ``--dataset``, stripped."""
        return [spec.strip() for spec in self.dataset.split(",")]

    @property
    def probabilities(self) -> list[float] | None:
        """``--dataset_probs`` as floats renormalised to sum exactly to 1, or None."""
        if self.dataset_probs is None:
            return None
        values = _parse_probs(self.dataset_probs)
        total = math.fsum(values)
        return [value / total for value in values]

    # ----- checks ---------------------------------------------------------------------------
    def _check_datasets(self) -> None:
        if not self.dataset or any(not spec for spec in self.dataset_specs):
            raise ValueError(f"--dataset needs one or more comma-separated sources, got {self.dataset!r}")
        if self.dataset_probs is None:
            return
        values = _parse_probs(self.dataset_probs)
        if len(values) != len(self.dataset_specs):
            raise ValueError(
                f"--dataset_probs has {len(values)} values but --dataset names {len(self.dataset_specs)} "
                "datasets; give one probability per dataset"
            )
        if any(not value > 0 for value in values):
            raise ValueError(f"--dataset_probs must all be > 0, got {self.dataset_probs!r}")
        if abs(math.fsum(values) - 1.0) > 1e-6:
            raise ValueError(f"--dataset_probs must sum to 1, got {self.dataset_probs!r} (sum {math.fsum(values)})")

    def _check_lengths(self) -> None:
        for flag in ("max_len", "prompt_max_len"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"--{flag} must be > 0, got {getattr(self, flag)}")
        if self.max_len < 2:
            # One prompt token and the eos are the least a training sample needs.
            raise ValueError(f"--max_len must be >= 2, got {self.max_len}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {self.max_samples}")

    def _check_templates(self) -> None:
        if self.input_template and self.input_template.count("{}") != 1:
            raise ValueError(
                f"--input_template must contain exactly one '{{}}' where the input goes, got {self.input_template!r}"
            )
        if self.input_template and self.apply_chat_template:
            # OpenRLHF silently ignores the input template here; a clear choice is safer.
            raise ValueError("--input_template and --apply_chat_template exclude each other; pass one")
        if self.tokenizer_chat_template is not None and not self.apply_chat_template:
            raise ValueError("--tokenizer_chat_template only takes effect with --apply_chat_template")
        if self.multiturn and not self.apply_chat_template:
            raise ValueError("--multiturn trains on the assistant turns of chat conversations: it needs "
                             "--apply_chat_template")
        if self.pretrain_mode and (self.apply_chat_template or self.input_template):
            raise ValueError("--pretrain_mode trains on raw text: drop --apply_chat_template / --input_template")


def _parse_probs(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"--dataset_probs must be comma-separated numbers, got {text!r}") from None
