"""Shared state of every layer whose backward differs in explanation mode."""

from __future__ import annotations

from torch import nn


class DetachableModule(nn.Module):
    """A module whose dynamic (input-dependent) weights are detached in explanation mode.

    In explanation mode the forward value is unchanged, but the gradient with respect to the
    input equals the dynamic weight, so that ``output = W(x) x`` and ``x * grad`` sums to ``output``.
    """

    explanation_mode: bool = False


def set_explanation_mode(module: nn.Module, enabled: bool) -> None:
    """Switch explanation mode on or off for every detachable submodule of ``module``."""
    for sub in module.modules():
        if isinstance(sub, DetachableModule):
            sub.explanation_mode = enabled
