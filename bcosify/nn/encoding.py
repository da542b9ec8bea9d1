"""The ``[x, 1 - x]`` input encoding and the fixed logit bias."""

from __future__ import annotations

import torch
from torch import nn


class InputEncoder(nn.Module):
    """Encode images ``x`` in ``[0, 1]`` as ``[x, 1 - x]`` along the channel dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1 - x], dim=1)


class LogitBias(nn.Module):
    """Add a fixed scalar to every logit (``-log(C - 1)`` for BCE training); explanations leave it out."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = float(value)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.value if self.value else logits

    def extra_repr(self) -> str:
        return f"{self.value:.6g}"
