"""Attention as a dynamic weight: the attention matrix is a gate, the values are on the value path.

``softmax(q k^T) v`` is linear in ``v`` for a fixed attention matrix. In explanation mode the queries and keys
(so the matrix) are detached; the value projection and the output projection are B-cos layers without bias.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

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


class GateLinear(GatePath):
    """A linear layer on a gate path, as :class:`GatePath`, that still shows its ``weight`` and ``bias`` (for a
    forward that reads them, e.g. for their device and dtype)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias


class SplitQKV(nn.Module):
    """A fused ``qkv`` projection split in two: ``[q, k]`` from the original rows (biases kept; a gate) and
    ``v`` from a value-path layer (a B-cos linear). The output layout is the fused one: ``[q, k, v]``.
    With ``parts=2`` it is a fused ``kv`` projection (rows ``[k; v]``): ``k`` a gate, ``v`` on the value path."""

    def __init__(self, qk: nn.Linear, v: nn.Module, parts: int = 3) -> None:
        super().__init__()
        self.qk = GatePath(qk)
        self.v = v
        self.parts = parts  # equal parts of the fused output; the last one is v

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                     convert_value: Callable[[nn.Linear], nn.Module], parts: int = 3) -> "SplitQKV":
        """Split a fused projection's ``weight``/``bias`` (rows ``[q; k; v]`` of equal size, as in a ``qkv``
        linear or ``nn.MultiheadAttention``'s ``in_proj``; ``parts=2``: rows ``[k; v]``, as in a ``kv`` linear);
        ``convert_value`` turns the ``v`` rows (an ``nn.Linear``) into the value-path layer."""
        if parts not in (2, 3):
            raise ValueError(f"a fused projection has 2 (kv) or 3 (qkv) parts, got {parts}")
        rows = weight.shape[0]
        if rows % parts:
            raise ValueError(f"a fused {'qkv' if parts == 3 else 'kv'} projection needs {parts} equal parts, got "
                             f"{rows} outputs")
        start = (parts - 1) * rows // parts
        return cls(_linear(weight, bias, 0, start), convert_value(_linear(weight, bias, start, rows)), parts)

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
            new = skip_init(nn.Conv2d, conv.in_channels, len(rows), 1, bias=conv.bias is not None,
                            device=conv.weight.device, dtype=conv.weight.dtype)
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
    part = skip_init(nn.Linear, weight.shape[1], stop - start, bias=bias is not None, device=weight.device,
                     dtype=weight.dtype)
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


class ShiftedWindowAttention(DetachableModule):
    """torchvision's shifted-window attention (Swin, Swin V2) with its projections as modules.

    torchvision's forward reads ``qkv.weight`` and ``proj.weight`` functionally; this one computes the same
    (padding to window multiples, cyclic shift, window partition, the attention mask of shifted windows, the
    relative position bias; cosine attention with a clamped ``logit_scale`` and the continuous position bias MLP
    when ``cpb_mlp`` is given) but calls ``qkv`` (a :class:`SplitQKV`: q, k a gate, v on the value path) and
    ``proj``. The attention matrix is a gate: detached in explanation mode. Attribute names follow torchvision's.
    """

    def __init__(self, qkv: nn.Module, proj: nn.Module, window_size: list[int], shift_size: list[int],
                 num_heads: int, relative_position_index: torch.Tensor,
                 relative_position_bias_table: nn.Parameter | None = None, cpb_mlp: nn.Module | None = None,
                 relative_coords_table: torch.Tensor | None = None, logit_scale: nn.Parameter | None = None,
                 attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if (cpb_mlp is None) == (relative_position_bias_table is None):
            raise ValueError("give either a relative position bias table (Swin) or a position bias MLP (Swin V2)")
        if cpb_mlp is not None and (relative_coords_table is None or logit_scale is None):
            raise ValueError("Swin V2's position bias MLP needs its relative_coords_table and a logit_scale")
        self.qkv = qkv
        self.proj = proj
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.relative_position_bias_table = relative_position_bias_table
        self.logit_scale = logit_scale
        self.cpb_mlp = None if cpb_mlp is None else GatePath(cpb_mlp)
        self.register_buffer("relative_position_index", relative_position_index)
        self.register_buffer("relative_coords_table", relative_coords_table)

    def position_bias(self) -> torch.Tensor:
        """The relative position bias added to the attention logits, ``(1, heads, tokens, tokens)``."""
        n = self.window_size[0] * self.window_size[1]
        if self.cpb_mlp is None:
            table = self.relative_position_bias_table
        else:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return bias if self.cpb_mlp is None else 16 * torch.sigmoid(bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        window_size, num_heads = self.window_size, self.num_heads
        b, h, w, c = input.shape
        pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
        pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
        x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
        _, pad_h, pad_w, _ = x.shape
        shift_size = self.shift_size.copy()
        if window_size[0] >= pad_h:  # a window as large as the feature map: no shift
            shift_size[0] = 0
        if window_size[1] >= pad_w:
            shift_size[1] = 0
        shifted = sum(shift_size) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
        num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
        x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window_size[0] * window_size[1], c)

        qkv = self.qkv(x).reshape(x.size(0), x.size(1), 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.logit_scale is not None:  # cosine attention (Swin V2)
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * (c // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.position_bias()
        if shifted:  # tokens that the cyclic shift brought together from different regions do not attend
            mask = x.new_zeros((pad_h, pad_w))
            h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
            w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
            count = 0
            for hs in h_slices:
                for ws in w_slices:
                    mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                    count += 1
            mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
            mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
            mask = mask.unsqueeze(1) - mask.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
            attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
        attn = F.softmax(attn, dim=-1)
        if self.explanation_mode:
            attn = attn.detach()
        attn = F.dropout(attn, p=self.attention_dropout, training=self.training)

        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
        if shifted:
            x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def split_conv(conv: nn.Conv2d, rows: torch.Tensor) -> nn.Conv2d:
    """The part of ``conv`` that computes output channels ``rows`` (sorted). A grouped convolution keeps whole
    groups only: ``rows`` must be the union of some groups' outputs, and the part reads those groups' inputs (in
    order). Weights and bias are copies."""
    groups = conv.groups
    per_out = conv.out_channels // groups
    rows = rows.flatten()
    if groups == 1:
        kept_groups, in_channels = 1, conv.in_channels
    else:
        chosen = rows // per_out
        kept = chosen.unique()
        if len(rows) != len(kept) * per_out or not torch.equal(rows, (kept[:, None] * per_out
                                                                          + torch.arange(per_out, device=rows.device)).flatten()):
            raise ValueError(f"output channels that split groups of {conv} ({per_out} outputs a group)")
        kept_groups, in_channels = len(kept), len(kept) * (conv.in_channels // groups)
    new = skip_init(nn.Conv2d, in_channels, len(rows), conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=kept_groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[rows])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[rows])
    return new


class MultiScaleProjection(nn.Module):
    """A projection and aggregation branches on its output, concatenated over channels:
    ``cat([y, branch_1(y), ...])`` with ``y = proj(x)`` (EfficientViT's multi-scale q/k/v)."""

    def __init__(self, proj: nn.Module, aggreg: nn.ModuleList) -> None:
        super().__init__()
        self.proj = proj
        self.aggreg = aggreg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return torch.cat([y, *(branch(y) for branch in self.aggreg)], dim=1)


class LinearAttention(DetachableModule):
    """EfficientViT's (MIT) lightweight multi-scale ReLU linear attention (timm's ``LiteMLA``) with the queries and
    keys on a gate path and the values on the value path.

    Per head: ``out = (relu(q) (relu(k)^T [v, 1]))[:, :-1] / (its last column + eps)``, then ``proj``. For fixed
    ``q`` and ``k`` this is linear in ``v`` (the last column, the normaliser, is ``relu(q) relu(k)^T 1``: a gate),
    so in explanation mode ``q`` and ``k`` are detached and the output is ``W(x) v``. timm computes q, k and v with
    one 1x1 convolution and aggregation convolutions (depthwise, then grouped 1x1 with one group per head and part)
    whose channels stay within q, k or v: here they are split into ``qk`` (the original weights, biases kept; a
    :class:`GatePath`) and ``v`` (value-path layers), each a :class:`MultiScaleProjection`.

    ``attention_dtype``: the dtype of the attention products (timm: float32 whatever the input's, autocast off);
    ``None``: the input's dtype, at least float32.
    """

    def __init__(self, qk: nn.Module, v: nn.Module, proj: nn.Module, dim: int, eps: float = 1e-5,
                 kernel_func: nn.Module | None = None, dropout: nn.Module | None = None,
                 attention_dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__()
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.qk = qk if isinstance(qk, GatePath) else GatePath(qk)
        self.v = v
        self.kernel_func = kernel_func if kernel_func is not None else nn.ReLU()
        self.proj = proj
        self.dim = dim
        self.eps = eps
        self.attention_dtype = attention_dtype

    @staticmethod
    def value_channels(channels: int, dim: int) -> torch.Tensor:
        """Which of a fused ``qkv`` output's channels are values: per head ``[q, k, v]``, ``dim`` channels each."""
        if channels % (3 * dim):
            raise ValueError(f"{channels} q/k/v channels are not heads of 3 x {dim}")
        return (torch.arange(channels) // dim) % 3 == 2

    @classmethod
    def from_module(cls, mla: nn.Module, convert_value: Callable[[nn.Conv2d, str], nn.Module],
                    proj: nn.Module | None = None,
                    attention_dtype: torch.dtype | None = torch.float32) -> "LinearAttention":
        """From timm's ``LiteMLA``: ``qkv`` (a 1x1 convolution, no norm, no activation) and every aggregation
        convolution split into their q/k part (kept, a gate) and their v part (``convert_value(conv, name)``,
        ``name`` the original's path below ``mla``: ``qkv.conv``, ``aggreg.0.1``). ``proj`` replaces
        ``mla.proj`` (e.g. converted). Raises ``ValueError`` naming what does not fit."""
        qkv = mla.qkv
        conv = getattr(qkv, "conv", None)
        if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.groups != 1:
            raise ValueError(f"qkv.conv: expected a 1x1 Conv2d without groups, got {conv}")
        for name in ("norm", "act"):
            if type(getattr(qkv, name, None)) is not nn.Identity:
                raise ValueError(f"qkv.{name}: {type(getattr(qkv, name, None)).__name__} after the fused q/k/v "
                                 "convolution (only Identity is split)")
        value = cls.value_channels(conv.out_channels, mla.dim).to(conv.weight.device)
        gate_rows, value_rows = (~value).nonzero().flatten(), value.nonzero().flatten()
        qk_branches, v_branches = nn.ModuleList(), nn.ModuleList()
        for i, branch in enumerate(mla.aggreg):
            if not isinstance(branch, nn.Sequential):
                raise ValueError(f"aggreg.{i}: expected a Sequential of Conv2d, got {type(branch).__name__}")
            qk_layers, v_layers = [], []
            mask = value  # which channels entering the next layer are values
            for j, layer in enumerate(branch):
                if type(layer) is not nn.Conv2d or layer.in_channels != layer.out_channels:
                    raise ValueError(f"aggreg.{i}.{j}: expected a Conv2d keeping the channel count, got {layer}")
                per_in, per_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
                group_in = mask.reshape(layer.groups, per_in)
                if not (group_in.all(1) | ~group_in.any(1)).all():
                    raise ValueError(f"aggreg.{i}.{j}: a group of {layer} mixes value and query/key channels")
                mask = group_in[:, :1].expand(layer.groups, per_out).flatten()
                try:
                    qk_layers.append(split_conv(layer, (~mask).nonzero().flatten()))
                    v_layers.append(convert_value(split_conv(layer, mask.nonzero().flatten()), f"aggreg.{i}.{j}"))
                except ValueError as e:
                    raise ValueError(f"aggreg.{i}.{j}: {e}") from None
            if not torch.equal(mask, value):
                raise ValueError(f"aggreg.{i}: its output channels are not per head [q, k, v]")
            qk_branches.append(nn.Sequential(*qk_layers))
            v_branches.append(nn.Sequential(*v_layers))
        qk = MultiScaleProjection(split_conv(conv, gate_rows), qk_branches)
        v = MultiScaleProjection(convert_value(split_conv(conv, value_rows), "qkv.conv"), v_branches)
        return cls(qk, v, mla.proj if proj is None else proj, mla.dim, mla.eps, mla.kernel_func,
                   getattr(qkv, "dropout", None), attention_dtype)

    def _attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        compute = self.attention_dtype or torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        out = q @ (k.transpose(-1, -2) @ v)
        return (out[..., :-1] / (out[..., -1:] + self.eps)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.dropout(x)
        qk = self.qk(x).reshape(b, -1, 2 * self.dim, h * w).transpose(-1, -2)
        q, k = qk.chunk(2, dim=-1)
        v = self.v(x).reshape(b, -1, self.dim, h * w).transpose(-1, -2)
        q, k = self.kernel_func(q), self.kernel_func(k)
        if self.explanation_mode:  # (qk is detached already; a kernel function with parameters would not be)
            q, k = q.detach(), k.detach()
        v = F.pad(v, (0, 1), mode="constant", value=1.0)  # the last column: the normaliser (no gradient to v)
        if v.device.type != "meta":
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = self._attn(q, k, v)
        else:
            out = self._attn(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))
