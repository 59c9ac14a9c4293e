"""The ptx term of the actor loss (``--pretrain_data``, ``--ptx_coef``; InstructGPT's PPO-ptx as
OpenRLHF runs it): every actor micro-batch also trains on pretraining / SFT samples, one per
rollout sample, and the step's loss is

    policy loss (token mean over the step's response tokens)
      + ptx_coef * NLL (token mean over the step's pretraining loss tokens)

Each term is a masked token sum scaled to its own global token mean
(``engine.runtime.schedule.token_mean_scale``), so the gradient is the same under every
TP / PP / CP / DP layout, and the ptx term does not change weight with the response lengths.

The ptx rows ride in the same micro-batches as the rollout rows (appended below them, masked
out of each other's loss: ``action_mask`` is 0 on ptx rows, ``loss_mask`` is 0 on rollout rows):
one forward and backward per micro-batch, uniform metrics, and Megatron's schedule untouched.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.rl.sequences import trim_to_content

PTX_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "attention_mask")


class PtxSampler:
    """Pretraining samples for each rollout, drawn from a reshuffled pass over the dataset.

    Rollout ``step`` reads the stream at positions ``step * stride ...``, a function of the step
    alone: a resumed run draws exactly what the uninterrupted run did, with no extra state.
    """

    def __init__(self, dataset: Sequence[dict], *, stride: int, seed: int):
        if len(dataset) == 0:
            raise ValueError("--pretrain_data has no usable samples")
        self.dataset = dataset
        self.stride = stride  # the most samples one rollout can ask for
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def samples(self, step: int, num: int) -> list[dict]:
        if num > self.stride:
            raise ValueError(f"rollout {step} asks for {num} pretraining samples, more than {self.stride}")
        return [self.dataset[self._index(step * self.stride + i)] for i in range(num)]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.dataset),
                                                  generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._orders[epoch][offset])


def collate_ptx(samples: list[dict], *, pad_id: int) -> dict[str, torch.Tensor]:
    """SFT samples (``input_ids``, ``loss_mask``) as one right-padded, label-aligned batch."""
    from engine.data.collate import pad_collate

    batch = pad_collate(samples, pad_id)
    return {key: batch[key] for key in PTX_KEYS}


def attach_ptx(rollout_micro: list[dict], ptx: dict[str, torch.Tensor], *, micro_batch_size: int,
               pad_id: int, multiple: int = 1) -> list[dict]:
    """Append to the ``i``-th rollout micro-batch rows ``i * micro_batch_size ...`` of ``ptx``.

    ``ptx`` holds this rank's ptx rows of the optimizer step, as many as its rollout rows.
    """
    num_ptx = len(ptx["input_ids"])
    num_rollout = sum(len(m["input_ids"]) for m in rollout_micro)
    if num_ptx != num_rollout:
        raise ValueError(f"{num_ptx} pretraining rows for {num_rollout} rollout rows")
    out = []
    for index, micro in enumerate(rollout_micro):
        lo = index * micro_batch_size
        rows = {key: value[lo:lo + len(micro["input_ids"])] for key, value in ptx.items()}
        out.append(combine_rows(micro, trim_to_content(rows, multiple=multiple, mask_key="loss_mask"), pad_id=pad_id))
    return out


def combine_rows(rollout: dict, ptx: dict, *, pad_id: int) -> dict:
    """One micro-batch: the rollout rows, then the ptx rows, right-padded to the wider of the two.

    A key only one part has is zero on the other's rows, so each part is masked out of the
    other's loss; padding sits after every real token, which causal attention never looks at.
    """
    width = max(rollout["input_ids"].shape[1], ptx["input_ids"].shape[1])
    rows_r, rows_p = len(rollout["input_ids"]), len(ptx["input_ids"])
    combined = {}
    for key in dict.fromkeys([*rollout, *ptx]):
        fill = pad_id if key in ("input_ids", "labels") else 0
        parts = []
        for part, rows in ((rollout, rows_r), (ptx, rows_p)):
            like = rollout.get(key, ptx.get(key))
            tensor = part.get(key)
            if tensor is None:  # (a per-token record of more dims, routed_experts: zero is "none")
                tensor = torch.zeros((rows, width, *like.shape[2:]), dtype=like.dtype)
            pad = tensor.new_full((rows, width - tensor.shape[1], *tensor.shape[2:]), fill)
            parts.append(torch.cat([tensor, pad], dim=1))
        combined[key] = torch.cat(parts)
    combined["position_ids"] = torch.arange(width).expand(rows_r + rows_p, width).contiguous()
    return combined


def finish_ptx_metrics(metrics: dict) -> dict:
    """``ptx_loss``: the step's summed ptx NLL over its ptx token count.

    Both come back from ``reduce_metrics`` divided by the same micro-batch count, so their
    ratio is the exact global token mean whatever the layout.
    """
    if "ptx_num_tokens" not in metrics:
        return metrics
    out = dict(metrics)
    total, tokens = out.pop("ptx_nll_total"), out.pop("ptx_num_tokens")
    out["ptx_loss"] = total / tokens if tokens > 0 else 0.0
    return out
