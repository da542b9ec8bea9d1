"""The B-cos form of a conditionally parameterised convolution (CondConv: per-sample kernels mixed from experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .base import DetachableModule
from .bcos import DEFAULT_EPS, _check_b, _pad_same, bcos_scale, conv_patch_sq_norms, take_weights


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class BcosCondConv2d(DetachableModule):
    """B-cos convolution whose kernel is mixed per sample from ``num_experts`` expert kernels.

    ``forward(x, routing_weights)``: ``routing_weights`` ``(N, num_experts)`` (computed elsewhere from the input,
    through a sigmoid: a gate) mix the experts into one kernel per sample, which then acts as a B-cos convolution.
    In explanation mode the routing weights are detached, so the output is ``W(x) x`` with ``W(x)`` the mixed,
    B-cos-scaled kernel. ``weight`` is ``(num_experts, out_channels * in_channels // groups * kh * kw)`` and
    ``bias`` ``(num_experts, out_channels)``, as in timm's ``CondConv2d`` (state dicts load both ways).
    ``same_padding=True`` pads like TensorFlow's 'SAME' (timm's dynamic padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, num_experts: int = 4, bias: bool = False, *, b: float = 2.0,
                 normalize_weights: bool = False, same_padding: bool = False, eps: float = DEFAULT_EPS,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels} in, {out_channels} out) must be divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups, self.num_experts = in_channels, out_channels, groups, \
            num_experts
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        numel = out_channels * (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, numel, **factory))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_channels, **factory)) if bias else None
        nn.init.normal_(self.weight, std=(numel / out_channels) ** -0.5)
        self.b = _check_b(b)
        self.normalize_weights = normalize_weights
        self.same_padding = same_padding
        self.eps = eps

    @classmethod
    def from_module(cls, conv: nn.Module, b: float = 2.0, normalize_weights: bool = False, *,
                    keep_bias: bool = False) -> "BcosCondConv2d":
        """The B-cos form of timm's ``CondConv2d`` ``conv``: its expert kernels (and, with ``keep_bias``, its expert
        biases)."""
        new = skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.num_experts, bias=keep_bias and conv.bias is not None, b=b,
                        normalize_weights=normalize_weights, same_padding=bool(conv.dynamic_padding),
                        device=conv.weight.device, dtype=conv.weight.dtype)
        return take_weights(new, conv)

    def kernels(self, routing_weights: torch.Tensor) -> torch.Tensor:
        """The per-sample kernels ``(N * out_channels, in_channels // groups, kh, kw)`` (unit-norm rows when
        ``normalize_weights``)."""
        weight = (routing_weights @ self.weight).reshape(-1, *self.weight_shape[1:])
        if self.normalize_weights:
            weight = weight / weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return weight

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if routing_weights.shape != (x.shape[0], self.num_experts):
            raise ValueError(f"routing_weights must be (N, num_experts) = ({x.shape[0]}, {self.num_experts}), "
                             f"got {tuple(routing_weights.shape)}")
        if self.explanation_mode:
            routing_weights = routing_weights.detach()
        padding = self.padding
        if self.same_padding:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
            padding = (0, 0)
        n, c, h, w = x.shape
        out = F.conv2d(x.reshape(1, n * c, h, w), self.kernels(routing_weights), None, self.stride, padding,
                       self.dilation, self.groups * n)
        out = out.view(n, self.out_channels, *out.shape[-2:])
        if self.b != 1:
            sq = conv_patch_sq_norms(x, self.kernel_size, self.stride, padding, self.dilation, self.groups)
            out = bcos_scale(out, sq, self.b, self.eps, self.explanation_mode, self.groups)
        if self.bias is not None:
            out = out + (routing_weights @ self.bias).view(n, self.out_channels, 1, 1)
        return out

    def extra_repr(self) -> str:
        extra = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                 f"padding={self.padding}, num_experts={self.num_experts}, b={self.b:g}")
        if self.groups != 1:
            extra += f", groups={self.groups}"
        if self.dilation != (1, 1):
            extra += f", dilation={self.dilation}"
        if self.bias is None:
            extra += ", bias=False"
        if self.normalize_weights:
            extra += ", normalize_weights=True"
        if self.same_padding:
            extra += ", same_padding=True"
        return extra
