"""Normalisation layers for B-cos networks.

BatchNorm becomes uncentred (a per-channel scale); LayerNorm / GroupNorm keep their centring (which is
linear) and detach their standard deviation in explanation mode. Biases are optional and off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import DetachableModule


class UncenteredBatchNorm2d(DetachableModule):
    """``gamma * x / sqrt(var + eps) (+ bias)``: BatchNorm without mean subtraction.

    Eval mode uses the running variance (a fixed per-channel scale). Training mode uses the batch
    variance and updates the running one.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d, *, keep_bias: bool = False) -> "UncenteredBatchNorm2d":
        """The uncentred version of ``bn``.

        With ``keep_bias`` the centring is folded into the bias (``beta - gamma * mean / std``), so that
        in eval mode the layer computes exactly what ``bn`` computes.
        """
        if bn.running_var is None:
            raise ValueError("BatchNorm without running statistics cannot be converted")
        weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        new = cls(bn.num_features, bn.eps, bn.momentum, bias=keep_bias, device=bn.running_var.device,
                  dtype=bn.running_var.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
            if keep_bias:
                beta = bn.bias if bn.bias is not None else torch.zeros_like(weight)
                new.bias.copy_(beta - weight * bn.running_mean / (bn.running_var + bn.eps).sqrt())
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
            if self.explanation_mode:
                var = var.detach()
        else:
            var = self.running_var
        scale = self.weight / (var + self.eps).sqrt()
        out = x * scale.view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, bias={self.bias is not None}"


class DetachableLayerNorm(DetachableModule):
    """LayerNorm over the trailing ``normalized_shape`` dims (channels-last) with a detachable std."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.weight = (nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
                       if elementwise_affine else None)
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_module(cls, ln: nn.LayerNorm, *, keep_bias: bool = False) -> "DetachableLayerNorm":
        """A copy of ``ln``; its bias only with ``keep_bias``."""
        return _copy_norm(cls(ln.normalized_shape, ln.eps, ln.weight is not None, keep_bias and ln.bias is not None,
                              **_factory(ln)), ln)

    def _normalize(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        centred = x - x.mean(dim=dims, keepdim=True)
        std = (centred.pow(2).mean(dim=dims, keepdim=True) + self.eps).sqrt()
        if self.explanation_mode:
            std = std.detach()
        return centred / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        out = self._normalize(x, dims)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"


class DetachableLayerNorm2d(DetachableLayerNorm):
    """LayerNorm over the channels of an NCHW tensor (channels-first) with a detachable std."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._normalize(x, (1,))
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class DetachableGroupNorm(DetachableModule):
    """GroupNorm with a detachable std; bias optional."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_module(cls, gn: nn.GroupNorm, *, keep_bias: bool = False) -> "DetachableGroupNorm":
        """A copy of ``gn``; its bias only with ``keep_bias``."""
        return _copy_norm(cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine,
                              keep_bias and gn.bias is not None, **_factory(gn)), gn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.num_groups, -1)
        centred = grouped - grouped.mean(dim=2, keepdim=True)
        std = (centred.pow(2).mean(dim=2, keepdim=True) + self.eps).sqrt()
        if self.explanation_mode:
            std = std.detach()
        out = (centred / std).view_as(x)
        shape = (1, c) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, bias={self.bias is not None}"


def _factory(module: nn.Module) -> dict:
    tensor = next(iter(module.parameters()), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _copy_norm(new: nn.Module, old: nn.Module):
    with torch.no_grad():
        if new.weight is not None:
            new.weight.copy_(old.weight)
        if new.bias is not None:
            new.bias.copy_(old.bias)
    new.train(old.training)
    return new
