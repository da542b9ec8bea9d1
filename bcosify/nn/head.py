"""Classification heads of B-cos networks: the classifier applied before global average pooling, the mean
of the patch tokens, and the fixed logit bias."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierBeforePooling(nn.Module):
    """Apply the classifier as a 1x1 convolution at every location, then pool the per-location logits.

    With average pooling this is the same function as pooling first; it also yields logit maps.
    """

    def __init__(self, dropout: nn.Module, classifier: nn.Conv2d, pool: nn.Module) -> None:
        super().__init__()
        self.dropout = dropout
        self.classifier = classifier
        self.pool = pool

    def logit_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location logits ``(N, classes, H, W)``."""
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.logit_maps(x))


class MeanPatchTokens(nn.Module):
    """``(N, T, D)`` tokens -> ``(N, 1, D)``: the mean over the tokens after the first ``num_prefix_tokens``
    (class/register tokens), for a head that reads token 0."""

    def __init__(self, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.num_prefix_tokens:].mean(1, keepdim=True)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


class LogitBias(nn.Module):
    """Divide every logit by a fixed ``temperature``, then add a fixed scalar ``value`` (``-log(C - 1)`` for BCE
    training); explanations leave the scalar out (the temperature is part of the explained logit)."""

    def __init__(self, value: float, temperature: float = 1.0) -> None:
        super().__init__()
        self.value = float(value)
        self.temperature = float(temperature)

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits / temperature``."""
        return logits / self.temperature if self.temperature != 1 else logits

    def shift(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits + value``."""
        return logits + self.value if self.value else logits

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.shift(self.scale(logits))

    def extra_repr(self) -> str:
        return f"{self.value:.6g}" + (f", temperature={self.temperature:g}" if self.temperature != 1 else "")
