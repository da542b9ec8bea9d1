"""B-cos alignment layers: ``out = lin * |lin / ||z|| |^(b-1)`` with ``lin = w . z``.

``z`` is the input patch a weight row sees (all channels of its group times the kernel taps).
At ``b == 1`` the layers compute exactly the plain convolution / linear map they were built from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import DetachableModule

DEFAULT_EPS = 1e-6


class _BcosScale(torch.autograd.Function):
    """``lin * (|lin| / sqrt(sq + eps))^(b-1)`` with a backward that is finite at ``lin == 0``."""

    @staticmethod
    def forward(ctx, lin: torch.Tensor, sq: torch.Tensor, b: float, eps: float) -> torch.Tensor:
        norm = (sq + eps).sqrt()
        scale = lin.abs() / norm if b == 2 else (lin.abs() / norm).pow(b - 1)
        ctx.save_for_backward(lin, norm)
        ctx.b = b
        ctx.sq_shape = sq.shape
        return lin * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lin, norm = ctx.saved_tensors
        b = ctx.b
        scale = lin.abs() / norm if b == 2 else (lin.abs() / norm).pow(b - 1)
        grad_scaled = grad * scale
        grad_lin = grad_scaled * b if ctx.needs_input_grad[0] else None
        grad_sq = None
        if ctx.needs_input_grad[1]:
            # d out / d norm = -(b - 1) out / norm ; d norm / d sq = 1 / (2 norm)
            grad_sq = (grad_scaled * lin * (-(b - 1) / 2) / (norm * norm)).sum_to_size(ctx.sq_shape)
        return grad_lin, grad_sq, None, None


def bcos_scale(lin: torch.Tensor, sq: torch.Tensor, b: float, eps: float, detach: bool) -> torch.Tensor:
    """Apply the B-cos factor to ``lin`` given squared patch norms ``sq`` (broadcastable to ``lin``).

    With ``detach`` the factor is treated as a constant (explanation mode).
    """
    if b == 1:
        return lin
    needs_grad = torch.is_grad_enabled() and (lin.requires_grad or sq.requires_grad)
    if detach or not needs_grad:  # plain ops: the backward (if any) treats the factor as a constant
        norm = (sq + eps).sqrt()
        scale = lin.abs() / norm if b == 2 else (lin.abs() / norm).pow(b - 1)
        return lin * scale.detach()
    return _BcosScale.apply(lin, sq, b, eps)


def _check_b(b: float) -> float:
    b = float(b)
    if not math.isfinite(b) or b < 1:
        raise ValueError(f"b must be a finite number >= 1, got {b}")
    return b


def conv_patch_sq_norms(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Squared norms of every input patch of a convolution, shape ``(N, groups, H_out, W_out)``.

    Zero padding contributes nothing, so a padded patch's norm covers only its real pixels.
    """
    n, c, h, w = x.shape
    sq = x * x
    if groups == 1:
        sq = sq.sum(1, keepdim=True)
    else:
        sq = sq.view(n, groups, c // groups, h, w).sum(2)
    if kernel_size == (1, 1) and padding == (0, 0):
        return sq[:, :, :: stride[0], :: stride[1]]
    if dilation == (1, 1) and all(p <= k // 2 for p, k in zip(padding, kernel_size)):
        area = kernel_size[0] * kernel_size[1]  # (not divisor_override: ONNX AveragePool lacks it)
        return F.avg_pool2d(sq, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True) * area
    ones = sq.new_ones(sq.shape[1], 1, *kernel_size)
    return F.conv2d(sq, ones, None, stride, padding, dilation, groups=sq.shape[1])


def _pad_same(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """Zero-pad ``x`` like TensorFlow's 'SAME' (as timm's ``Conv2dSame``)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    if top or bottom or left or right:
        x = F.pad(x, [left, right, top, bottom])
    return x


class BcosConv2d(nn.Conv2d, DetachableModule):
    """2D B-cos convolution (any groups, stride, zero padding, dilation).

    ``same_padding=True`` pads dynamically like TensorFlow's 'SAME' (timm's ``Conv2dSame``).
    ``normalize_weights=True`` uses unit-norm weight rows (B-cos v2); default keeps ``w`` as is.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, b: float = 2.0, normalize_weights: bool = False,
                 same_padding: bool = False, eps: float = DEFAULT_EPS, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode="zeros", device=device, dtype=dtype)
        if isinstance(self.padding, str):
            raise ValueError("BcosConv2d needs explicit integer padding (or same_padding=True)")
        self.b = _check_b(b)
        self.normalize_weights = normalize_weights
        self.same_padding = same_padding
        self.eps = eps

    @classmethod
    def from_module(cls, conv: nn.Conv2d, b: float = 2.0, normalize_weights: bool = False, *,
                    keep_bias: bool = False, same_padding: bool = False) -> "BcosConv2d":
        """A B-cos conv with the weights (and, with ``keep_bias``, the bias) of ``conv``."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding can be converted exactly, got padding_mode={conv.padding_mode!r}")
        padding = conv.padding
        if isinstance(padding, str):
            padding = _explicit_padding(padding, conv.kernel_size, conv.dilation)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                  conv.groups, bias=keep_bias and conv.bias is not None, b=b,
                  normalize_weights=normalize_weights, same_padding=same_padding,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if new.bias is not None:
                new.bias.copy_(conv.bias)
        new.train(conv.training)
        return new

    def effective_weight(self) -> torch.Tensor:
        """The weight used in the forward pass (unit-norm rows when ``normalize_weights``)."""
        if not self.normalize_weights:
            return self.weight
        return self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        lin = F.conv2d(x, self.effective_weight(), None, self.stride, self.padding, self.dilation, self.groups)
        if self.b != 1:
            sq = conv_patch_sq_norms(x, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
            if self.groups == 1:
                lin = bcos_scale(lin, sq, self.b, self.eps, self.explanation_mode)
            else:
                n, _, h, w = lin.shape
                grouped = lin.view(n, self.groups, -1, h, w)
                lin = bcos_scale(grouped, sq.unsqueeze(2), self.b, self.eps, self.explanation_mode).view(n, -1, h, w)
        if self.bias is not None:
            lin = lin + self.bias.view(1, -1, 1, 1)
        return lin

    def extra_repr(self) -> str:
        extra = f", b={self.b:g}"
        if self.normalize_weights:
            extra += ", normalize_weights=True"
        if self.same_padding:
            extra += ", same_padding=True"
        return super().extra_repr() + extra


def _explicit_padding(padding: str, kernel_size, dilation) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if any(t % 2 for t in totals):
        raise ValueError("padding='same' with an even receptive field pads asymmetrically; not supported")
    return tuple(t // 2 for t in totals)


class BcosLinear(nn.Linear, DetachableModule):
    """B-cos linear layer over the last dimension; the patch is the whole input vector."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, b: float = 2.0,
                 normalize_weights: bool = False, eps: float = DEFAULT_EPS, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.b = _check_b(b)
        self.normalize_weights = normalize_weights
        self.eps = eps

    @classmethod
    def from_module(cls, linear: nn.Linear, b: float = 2.0, normalize_weights: bool = False, *,
                    keep_bias: bool = False) -> "BcosLinear":
        """A B-cos linear layer with the weights (and, with ``keep_bias``, the bias) of ``linear``."""
        new = cls(linear.in_features, linear.out_features, bias=keep_bias and linear.bias is not None, b=b,
                  normalize_weights=normalize_weights, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if new.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    def effective_weight(self) -> torch.Tensor:
        """The weight used in the forward pass (unit-norm rows when ``normalize_weights``)."""
        if not self.normalize_weights:
            return self.weight
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = F.linear(x, self.effective_weight())
        if self.b != 1:
            lin = bcos_scale(lin, (x * x).sum(-1, keepdim=True), self.b, self.eps, self.explanation_mode)
        if self.bias is not None:
            lin = lin + self.bias
        return lin

    def extra_repr(self) -> str:
        extra = f", b={self.b:g}"
        if self.normalize_weights:
            extra += ", normalize_weights=True"
        return super().extra_repr() + extra
