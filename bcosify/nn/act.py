"""Activations written as gates: ``f(x) = x * g(x)`` with ``g`` detached in explanation mode.

Any activation with ``f(0) = 0`` has this form with ``g(x) = f(x) / x``. Known activations use their
closed-form gate; any other uses ``f(x) / x`` (``g(0)`` is irrelevant there since it multiplies 0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import DetachableModule

Gate = Callable[[torch.Tensor], torch.Tensor]


def relu6_gate(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 6, 6 / x.clamp_min(6), (x > 0).to(x.dtype))


def gelu_gate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh_gate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def hardswish_gate(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3) / 6


def quick_gelu_gate(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(1.702 * x)


def ratio_gate(fn: Callable[[torch.Tensor], torch.Tensor]) -> Gate:
    """The gate ``f(x) / x`` of an activation ``f`` with ``f(0) = 0``."""

    def gate(x: torch.Tensor) -> torch.Tensor:
        nonzero = x != 0
        safe = torch.where(nonzero, x, torch.ones_like(x))
        return torch.where(nonzero, fn(x) / safe, torch.zeros_like(x))

    return gate


class GatedActivation(DetachableModule):
    """``activation(x)`` in normal mode, ``x * gate(x).detach()`` in explanation mode (same value)."""

    def __init__(self, activation: nn.Module, gate: Gate, name: str) -> None:
        super().__init__()
        self.activation = activation
        self.gate = gate
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explanation_mode:
            return x * self.gate(x).detach()
        return self.activation(x)

    def extra_repr(self) -> str:
        return f"gate={self.name}"


def gated(activation: nn.Module, gate: Gate | None = None, name: str | None = None) -> GatedActivation:
    """Wrap ``activation`` as a gated activation; without ``gate``, the gate is ``f(x) / x``."""
    if getattr(activation, "inplace", False):
        activation.inplace = False  # the gate reads x after the activation in explanation mode
    return GatedActivation(activation, gate or ratio_gate(activation), name or type(activation).__name__.lower())
