"""Reward shaping from the response alone: DAPO's soft overlong penalty (``--overlong_buffer_len``)."""
from __future__ import annotations

import torch

from engine.rl.config import check_overlong_buffer


def overlong_penalty(response_lengths: torch.Tensor, *, max_len: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's length-aware penalty (Yu et al. 2025, eq. 13) per sample, <= 0:

        0                                   if |y| <= L_max - L_buffer
        ((L_max - L_buffer) - |y|) / L_buffer  if L_max - L_buffer < |y| <= L_max
        -1                                  beyond L_max (not reached: the engines stop there)

    times ``factor``; ``L_max`` is --generate_max_len and ``L_buffer`` --overlong_buffer_len."""
    check_overlong_buffer(buffer_len, max_len)
    excess = (response_lengths.float() - (max_len - buffer_len)).clamp(min=0.0, max=float(buffer_len))
    return -factor * excess / buffer_len
