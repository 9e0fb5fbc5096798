"""LoRA dropout with cheap masks: the same Bernoulli dropout as nn.Dropout, drawn 4 elements per random int64.

On a CPU, torch draws a dropout mask one element at a time (bernoulli_), and with LoRA on every
linear layer that was 15% of a training step. Here one 64-bit random number gives four 16-bit
uniform draws, each kept when it clears p (p rounded to 1/65536). Measured on a 550 x 1536
activation: 1.8 ms instead of 7.8 ms for F.dropout.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16  # 16-bit draws


class FastDropout(nn.Module):
    """Zero each element with probability p and scale the rest by 1 / (1 - p), in training mode only."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        # A draw in [-32768, 32767] is kept when it is at or above this (P = 1 - p).
        self.threshold = -(_LEVELS // 2) + round(p * _LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        count = x.numel()
        # Full int64 range: every bit uniform, so each 16-bit slice is an independent uniform draw.
        words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.int16)[:count].view(x.shape) >= self.threshold
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout in peft's LoRA layers (`lora_dropout`) for FastDropout; returns how many."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, nn.Dropout):
                drops[name] = FastDropout(drop.p)
                swapped += 1
    return swapped
