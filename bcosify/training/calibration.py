"""``bcosify.calibrate``: restore the activation scale of a converted model from a few unlabelled batches.

At ``b > 1`` every B-cos layer multiplies its output by ``|cos|^(b-1) <= 1``, so activations shrink layer after
layer (DESIGN.md, "Scale right after conversion"). Calibration gives every output channel of every B-cos layer and
normalization layer a positive gain, chosen in execution order, and re-estimates the running variance of uncentred
BatchNorms. The gains are baked into the weights, so the result is an ordinary B-cos network: the same dynamic
linear form (completeness holds as before) and nothing new to save or load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import normalize
from ..model import BcosModel
from ..nn import (BcosConv2d, BcosLinear, DauConv2d, DauLinear, DetachableGroupNorm, DetachableLayerNorm,
                  DetachableLayerNorm2d, SplitQKV, UncenteredBatchNorm2d, check_images)
from ..utils import eval_mode
from .loop import _split_batch

#: layers whose output channels get a gain; the value is the channel dimension of their output
_CHANNEL_DIM: dict[type, int] = {BcosConv2d: 1, BcosLinear: -1, DauConv2d: 1, DauLinear: -1, UncenteredBatchNorm2d: 1,
                                 DetachableGroupNorm: 1, DetachableLayerNorm2d: 1, DetachableLayerNorm: -1}
_ALIGNMENT = (BcosConv2d, BcosLinear, DauConv2d, DauLinear)


@dataclass(frozen=True)
class _Settings:
    target_rms: float
    max_spread: float
    min_channel_values: int


@dataclass
class _Layer:
    """One calibrated layer: its running output statistics and those of its counterpart in the original."""

    path: str
    module: nn.Module
    dim: int
    out_sq: torch.Tensor | None = None  # per-channel sum of squares of the output, in units of the current weights
    out_count: int = 0
    target_sq: torch.Tensor | None = None  # the same for the original's counterpart
    target_count: int = 0
    var_sum: torch.Tensor | None = None  # BatchNorm: sum of the batch variances of the input
    var_batches: int = 0
    var_values: int = 0  # BatchNorm: values per channel seen
    handles: list = field(default_factory=list)

    @property
    def is_alignment(self) -> bool:
        return isinstance(self.module, _ALIGNMENT)


@torch.no_grad()
def calibrate(bmodel: BcosModel, images: torch.Tensor | Iterable[Any], *, original: nn.Module | None = None,
              max_batches: int | None = None, target_rms: float = 1.0, max_spread: float = 4.0,
              min_channel_values: int = 256, progress: bool = True) -> BcosModel:
    """Restore the activation scale of a converted model from unlabelled images, in place.

    Every B-cos or DAU layer and normalization layer, in execution order, gets gains on its output channels so that its
    activations' root mean square (RMS) over the images matches that of the same module in ``original`` on the
    same images (the module at the same path; for timm's norm-act layers the norm's output before the activation;
    for a split ``qkv`` projection its ``v`` part). Uncentred BatchNorms also get their running variance
    re-estimated, so that training mode (batch statistics) starts where eval mode is. Where there is no
    counterpart (no ``original``, a replaced classifier, a different channel count) a B-cos layer gets RMS
    ``target_rms`` and a normalization layer keeps its scale. That suits freshly converted or random weights;
    pass ``original`` for a pretrained model.

    Robustness (statistics from a few images). A layer gain matches the RMS over all of the layer's channels; a
    channel's own factor on top of it is bounded to ``[1/max_spread, max_spread]``, and both the per-channel
    factors and a BatchNorm's re-estimated variance are used only once every channel has ``min_channel_values``
    values (images times positions or tokens); fewer give one gain per layer and the variance is left as it
    was. Unbounded, the per-channel gains and variances from four 32x32 images drive a random-init
    EfficientNet-B0's logits on other images to 1e14 (either alone to 1e12: a channel nearly silent on the
    calibration images, or with a nearly constant value there, gets a huge gain, and the errors compound over
    80 layers); with these bounds the logits stay of order 1.
    ``max_spread=math.inf, min_channel_values=1`` matches every channel exactly on the calibration images.

    One batch is matched exactly (up to the bounds). Over several batches the statistics accumulate while the
    gains of earlier layers still move from batch to batch, so the match is approximate (each gain uses every
    batch seen so far); give the images as one batch where memory allows.

    The gains are baked into the weights: a bias-free B-cos layer is positively homogeneous, ``out(c w) =
    c^b out(w)``, so a row scaled by ``c^(1/b)`` scales its output by ``c`` (a kept bias is scaled by ``c``); a
    DAU layer's fixed per-unit gain is multiplied by ``c``; a normalization layer's weight and bias are scaled by
    ``c``. The model stays dynamic linear, and
    :func:`bcosify.save`/:func:`bcosify.load` carry the result as they carry any weights.

    An ``original`` with degenerate statistics of its own (random-init torchvision EfficientNets, whose
    activations fade to 1e-15 with depth) is matched on the calibration images, but such a match does not carry
    over to other images; calibrate random-init models without ``original``.

    Args:
        bmodel: a :class:`BcosModel` from :func:`bcosify.convert` with ``normalize_weights=False`` (unit-norm
            weight rows cannot carry a gain).
        images: images in [0, 1] with the model's channel count: one ``(N, C, H, W)`` batch, or an iterable of
            batches or of ``(images, labels, ...)`` batches (labels are ignored).
        original: the unconverted model (eval mode is used; it takes normalized images, as it always did).
        max_batches: use at most this many batches.
        target_rms: the RMS of a B-cos layer's output where there is no counterpart to match.
        max_spread: bound (>= 1) on a channel's gain relative to its layer's gain; 1 gives one gain per layer.
        min_channel_values: values per channel (over all images seen) needed for per-channel gains and for
            re-estimating a BatchNorm's variance.
        progress: show a progress bar over the batches.

    Returns:
        ``bmodel``, calibrated (its train/eval mode is kept).

    Raises:
        ValueError: no images, images of the wrong shape or channel count, NaN or values outside [0, 1]; a
            model with unit-norm weights; an out-of-range setting.
    """
    if not isinstance(bmodel, BcosModel):
        raise TypeError(f"calibrate needs a BcosModel (from bcosify.convert), got {type(bmodel).__name__}")
    if isinstance(original, BcosModel):
        raise TypeError("original must be the unconverted model, not a BcosModel")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    if not (math.isfinite(target_rms) and target_rms > 0):
        raise ValueError(f"target_rms must be a positive number, got {target_rms}")
    if not max_spread >= 1:
        raise ValueError(f"max_spread must be >= 1 (1: one gain per layer), got {max_spread}")
    if min_channel_values < 1:
        raise ValueError(f"min_channel_values must be >= 1, got {min_channel_values}")
    settings = _Settings(float(target_rms), float(max_spread), int(min_channel_values))
    layers = _calibrated_layers(bmodel.network)
    parameter = next(bmodel.parameters())
    original_parameter = next(original.parameters(), parameter) if original is not None else None
    seen = 0
    try:
        for layer in layers:
            layer.handles.append(layer.module.register_forward_hook(_rescale_output(layer, settings)))
            if isinstance(layer.module, UncenteredBatchNorm2d):
                layer.handles.append(layer.module.register_forward_pre_hook(_reestimate_variance(layer, settings)))
            if original is not None:
                _watch_counterpart(layer, original, bmodel.network)
        with eval_mode(bmodel, *([original] if original is not None else [])):
            for x in tqdm(_batches(images, max_batches), desc="calibrate", total=_count(images, max_batches),
                          leave=False, disable=not progress):
                check_images(x, bmodel.in_chans)
                if original is not None:
                    original(normalize(x.to(original_parameter), bmodel.config.mean, bmodel.config.std))
                bmodel(x.to(parameter))
                seen += 1
    finally:
        for layer in layers:
            for handle in layer.handles:
                handle.remove()
    if not seen:
        raise ValueError("calibrate got no images (an empty loader?)")
    return bmodel


def _batches(images: torch.Tensor | Iterable[Any], max_batches: int | None) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        yield images
        return
    for index, batch in enumerate(images):
        if max_batches is not None and index >= max_batches:
            return
        yield _split_batch(batch)[0]


def _count(images: Any, max_batches: int | None) -> int | None:
    """The number of batches :func:`_batches` yields, where it is known beforehand."""
    if isinstance(images, torch.Tensor):
        return 1
    try:
        count = len(images)
    except TypeError:
        return max_batches
    return count if max_batches is None else min(count, max_batches)


def _calibrated_layers(network: nn.Module) -> list[_Layer]:
    layers = []
    for path, module in network.named_modules():
        dim = _CHANNEL_DIM.get(type(module))
        if dim is None:
            continue
        if isinstance(module, (BcosConv2d, BcosLinear)) and module.normalize_weights:
            raise ValueError(f"{path}: calibrate bakes gains into the weights, which normalize_weights=True layers "
                             "ignore; convert with normalize_weights=False")
        if getattr(module, "weight", None) is None:  # a norm without affine weight: nowhere to put a gain
            continue
        layers.append(_Layer(path, module, dim))
    return layers


def _channel_sq(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """Per-channel sum of squares (float64) of ``t`` along ``dim``, and the number of values per channel."""
    flat = t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).double()
    return flat.square().sum(0), flat.shape[0]


def _rescale_output(layer: _Layer, settings: _Settings):
    def hook(module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
        sq, count = _channel_sq(out, layer.dim)
        layer.out_sq = sq if layer.out_sq is None else layer.out_sq + sq
        layer.out_count += count
        current = layer.out_sq / layer.out_count
        if layer.target_count and layer.target_sq.shape == current.shape:
            target = layer.target_sq / layer.target_count
        elif layer.is_alignment:
            target = torch.full_like(current, settings.target_rms ** 2)
        else:
            return out  # a norm layer without counterpart keeps its own scale
        gain = _gains(current, target, layer.out_count, settings)
        _bake_gain(module, gain)
        layer.out_sq *= gain.square()
        shape = [1] * out.dim()
        shape[layer.dim] = -1
        return out * gain.to(out.dtype).view(shape)

    return hook


def _gains(current: torch.Tensor, target: torch.Tensor, values: int, settings: _Settings) -> torch.Tensor:
    """Per-channel gains that bring mean squares ``current`` (from ``values`` values per channel) to ``target``.

    The layer gain matches the mean square over all channels; a channel's own factor on top of it is bounded to
    ``[1/max_spread, max_spread]`` and used only with at least ``min_channel_values`` values per channel.
    """
    usable = (current > 0) & (target > 0)
    if not bool(usable.any()):
        return torch.ones_like(current)
    layer_gain = (target[usable].sum() / current[usable].sum()).sqrt()
    if values < settings.min_channel_values or settings.max_spread == 1:
        return layer_gain.expand_as(current).clone()
    channel = (target / current.where(usable, 1.0)).sqrt() / layer_gain
    spread = settings.max_spread
    return layer_gain * torch.where(usable, channel.clamp(1 / spread, spread), 1.0)


def _bake_gain(module: nn.Module, gain: torch.Tensor) -> None:
    """Scale the output channels of ``module`` by ``gain`` (positive) through its weight (a DAU layer: its fixed
    per-unit gain) and bias."""
    weight = module.weight
    if isinstance(module, (DauConv2d, DauLinear)):
        module.gain.mul_(gain.to(module.gain.dtype).view_as(module.gain))
    elif isinstance(module, (BcosConv2d, BcosLinear)):
        weight.mul_(gain.pow(1 / module.b).to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)))
    else:
        weight.mul_(gain.to(weight.dtype))
    if module.bias is not None:
        module.bias.mul_(gain.to(module.bias.dtype))


def _reestimate_variance(layer: _Layer, settings: _Settings):
    """BatchNorm: running variance = mean of the (unbiased) batch variances of the inputs seen so far, once there
    are ``min_channel_values`` values per channel (a variance from fewer is left as it was)."""

    def hook(module: UncenteredBatchNorm2d, inputs) -> None:
        (x,) = inputs
        n = x.numel() / x.shape[1]
        var = x.double().var(dim=(0, 2, 3), unbiased=False) * (n / max(n - 1, 1))
        layer.var_sum = var if layer.var_sum is None else layer.var_sum + var
        layer.var_batches += 1
        layer.var_values += int(n)
        if layer.var_values < settings.min_channel_values:
            return
        old = module.running_var.double() + module.eps
        new = layer.var_sum / layer.var_batches
        module.running_var.copy_(new)
        if layer.out_sq is not None:  # keep the accumulated output statistics in units of the new variance
            layer.out_sq *= old / (new + module.eps)

    return hook


def _watch_counterpart(layer: _Layer, original: nn.Module, network: nn.Module) -> None:
    """Hook the module of ``original`` whose output ``layer`` should match, if there is one."""
    parent_path, _, name = layer.path.rpartition(".")
    counterpart = _submodule(original, layer.path)
    if counterpart is not None:
        where = "output"
    else:
        parent = _submodule(original, parent_path)
        if parent is None:
            return
        if name == "norm" and isinstance(getattr(parent, "act", None), nn.Module):  # timm's *NormAct layers
            counterpart, where = parent.act, "input"
        elif name == "v" and isinstance(network.get_submodule(parent_path), SplitQKV):
            counterpart, where = parent, "v"
            parts = network.get_submodule(parent_path).parts  # v: the last of the fused output's equal parts
        else:
            return

    def record(t: torch.Tensor) -> None:
        sq, count = _channel_sq(t, layer.dim)
        layer.target_sq = sq if layer.target_sq is None else layer.target_sq + sq
        layer.target_count += count

    if where == "input":
        layer.handles.append(counterpart.register_forward_pre_hook(lambda m, inputs: record(inputs[0])))
    elif where == "v":
        layer.handles.append(counterpart.register_forward_hook(
            lambda m, inputs, out: record(out[..., (parts - 1) * out.shape[-1] // parts:])))
    else:
        layer.handles.append(counterpart.register_forward_hook(lambda m, inputs, out: record(out)))


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
