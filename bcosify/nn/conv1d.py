"""A 1-d convolution on the value path, computed by an alignment 2-d convolution on a map of height 1."""

from __future__ import annotations

import torch
from torch import nn


class Conv1dAs2d(nn.Module):
    """``conv`` (a 2-d convolution with a ``1 x k`` kernel, e.g. a :class:`~bcosify.nn.BcosConv2d`) applied to
    ``(N, C, L)`` sequences as to ``(N, C, 1, L)`` maps: a B-cos or DAU version of an ``nn.Conv1d``, whose
    patches (and so whose B-cos norms) are the 1-d convolution's."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    @staticmethod
    def conv2d_of(conv: nn.Conv1d) -> nn.Conv2d:
        """The ``1 x k`` 2-d convolution that computes ``conv`` on height-1 maps (same weights and bias). Raises
        ``ValueError`` for what it does not carry over: strides, string or non-zero-mode padding."""
        if conv.stride != (1,) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"only stride-1 Conv1d with integer zero padding converts, got {conv}")
        new = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]), 1, (0, conv.padding[0]),
                        (1, conv.dilation[0]), conv.groups, conv.bias is not None, device=conv.weight.device,
                        dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight.unsqueeze(2))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(-2)).squeeze(-2)
