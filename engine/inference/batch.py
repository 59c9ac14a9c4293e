"""Batch inference building blocks (what ``engine.cli.batch_inference`` chains):

    rows = generate_rows(engines, tokenizer, prompts, sampling)       # [{"input", "output"}] x N per prompt
    rows = RewardScorer(rm_path).score_rows(rows)                      # adds "reward"
    best_of_n(rows) / conditional_sft_rows(rows, template) / iterative_dpo_pairs(rows)

Rows are plain dicts so every stage reads and writes jsonl the next stage (or
``engine.cli.train_sft`` / ``train_dpo``) consumes: ``input`` is the rendered prompt.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

DEFAULT_REWARD_TEMPLATE = "{input} <rm_score>: {reward} "  # OpenRLHF's conditional-SFT template


# ----------------------------------------------------------------------------------- jsonl

def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------- generation

def conditioned_prompts(prompts: list[dict], tokenizer, csft_prompt: str) -> list[dict]:
    """Conditional SFT at generation (``--enable_csft``): OpenRLHF's ``prompt + csft_prompt.strip() + " "``,
    so the model generates as if its answer had that reward model score."""
    from engine.data.tokens import TokenEncoder

    encoder = TokenEncoder(tokenizer)
    out = []
    for prompt in prompts:
        text = prompt["prompt"] + csft_prompt.strip() + " "
        out.append({**prompt, "prompt": text, "prompt_ids": encoder.prompt_ids(text)})
    return out


def generate_rows(engines: list, tokenizer, prompts: list[dict], sampling) -> list[dict]:
    """``sampling.n_samples_per_prompt`` rows ``{"input", "output"}`` per prompt, in prompt order.

    ``prompts`` are ``engine.data.prompts.PromptDataset`` samples (``prompt``, ``prompt_ids``).
    """
    from engine.ray.vllm_engine import generate

    samples = generate(engines, [list(p["prompt_ids"]) for p in prompts], sampling)
    return [{"input": prompts[s.prompt_index]["prompt"],
             "output": tokenizer.decode(s.response_token_ids, skip_special_tokens=True)} for s in samples]


# --------------------------------------------------------------------------------- scoring

def _read_value_head(hf_path: str, prefix: str, *, where: str) -> torch.Tensor:
    from models.hf_checkpoint import HFCheckpointReader

    reader = HFCheckpointReader(hf_path)
    try:
        name = f"{prefix}.weight"
        if name not in reader:
            heads = [k for k in reader.keys() if not k.startswith(("model.", "lm_head."))]
            raise ValueError(f"{where} has no value head {name!r} (tensors outside the decoder: {heads or 'none'}); "
                             "a reward model's head is named by --value_head_prefix")
        return reader.read(name)
    finally:
        reader.close()


class RewardScorer:
    """An HF ``AutoModelForSequenceClassification`` reward model (``num_labels=1``, as
    ``engine`` exports reward models) scoring ``input + output`` at its last token (eos
    appended), in right-padded batches; the score is read at each row's own last token, so it
    does not depend on the batch or on how the tokenizer's pad token relates to eos.

    ``model_path`` may be a Megatron checkpoint of a reward model (exported to HF for loading);
    ``flag`` names it in errors. ``value_head_prefix``: the head's tensor is ``<prefix>.weight``
    (OpenRLHF's --value_head_prefix); a checkpoint without it is an error, not a random head."""

    def __init__(self, model_path: str, *, micro_batch_size: int = 16, max_len: int = 2048,
                 device: str | None = None, flag: str = "--pretrain", value_head_prefix: str = "score"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from engine.inference.hf_model import hf_model_dir

        if micro_batch_size < 1:
            raise ValueError(f"--micro_batch_size must be >= 1, got {micro_batch_size}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with hf_model_dir(model_path, flag=flag, value_head=True) as hf_path:  # loaded into memory inside
            self.tokenizer = AutoTokenizer.from_pretrained(hf_path)
            head = _read_value_head(hf_path, value_head_prefix, where=f"{flag} {model_path}")
            self.model = AutoModelForSequenceClassification.from_pretrained(hf_path, num_labels=1)
            with torch.no_grad():
                self.model.score.weight.copy_(head.reshape(self.model.score.weight.shape))
            self.model.to(self.device)
        self.model.eval()
        self.micro_batch_size = micro_batch_size
        self.max_len = max_len

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"][: self.max_len - 1]
        eos = self.tokenizer.eos_token_id
        return ids if eos is None or ids[-1:] == [eos] else ids + [eos]

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(texts), self.micro_batch_size):
            ids = [self._ids(t) for t in texts[start:start + self.micro_batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, x in enumerate(ids):
                input_ids[row, : len(x)] = torch.tensor(x)
                attention_mask[row, : len(x)] = 1
            hidden = self.model.base_model(input_ids=input_ids.to(self.device),
                                           attention_mask=attention_mask.to(self.device)).last_hidden_state
            values = self.model.score(hidden).squeeze(-1)  # [b, s]: the head at every position
            last = torch.tensor([len(x) - 1 for x in ids], device=values.device)
            scores += values.gather(1, last.unsqueeze(1)).squeeze(1).float().tolist()
        return scores

    def score_rows(self, rows: list[dict], *, input_key: str = "input", output_key: str = "output") -> list[dict]:
        rewards = self.score_texts([row[input_key] + row[output_key] for row in rows])
        return [{"input": row[input_key], "output": row[output_key], "reward": reward}
                for row, reward in zip(rows, rewards)]


# ------------------------------------------------------------------------------- selection

def _group_by_input(rows: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for row in rows:
        groups.setdefault(row["input"], []).append(row)
    return groups


def best_of_n(rows: list[dict]) -> list[dict]:
    """Rejection sampling: the highest-reward row of every input (first one on ties)."""
    return [max(group, key=lambda r: r["reward"]) for group in _group_by_input(rows).values()]


def normalize_rewards(rows: list[dict]) -> list[dict]:
    """Rewards standardised over all rows (``--normalize_reward``)."""
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    std = rewards.std().item() if len(rows) > 1 else 0.0
    mean = rewards.mean().item()
    return [{**r, "reward": (r["reward"] - mean) / (std if std > 0 else 1.0)} for r in rows]


def conditional_sft_rows(rows: list[dict], *, reward_template: str = DEFAULT_REWARD_TEMPLATE,
                         decimals: int = 1) -> list[dict]:
    """Reward-conditioned SFT data: ``input`` becomes the template with the (rounded) reward."""
    if "{input}" not in reward_template or "{reward}" not in reward_template:
        raise ValueError(f"--reward_template must contain {{input}} and {{reward}}, got {reward_template!r}")
    return [{"input": reward_template.format(input=r["input"], reward=round(r["reward"], decimals)),
             "output": r["output"], "reward": r["reward"]} for r in rows]


def iterative_dpo_pairs(rows: list[dict]) -> list[dict]:
    """Per input, the best output as ``chosen`` and the worst as ``rejected`` (inputs whose
    samples all score the same are dropped: they carry no preference)."""
    pairs = []
    for prompt, group in _group_by_input(rows).items():
        best = max(group, key=lambda r: r["reward"])
        worst = min(group, key=lambda r: r["reward"])
        if best["reward"] > worst["reward"]:
            pairs.append({"prompt": prompt, "chosen": best["output"], "rejected": worst["output"],
                          "chosen_reward": best["reward"], "rejected_reward": worst["reward"]})
    return pairs
