"""Attention as a dynamic weight: the attention matrix is a gate, the values are on the value path.

``softmax(q k^T) v`` is linear in ``v`` for a fixed attention matrix. In explanation mode the queries and keys
(so the matrix) are detached; the value projection and the output projection are B-cos layers without bias.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import DetachableModule


class GatePath(DetachableModule):
    """A module on a gate path (queries, keys, attention logits): kept as it is, output detached in
    explanation mode."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        return out.detach() if self.explanation_mode else out


class SplitQKV(nn.Module):
    """A fused ``qkv`` projection split in two: ``[q, k]`` from the original rows (biases kept; a gate) and
    ``v`` from a value-path layer (a B-cos linear). The output layout is the fused one: ``[q, k, v]``."""

    def __init__(self, qk: nn.Linear, v: nn.Module) -> None:
        super().__init__()
        self.qk = GatePath(qk)
        self.v = v

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                     convert_value: Callable[[nn.Linear], nn.Module]) -> "SplitQKV":
        """Split a fused projection's ``weight``/``bias`` (rows ``[q; k; v]`` of equal size, as in a ``qkv``
        linear or ``nn.MultiheadAttention``'s ``in_proj``); ``convert_value`` turns the ``v`` rows (an
        ``nn.Linear``) into the value-path layer."""
        rows = weight.shape[0]
        if rows % 3:
            raise ValueError(f"a fused qkv projection needs 3 equal parts, got {rows} outputs")
        return cls(_linear(weight, bias, 0, 2 * rows // 3), convert_value(_linear(weight, bias, 2 * rows // 3, rows)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.qk(x), self.v(x)], dim=-1)


class SplitQKVConv(nn.Module):
    """A fused 1x1 ``qkv`` convolution split in two: the query and key output channels from the original rows
    (biases kept; a gate) and the value channels from a value-path layer (a B-cos convolution), put back in the
    fused channel order (per-head interleaved or not)."""

    def __init__(self, qk: nn.Conv2d, v: nn.Module, value_channels: torch.Tensor) -> None:
        super().__init__()
        self.qk = GatePath(qk)
        self.v = v
        order = torch.cat([(~value_channels).nonzero().flatten(), value_channels.nonzero().flatten()])
        self.register_buffer("order", order.argsort(), persistent=False)  # fused channel -> position in [qk, v]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, value_channels: torch.Tensor,
                  convert_value: Callable[[nn.Conv2d], nn.Module]) -> "SplitQKVConv":
        """Split ``conv`` (a 1x1 convolution, no groups); ``value_channels`` marks its value output channels."""
        def part(rows: torch.Tensor) -> nn.Conv2d:
            new = nn.Conv2d(conv.in_channels, len(rows), 1, bias=conv.bias is not None, device=conv.weight.device,
                            dtype=conv.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(conv.weight[rows])
                if conv.bias is not None:
                    new.bias.copy_(conv.bias[rows])
            return new

        return cls(part((~value_channels).nonzero().flatten()), convert_value(part(value_channels.nonzero().flatten())),
                   value_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.qk(x), self.v(x)], dim=1).index_select(1, self.order)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int) -> nn.Linear:
    """An ``nn.Linear`` holding copies of rows ``start:stop`` of ``weight`` and ``bias``."""
    part = nn.Linear(weight.shape[1], stop - start, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        part.weight.copy_(weight[start:stop])
        if bias is not None:
            part.bias.copy_(bias[start:stop])
    return part


class SelfAttention(nn.Module):
    """Multi-head self-attention ``proj(softmax(q k^T / sqrt(d)) v)`` with the call signature of
    ``nn.MultiheadAttention`` (self-attention only: ``query is key is value``)."""

    def __init__(self, qkv: SplitQKV, proj: nn.Module, num_heads: int, batch_first: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv = qkv
        self.proj = proj
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.dropout = dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("the converted attention supports self-attention only (query is key is value)")
        if need_weights or key_padding_mask is not None:
            raise ValueError("the converted attention returns no attention weights and takes no key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)
        n, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(n, tokens, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None
