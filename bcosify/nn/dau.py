"""Dynamic Alignment Units (CoDA-Nets, Boehle, Fritz and Schiele, CVPR 2021) as convolutions and linear layers.

For an input patch ``p`` (``d`` values: the channels of one group times the kernel taps) unit ``j`` has the
dynamic weight ``w_j(p) = B_j (A p) + b_j`` and outputs ``gain_j * g(w_j(p))^T p``, where ``A: R^d -> R^r`` is
shared by the units of a group, ``B_j: R^r -> R^d``, ``b_j`` is a static weight, ``gain_j`` a fixed per-unit
gain, and ``g`` the squashing ``g(u) = u ||u|| / (1 + ||u||^2)`` (``"squash"``) or ``u / ||u||`` (``"l2"``).

The dynamic weights are never materialised. With ``h = A p``::

    w_j^T p   = h^T (B_j^T p) + b_j^T p
    ||w_j||^2 = h^T (B_j^T B_j) h + 2 (B_j^T b_j)^T h + ||b_j||^2

so a layer costs about ``r + 2`` convolutions and ``r x r`` quadratic forms; the ``r``-fold intermediate
products are formed a few ranks at a time and recomputed in the backward pass, so a layer keeps no more than a
few output-sized maps for backward (plus ``h``).

Converted from a plain layer (:meth:`DauConv2d.from_module`), ``b_j`` is its weight, ``B = 0`` and ``gain_j``
undoes ``g``'s scale at ``w_j = b_j``: the converted layer computes the original layer exactly. In explanation
mode ``w_j(p)`` and the squashing factor are detached, so ``output = W(p) p`` with
``W_j(p) = gain_j * g(w_j(p))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DEFAULT_RANK, check_rank, check_squash
from .base import DetachableModule
from .bcos import DEFAULT_EPS, _compiling, _pad_same, conv_geometry

#: ranks contracted at once: the transient memory of a layer is about this many output-sized maps
RANK_CHUNK = 8


def squash_factor(sq: torch.Tensor, squash: str, eps: float) -> torch.Tensor:
    """``s(||u||^2)`` with ``g(u) = s(||u||^2) u``: ``||u|| / (1 + ||u||^2)`` or ``1 / ||u||``, where
    ``||u|| = sqrt(||u||^2 + eps)``."""
    sq = sq.clamp_min(0)  # (a quadratic form of a norm may round below zero)
    if squash == "squash":
        return (sq + eps).sqrt() / (1 + sq)
    return (sq + eps).rsqrt()


def _squash_factor_grad(sq: torch.Tensor, squash: str, eps: float) -> torch.Tensor:
    """``d s / d sq`` of :func:`squash_factor` (0 where ``sq`` was clamped)."""
    pos = sq.clamp_min(0)
    if squash == "squash":
        norm = (pos + eps).sqrt()
        grad = (0.5 / norm - norm / (1 + pos)) / (1 + pos)
    else:
        grad = -0.5 * (pos + eps).pow(-1.5)
    return grad.masked_fill_(sq < 0, 0)


class _Squashed(torch.autograd.Function):
    """``lin * gain * s(sq)``, keeping only ``lin`` and ``sq`` for the backward (the factor is recomputed)."""

    @staticmethod
    def forward(ctx, lin: torch.Tensor, sq: torch.Tensor, gain: torch.Tensor, squash: str, eps: float):
        ctx.save_for_backward(lin, sq, gain)
        ctx.squash, ctx.eps = squash, eps
        return lin * (squash_factor(sq, squash, eps) * gain)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        lin, sq, gain = ctx.saved_tensors
        grad_lin = grad_sq = None
        if ctx.needs_input_grad[0]:
            grad_lin = grad * (squash_factor(sq, ctx.squash, ctx.eps) * gain)
        if ctx.needs_input_grad[1]:
            grad_sq = grad * lin * (_squash_factor_grad(sq, ctx.squash, ctx.eps) * gain)
        return grad_lin, grad_sq, None, None, None


def _row_sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """``||row||^2`` of every row of a ``(K, d)`` matrix, without a temporary of its size."""
    return torch.einsum("kd,kd->k", rows, rows)


def _init_gain(weight_rows: torch.Tensor, squash: str, eps: float) -> torch.Tensor:
    """Per-unit gains that undo the squashing at ``w_j = b_j`` (1 for an all-zero row, whose output is 0)."""
    sq = _row_sq_norms(weight_rows)
    factor = squash_factor(sq, squash, eps)
    return torch.where(sq > 0, 1 / factor, torch.ones_like(factor))


def _contract_part(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, project, groups: int, start: int,
                   stop: int) -> torch.Tensor:
    units, rank = weight.shape[:2]
    q = project(x, weight[:, start:stop].flatten(0, 1))  # (N, K * c, ...), unit-major within each group
    q = q.unflatten(1, (groups, units // groups, stop - start))
    hc = h.unflatten(1, (groups, rank))[:, :, start:stop].unsqueeze(2)  # (N, G, 1, c, ...)
    return (q * hc).sum(3).flatten(1, 2)


def _contract(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, project, groups: int) -> torch.Tensor:
    """``out[:, j] = sum_s h[:, g(j) * r + s] * project(x, weight[:, s])[:, j]`` for the ``K`` units ``j``.

    ``weight`` is ``(K, r, ...)``, ``h`` is ``(N, groups * r, ...)`` and ``project(x, w)`` maps ``x`` with a
    ``(K * c, ...)`` weight to ``(N, K * c, ...)`` (channels in dim 1, grouped). Computed ``RANK_CHUNK`` ranks at
    a time; with autograd each chunk is recomputed in the backward pass instead of kept (not while torch.compile or
    torch.export traces: plain operations export as such).
    """
    rank = weight.shape[1]
    step = min(rank, RANK_CHUNK)
    recompute = torch.is_grad_enabled() and not _compiling() and any(t.requires_grad for t in (h, x, weight))
    total = None
    for start in range(0, rank, step):
        args = (h, x, weight, project, groups, start, min(start + step, rank))
        part = checkpoint(_contract_part, *args, use_reentrant=False) if recompute else _contract_part(*args)
        total = part if total is None else total + part
    return total


class _Dau(DetachableModule):
    """What the DAU convolution and linear layer share; ``weight`` holds the static weights ``b_j``."""

    weight: torch.Tensor
    weight_a: torch.Tensor
    weight_b: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor | None

    def _init_dynamic(self, units: int, group_dim: tuple[int, ...], groups: int, rank: int, squash: str,
                      eps: float, generator: torch.Generator | None) -> None:
        d = math.prod(group_dim)
        self.rank = min(check_rank(rank), d)  # a rank above the patch size adds nothing
        self.squash = check_squash(squash)
        self.eps = float(eps)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        bound = 1 / math.sqrt(d)  # (the default init of a conv / linear layer with this fan-in)
        a = (torch.rand(groups * self.rank, *group_dim, generator=generator, dtype=self.weight.dtype) * 2 - 1) * bound
        self.weight_a = nn.Parameter(a.to(self.weight.device))
        self.weight_b = nn.Parameter(torch.zeros(units, self.rank, *group_dim, **factory))
        self.register_buffer("gain", _init_gain(self.weight.detach().flatten(1), self.squash, self.eps))

    @torch.no_grad()
    def _take_weights(self, module: nn.Module):
        """``module``'s weight as the static weights (and its bias, if this layer keeps one) and its mode."""
        self.weight.copy_(module.weight)
        self.reset_gain()
        if self.bias is not None:
            self.bias.copy_(module.bias)
        return self.train(module.training)

    def reset_gain(self) -> None:
        """Set each unit's gain to undo the squashing of its static weight ``b_j`` (with ``B = 0`` the layer then
        computes ``b_j^T p``)."""
        self.gain.copy_(_init_gain(self.weight.flatten(1), self.squash, self.eps))

    def _aligned(self, x: torch.Tensor, h: torch.Tensor, project, groups: int, channel_shape: tuple[int, ...]):
        """``gain_j * s(||w_j||^2) * w_j^T p`` from the patches' basis coordinates ``h = A p``."""
        units = self.weight.shape[0]
        b = self.weight.flatten(1)
        detach = self.explanation_mode
        lin = project(x, self.weight) + _contract(h.detach() if detach else h, x, self.weight_b, project, groups)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            bmat = self.weight_b.flatten(2)  # (K, r, d)
            gram = torch.einsum("kri,ksi->krs", bmat, bmat)  # B_j^T B_j
            cross = torch.einsum("kri,ki->kr", bmat, b)  # B_j^T b_j
            quad = _contract(h, h, gram, _basis_project(project), groups)
            sq = quad + 2 * _basis_project(project)(h, cross) + _row_sq_norms(b).view(units, *channel_shape)
        gain = self.gain.view(units, *channel_shape)
        if torch.is_grad_enabled() and (lin.requires_grad or sq.requires_grad) and not _compiling():
            return _Squashed.apply(lin, sq, gain, self.squash, self.eps)
        return lin * (squash_factor(sq, self.squash, self.eps) * gain)

    def _extra(self) -> str:
        return f", rank={self.rank}, squash={self.squash!r}"


def _basis_project(project):
    """``project`` over ``h`` (1x1 per group for convolutions, a plain matrix product for linear layers)."""
    return getattr(project, "basis", None) or project


class _ConvProject:
    """``x -> conv2d(x, w)`` with a layer's geometry; ``basis`` is the grouped 1x1 map over ``h``."""

    def __init__(self, stride, padding, dilation, groups: int) -> None:
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def basis(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, w[..., None, None], None, 1, 0, 1, self.groups)


def _linear_project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


class DauConv2d(nn.Conv2d, _Dau):
    """2D convolution of Dynamic Alignment Units (any groups, stride, zero padding, dilation).

    ``weight`` holds the static weights ``b_j``; ``weight_a`` is ``A`` (``groups * rank`` rows over one group's
    patch); ``weight_b`` is ``B`` (``(out_channels, rank, in_channels // groups, kh, kw)``); ``gain`` the fixed
    per-unit gain. ``rank`` is capped at the patch size. ``same_padding=True`` pads dynamically like TensorFlow's
    'SAME' (timm's ``Conv2dSame``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, rank: int = DEFAULT_RANK, squash: str = "squash",
                 same_padding: bool = False, eps: float = DEFAULT_EPS, generator: torch.Generator | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode="zeros", device=device, dtype=dtype)
        if isinstance(self.padding, str):
            raise ValueError("DauConv2d needs explicit integer padding (or same_padding=True)")
        self.same_padding = same_padding
        self._init_dynamic(out_channels, (in_channels // groups, *self.kernel_size), groups, rank, squash, eps,
                           generator)

    @classmethod
    def from_module(cls, conv: nn.Conv2d, rank: int = DEFAULT_RANK, squash: str = "squash", *,
                    keep_bias: bool = False, same_padding: bool = False, eps: float = DEFAULT_EPS,
                    seed: int = 0) -> "DauConv2d":
        """A DAU convolution that computes ``conv`` (without its bias unless ``keep_bias``): ``b_j`` from its
        weight, ``B = 0``, ``A`` random (from ``seed``)."""
        new = cls(*conv_geometry(conv), bias=keep_bias and conv.bias is not None, rank=rank, squash=squash,
                  same_padding=same_padding, eps=eps, generator=torch.Generator().manual_seed(seed),
                  device=conv.weight.device, dtype=conv.weight.dtype)
        return new._take_weights(conv)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """``h = A p`` for every patch of ``x`` (after any 'SAME' padding): ``(N, groups * rank, H_out, W_out)``."""
        return F.conv2d(x, self.weight_a, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        project = _ConvProject(self.stride, self.padding, self.dilation, self.groups)
        out = self._aligned(x, self.basis(x), project, self.groups, (1, 1))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra() + (", same_padding=True" if self.same_padding else "")


class DauLinear(nn.Linear, _Dau):
    """Linear layer of Dynamic Alignment Units over the last dimension; the patch is the whole input vector.

    ``weight`` holds the static weights ``b_j``, ``weight_a`` is ``A`` (``(rank, in_features)``), ``weight_b`` is
    ``B`` (``(out_features, rank, in_features)``), ``gain`` the fixed per-unit gain; ``rank`` is capped at
    ``in_features``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, rank: int = DEFAULT_RANK,
                 squash: str = "squash", eps: float = DEFAULT_EPS, generator: torch.Generator | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_dynamic(out_features, (in_features,), 1, rank, squash, eps, generator)

    @classmethod
    def from_module(cls, linear: nn.Linear, rank: int = DEFAULT_RANK, squash: str = "squash", *,
                    keep_bias: bool = False, eps: float = DEFAULT_EPS, seed: int = 0) -> "DauLinear":
        """A DAU linear layer that computes ``linear`` (without its bias unless ``keep_bias``): ``b_j`` from its
        weight, ``B = 0``, ``A`` random (from ``seed``)."""
        new = cls(linear.in_features, linear.out_features, bias=keep_bias and linear.bias is not None, rank=rank,
                  squash=squash, eps=eps, generator=torch.Generator().manual_seed(seed),
                  device=linear.weight.device, dtype=linear.weight.dtype)
        return new._take_weights(linear)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """``h = A x``: ``(..., rank)``."""
        return F.linear(x, self.weight_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self._aligned(flat, self.basis(flat), _linear_project, 1, ()).reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra()
