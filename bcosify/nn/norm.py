"""Normalization layers for B-cos networks.

BatchNorm becomes uncentred (a per-channel scale); LayerNorm / GroupNorm keep their centring (which is
linear) and detach their standard deviation in explanation mode. Biases are optional and off by default.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .base import DetachableModule
from .bcos import _compiling, release_saved_input


class _UncenteredBatchNormTrain(torch.autograd.Function):
    """``x * weight * invstd`` with the batch statistics' gradient (``invstd = 1/sqrt(var(x) + eps)``).

    ``mean`` and ``invstd`` are the batch statistics of ``x``, computed without gradient (their dependence
    on ``x`` is in the backward), in float32 for half-precision ``x``. The output has the dtype of ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor):
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.invstd = mean, invstd
        return x * (weight.to(invstd.dtype) * invstd).to(x.dtype).view(1, -1, 1, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        mean, invstd = ctx.mean, ctx.invstd
        w = weight.to(invstd.dtype)
        n = x.numel() / x.shape[1]
        # ATen's batch-norm backward with the mean set to 0 computes, in two fused passes,
        #   grad_in = k (grad - sum(grad)/n) - k x invstd^2 a/n,  k = w invstd,  a = sum(grad x),
        #   grad_w = a invstd,  grad_b = sum(grad);
        # the exact gradient is  k grad - k (x - mean) invstd^2 a/n  = grad_in + k (sum(grad) + mean invstd^2 a)/n
        # (half-precision x and grad with float32 weight and statistics is the mixed mode ATen supports)
        mask = [ctx.needs_input_grad[0], True, True]
        grad_x, grad_w, total = torch.ops.aten.native_batch_norm_backward(
            grad, x, w, None, None, torch.zeros_like(mean), invstd, True, 0.0, mask)
        if grad_x is not None:
            a = grad_w / invstd
            grad_x.add_((w * invstd * (total + mean * invstd * invstd * a) / n).view(1, -1, 1, 1))
        return grad_x, grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None, None, None


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
            if (not self.explanation_mode and x.dim() == 4 and x.dtype == self.weight.dtype and not _compiling()
                    and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
                return self._forward_train(x)
            var = x.var(dim=(0, *range(2, x.dim())), unbiased=False)
            self._update_running_var(var.detach(), x.numel() / x.shape[1])
            if self.explanation_mode:
                var = var.detach()
        else:
            var = self.running_var
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight / (var + self.eps).sqrt()
        out = x * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_var(self, var: torch.Tensor, n: float | torch.Tensor) -> None:
        """Blend the batch variance ``var`` of ``n`` values per channel into the running variance (unbiased)."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        correction = n / (n - 1).clamp_min(1) if isinstance(n, torch.Tensor) else n / max(n - 1, 1)
        self.running_var.mul_(1 - momentum).add_(var * correction, alpha=momentum)

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Training step with gradients: the same function as the composite path, with a cheaper backward."""
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # one fused pass
            stats_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            mean, var = mean.to(stats_dtype), var.to(stats_dtype)
            self._update_running_var(var, x.numel() / x.shape[1])
            invstd = (var + self.eps).rsqrt_()
        out = _UncenteredBatchNormTrain.apply(x, self.weight, mean, invstd)
        release_saved_input(x)  # ``x`` is saved (and version-checked) here
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, bias={self.bias is not None}"


class SyncUncenteredBatchNorm2d(UncenteredBatchNorm2d):
    """:class:`UncenteredBatchNorm2d` whose training statistics are those of the global batch of all processes
    of a distributed run (``bcosify finetune --sync-bn``); alone, or in eval mode, the plain layer.

    The layer holds the same parameters and buffers as the plain one; :func:`sync_batchnorm` switches the layers
    of a model to it for the length of a run, so checkpoints and saved models hold plain layers. Every process
    must run every training forward and backward (the statistics and their gradients are all-reduced).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # sums in the forward, and the gradients back

        c = x.shape[1]
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # per channel: the sum, the uncentred second moment's sum, and the count, of this process's share
        local = torch.cat([xs.sum((0, 2, 3)), (xs * xs).sum((0, 2, 3)), xs.new_full((1,), x.numel() / c)])
        total = all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        self._update_running_var(var.detach().to(self.running_var.dtype), n)  # n stays a tensor: no GPU sync
        if self.explanation_mode:
            var = var.detach()
        out = x * (self.weight / (var + self.eps).sqrt()).to(x.dtype).view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`UncenteredBatchNorm2d` of ``model`` is a :class:`SyncUncenteredBatchNorm2d`
    (the same module objects, parameters and buffers); after it, plain again."""
    layers = [m for m in model.modules() if type(m) is UncenteredBatchNorm2d]
    for layer in layers:
        layer.__class__ = SyncUncenteredBatchNorm2d
    try:
        yield model
    finally:
        for layer in layers:
            layer.__class__ = UncenteredBatchNorm2d


class UncenteredBatchNorm1d(UncenteredBatchNorm2d):
    """``gamma * x / sqrt(var + eps) (+ bias)`` over the channels of ``(N, C)`` or ``(N, C, L)`` inputs: the
    uncentred ``BatchNorm1d``."""


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
