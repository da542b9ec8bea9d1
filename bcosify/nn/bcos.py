"""B-cos alignment layers: ``out = lin * |lin / ||z|| |^(b-1)`` with ``lin = w . z``.

``z`` is the input patch a weight row sees (all channels of its group times the kernel taps).
At ``b == 1`` the layers compute exactly the plain convolution / linear map they were built from.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .base import DetachableModule

DEFAULT_EPS = 1e-6


def _compiling() -> bool:
    """True while torch.compile (or torch.export) traces: the layers then use plain differentiable ops,
    which Inductor fuses itself and which export to ONNX as the composite formula."""
    return torch.compiler.is_compiling()


def _channel_sum(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum an ``(N, C, ...)`` tensor over the channels of each group: ``(N, groups, ...)``."""
    return t if t.shape[1] == groups else t.unflatten(1, (groups, -1)).sum(2)


def _channel_sq_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of ``x ** 2`` over the channels of each group, shape ``(N, groups, H, W)``."""
    return _channel_sum(x * x, groups)


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, ...)`` viewed as ``(N, groups, C // groups, ...)`` (unchanged for ``groups == 1``)."""
    return t if groups == 1 else t.unflatten(1, (groups, t.shape[1] // groups))


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A per-group ``(N, groups, ...)`` tensor shaped to broadcast against :func:`_grouped` tensors."""
    return t if groups == 1 else t.unsqueeze(2)


def _scaled(lin: torch.Tensor, r: torch.Tensor, b: float, groups: int) -> torch.Tensor:
    """``lin * (|lin| r)^(b-1)`` in a new tensor (with the dtype and layout of the composite formula).

    ``r = 1 / sqrt(sq + eps)``. Every path (no-grad, autograd, explanation mode, compiled) computes
    ``|lin| * r`` first, so they round alike.
    """
    out = torch.empty_like(lin, dtype=torch.promote_types(lin.dtype, r.dtype))
    lin_g, out_g = _grouped(lin, groups), _grouped(out, groups)
    torch.mul(lin_g, _per_group(r, groups), out=out_g).abs_()  # (= |lin| * r bitwise: r > 0)
    if b != 2:
        out_g.pow_(b - 1)
    out_g.mul_(lin_g)
    return out


def _inv_norm(sq: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(sq + eps)``: the reciprocal patch norms (small tensors)."""
    return (sq + eps).rsqrt()


class _BcosScale(torch.autograd.Function):
    """``lin * (|lin| / sqrt(sq + eps))^(b-1)`` with a backward that is finite at ``lin == 0``.

    ``sq`` holds one squared patch norm per group of channels: ``(N, groups, ...)`` for an
    ``(N, C, ...)`` ``lin`` (or, for ``groups == 1``, any shape broadcastable to ``lin``).
    The backward needs ``lin`` or the output: both are kept until a consumer that saves the output itself
    (``UncenteredBatchNorm2d`` in training) drops ``lin`` with :func:`release_saved_input`.
    """

    @staticmethod
    def forward(ctx, lin: torch.Tensor, sq: torch.Tensor, b: float, eps: float, groups: int = 1) -> torch.Tensor:
        r = _inv_norm(sq, eps)
        out = _scaled(lin, r, b, groups)
        ctx.save_for_backward(out)
        ctx.bcos_lin = lin
        ctx.r = r
        ctx.b, ctx.groups, ctx.sq_shape = b, groups, sq.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        b, groups = ctx.b, ctx.groups
        r = _per_group(ctx.r, groups)
        grad_g = _grouped(grad, groups)
        lin = ctx.bcos_lin
        if lin is not None:
            # d out / d lin = b (|lin| r)^(b-1)
            lin_g = _grouped(lin, groups)
            a = torch.mul(lin_g, r).abs_()
            if b != 2:
                a.pow_(b - 1)
            a.mul_(grad_g)
            dot = (lin_g * a) if ctx.needs_input_grad[1] else None  # = grad * out
            a.mul_(b)
        else:
            (out,) = ctx.saved_tensors
            out_g = _grouped(out, groups)
            # |lin| r = (|out| r)^(1/b), so d out / d lin = b (|out| r)^((b-1)/b)
            a = torch.mul(out_g, r).abs_()
            a.sqrt_() if b == 2 else a.pow_((b - 1) / b)
            a.mul_(grad_g).mul_(b)
            dot = (grad_g * out_g) if ctx.needs_input_grad[1] else None
        grad_sq = None
        if dot is not None:
            # d out / d sq = -(b - 1) / 2 * out / (sq + eps)
            if groups > 1:
                s = _channel_sum(dot.flatten(1, 2), groups)
            elif dot.dim() == 4 and ctx.sq_shape[1:2] == (1,):
                s = _channel_sum(dot, 1)
            else:
                s = dot
            grad_sq = (s * (ctx.r * ctx.r * (-(b - 1) / 2))).sum_to_size(ctx.sq_shape)
        grad_lin = a.reshape(grad.shape) if ctx.needs_input_grad[0] else None
        return grad_lin, grad_sq, None, None, None


def release_saved_input(out: torch.Tensor) -> None:
    """Called by a consumer of ``out`` that saves ``out`` for its own backward (with autograd's version check):
    if ``out`` comes straight from a B-cos factor, that node's backward then uses ``out`` and frees ``lin``."""
    node = out.grad_fn
    if node is not None and getattr(node, "bcos_lin", None) is not None:
        node.bcos_lin = None


def bcos_scale(lin: torch.Tensor, sq: torch.Tensor, b: float, eps: float, detach: bool,
               groups: int = 1) -> torch.Tensor:
    """``lin * (|lin| / sqrt(sq + eps))^(b-1)``, finite gradients everywhere.

    With ``detach`` the factor is treated as a constant (explanation mode). With ``groups > 1``, ``sq`` holds
    one squared norm per group of channels (dim 1).
    """
    if b == 1:
        return lin
    if detach or _compiling():
        lin_g = _grouped(lin, groups)
        scale = lin_g.abs() * _per_group(_inv_norm(sq, eps), groups)
        if b != 2:
            scale = scale.pow(b - 1)
        return (lin_g * (scale.detach() if detach else scale)).reshape(lin.shape)
    if torch.is_grad_enabled() and (lin.requires_grad or sq.requires_grad):
        return _BcosScale.apply(lin, sq, b, eps, groups)
    return _scaled(lin, _inv_norm(sq, eps), b, groups)


def take_weights(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy ``old``'s weight (and its bias, when ``new`` keeps one) into ``new``, in ``old``'s training mode."""
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if new.bias is not None:
            new.bias.copy_(old.bias)
    return new.train(old.training)


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
    if kernel_size == (1, 1) and padding == (0, 0):
        if stride == (1, 1):
            return _channel_sq_sum(x, groups)
        if _compiling():  # the full-resolution sum is shared (CSE) with a stride-1 conv on the same input
            return _channel_sq_sum(x, groups)[:, :, :: stride[0], :: stride[1]]
        return _channel_sq_sum(x[:, :, :: stride[0], :: stride[1]], groups)  # only the pixels the conv reads
    sq = _channel_sq_sum(x, groups)
    if dilation == (1, 1) and all(p <= k // 2 for p, k in zip(padding, kernel_size)):
        area = kernel_size[0] * kernel_size[1]  # (not divisor_override: ONNX AveragePool lacks it)
        return F.avg_pool2d(sq, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True) * area
    ones = sq.new_ones(sq.shape[1], 1, *kernel_size)
    return F.conv2d(sq, ones, None, stride, padding, dilation, groups=sq.shape[1])


def _pad_same(x: torch.Tensor, kernel_size, stride, dilation, mode: str = "zeros",
              value: torch.Tensor | None = None) -> torch.Tensor:
    """Pad ``x`` like TensorFlow's 'SAME' (as timm's ``Conv2dSame``), with zeros or with ``mode``."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    if top or bottom or left or right:
        x = _pad(x, (left, right, top, bottom), mode, value)
    return x


#: how a :class:`BcosConv2d` pads its input: ``zeros`` (as converted), a copy of the nearest (``replicate``)
#: or mirrored (``reflect``) input pixels, which makes a uniform region look the same at the border, or a
#: fixed value per input channel (``constant``: the layer's ``padding_value``, a constant of the explanation)
PADDING_MODES = ("zeros", "replicate", "reflect", "constant")


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int], mode: str,
         value: torch.Tensor | None = None) -> torch.Tensor:
    if mode == "zeros":
        return F.pad(x, pad)
    if mode == "constant":  # value (1 or N, C, 1, 1) in the padding, x inside: linear in x and in value
        return F.pad(x - value, pad) + value
    if mode == "reflect" and (max(pad[:2]) >= x.shape[-1] or max(pad[2:]) >= x.shape[-2]):
        raise ValueError(f"reflect padding by {pad} (left, right, top, bottom) needs an input larger than the "
                         f"padding, got {x.shape[-2]}x{x.shape[-1]}; use padding_mode='replicate'")
    return F.pad(x, pad, mode=mode)


class BcosConv2d(nn.Conv2d, DetachableModule):
    """2D B-cos convolution (any groups, stride, padding, dilation).

    ``same_padding=True`` pads dynamically like TensorFlow's 'SAME' (timm's ``Conv2dSame``).
    ``padding_mode`` (:data:`PADDING_MODES`): ``"zeros"`` as the converted conv; ``"replicate"``/``"reflect"``
    pad with input pixels instead, a linear map of the input (so the layer stays dynamic linear and
    contributions of padded taps belong to the pixels they copy) that changes the function at the border;
    ``"constant"`` (set with :meth:`set_padding`) pads channel ``c`` with ``padding_value[c]``, a frozen
    parameter that the explanation counts as a constant (its contribution is the padded taps').
    ``normalize_weights=True`` uses unit-norm weight rows (B-cos v2); default keeps ``w`` as is.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, b: float = 2.0, normalize_weights: bool = False,
                 same_padding: bool = False, padding_mode: str = "zeros", eps: float = DEFAULT_EPS, device=None,
                 dtype=None) -> None:
        if padding_mode not in PADDING_MODES[:3]:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES[:3]}, got {padding_mode!r} "
                             "(constant padding: set_padding('constant', value))")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode=padding_mode, device=device, dtype=dtype)
        if isinstance(self.padding, str):
            raise ValueError("BcosConv2d needs explicit integer padding (or same_padding=True)")
        self.b = _check_b(b)
        self.normalize_weights = normalize_weights
        self.same_padding = same_padding
        self.eps = eps
        self.grid_shift = 0  # see set_grid_shift

    @classmethod
    def from_module(cls, conv: nn.Conv2d, b: float = 2.0, normalize_weights: bool = False, *,
                    keep_bias: bool = False, same_padding: bool = False) -> "BcosConv2d":
        """A B-cos conv with the weights (and, with ``keep_bias``, the bias) of ``conv``."""
        new = skip_init(cls, *conv_geometry(conv), bias=keep_bias and conv.bias is not None, b=b,
                        normalize_weights=normalize_weights, same_padding=same_padding,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        return take_weights(new, conv)

    def set_padding(self, mode: str, value: Sequence[float] | None = None) -> None:
        """Pad with ``mode`` from now on; ``"constant"`` takes one ``value`` per input channel, kept as the frozen
        parameter ``padding_value`` (saved with the weights)."""
        if mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {mode!r}")
        if (mode == "constant") != (value is not None):
            raise ValueError("padding_mode='constant' needs a value per input channel, and only it takes one")
        self.padding_mode = mode
        self._parameters.pop("padding_value", None)
        if value is not None:
            value = torch.as_tensor(value, dtype=self.weight.dtype, device=self.weight.device).flatten()
            if value.numel() != self.in_channels:
                raise ValueError(f"padding_value needs {self.in_channels} values (one per input channel), "
                                 f"got {value.numel()}")
            self.padding_value = nn.Parameter(value.view(1, -1, 1, 1), requires_grad=False)

    def set_grid_shift(self, shift: int) -> None:
        """Sample the input ``shift`` positions later in both directions (output ``i`` centred on input
        ``stride * i + shift`` instead of ``stride * i``): the padding before shrinks by ``shift`` (a negative
        padding crops) and the padding after grows by as much. Output sizes stay the same when the stride exceeds
        ``shift``. Linear in the input: the layer stays dynamic linear."""
        if self.same_padding:
            raise ValueError("a grid shift needs explicit padding, not same_padding")
        if not 0 <= shift < min(self.stride):
            raise ValueError(f"the grid shift must lie in [0, stride), got {shift} for stride {self.stride}")
        self.grid_shift = int(shift)

    def effective_weight(self) -> torch.Tensor:
        """The weight used in the forward pass (unit-norm rows when ``normalize_weights``)."""
        if not self.normalize_weights:
            return self.weight
        return self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode, padding = self.padding_mode, self.padding
        value = self.padding_value if mode == "constant" else None
        if self.same_padding:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation, mode, value)
        elif self.grid_shift:  # one position later: less padding (or a crop) before, more after
            left, right, top, bottom = self._reversed_padding_repeated_twice
            t = self.grid_shift
            x = _pad(x, (left - t, right + t, top - t, bottom + t), mode, value)
            padding = (0, 0)
        elif mode != "zeros" and any(padding):
            x = _pad(x, self._reversed_padding_repeated_twice, mode, value)
            padding = (0, 0)
        out = F.conv2d(x, self.effective_weight(), None, self.stride, padding, self.dilation, self.groups)
        if self.b != 1:
            sq = conv_patch_sq_norms(x, self.kernel_size, self.stride, padding, self.dilation, self.groups)
            out = bcos_scale(out, sq, self.b, self.eps, self.explanation_mode, self.groups)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        extra = f", b={self.b:g}"
        if self.normalize_weights:
            extra += ", normalize_weights=True"
        if self.same_padding:
            extra += ", same_padding=True"
        if self.grid_shift:
            extra += f", grid_shift={self.grid_shift}"
        return super().extra_repr() + extra  # nn.Conv2d's names padding_mode when it is not zeros


def conv_geometry(conv: nn.Conv2d) -> tuple:
    """``(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)`` of ``conv`` with integer
    padding; a ``ValueError`` unless it zero-pads (the only padding an alignment layer computes exactly)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero padding can be converted exactly, got padding_mode={conv.padding_mode!r}")
    padding = conv.padding
    if isinstance(padding, str):
        padding = _explicit_padding(padding, conv.kernel_size, conv.dilation)
    return conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation, conv.groups


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
        new = skip_init(cls, linear.in_features, linear.out_features, bias=keep_bias and linear.bias is not None,
                        b=b, normalize_weights=normalize_weights, device=linear.weight.device,
                        dtype=linear.weight.dtype)
        return take_weights(new, linear)

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
