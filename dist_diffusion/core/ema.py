"""Exponential moving average of weights (Polyak averaging) on plain tensors.

The runtime decides *which* tensors (a full copy under ZeRO 0-2, this rank's fp32
master partition under ZeRO-3); the math here only sees lists of tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch


def ema_decay(step: int, decay: float = 0.9999, half_life_steps: float = 0.0,
              warmup: bool = True) -> float:
    """Decay to use after optimizer step ``step`` (0-based).

    half_life_steps > 0 sets decay = 0.5 ** (1 / half_life_steps), so the weight of a
    step halves every half_life_steps steps; otherwise ``decay`` is used as given.
    Warm-up caps it at (1 + step) / (10 + step) so early, random weights fade fast.
    """
    if half_life_steps > 0:
        decay = 0.5 ** (1.0 / half_life_steps)
    if warmup:
        decay = min(decay, (1.0 + step) / (10.0 + step))
    return decay


@torch.no_grad()
def ema_update_(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * current, for each pair of tensors.
    ``current`` is cast to the EMA's dtype first (EMA stays fp32 under bf16 training)."""
    if len(ema) != len(current):
        raise ValueError(f"EMA has {len(ema)} tensors but the model has {len(current)}")
    for e, c in zip(ema, current):
        e.lerp_(c.to(e.dtype), 1.0 - decay)
