"""Input-dependent multiplicative gates (squeeze-excite and the like) as dynamic weights."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import DetachableModule

GateFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class DetachedGate(DetachableModule):
    """``x * gate(x)`` where ``gate`` is computed by the original module's own gate branch.

    The branch's layers stay as they were (biases allowed: they are not on the value path); in
    explanation mode the gate is detached, so it acts as a dynamic weight.
    """

    def __init__(self, module: nn.Module, gate_fn: GateFn) -> None:
        super().__init__()
        self.module = module
        self.gate_fn = gate_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_fn(self.module, x)
        if self.explanation_mode:
            gate = gate.detach()
        return x * gate


class ExplanationDetach(DetachableModule):
    """Identity, except in explanation mode: then its output is detached (a gate read from a forward's graph
    becomes a dynamic weight)."""

    def forward(self, x):
        if not self.explanation_mode:
            return x
        return x.detach() if isinstance(x, torch.Tensor) else type(x)(t.detach() for t in x)
