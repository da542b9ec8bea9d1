"""The ``[x, 1 - x]`` input encoding, in one place: the input checks, the encoder, the original model's input
normalization (where it comes from) and its exact folding into the first layer."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConversionError

RANGE_TOLERANCE = 1e-4


def check_images(x: Any, in_chans: int) -> None:
    """Raise a ``ValueError``/``TypeError`` unless ``x`` is a finite float batch ``(N, in_chans, H, W)`` in [0, 1].

    Value checks are skipped while ``torch.compile`` traces (they would break the graph).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {x.dtype} "
                         "(for uint8 images divide by 255)")
    if x.numel() == 0:
        raise ValueError(f"expected a non-empty batch, got shape {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf values")
    low, high = torch.aminmax(x.detach())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(f"expected un-normalized images in [0, 1], got values in [{low.item():.4g}, "
                         f"{high.item():.4g}]; the model folds the normalization in itself")


class InputEncoder(nn.Module):
    """Encode images ``x`` in ``[0, 1]`` as ``[x, 1 - x]`` along the channel dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1 - x], dim=1)


def resolve_normalization(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                          in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """The original model's input ``(mean, std)`` and where they came from: the arguments, timm's
    ``pretrained_cfg``, or torchvision's ImageNet default; one value is repeated over ``in_chans`` channels."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        source = "arguments"
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            mean, std, source = cfg["mean"], cfg["std"], "timm pretrained_cfg"
        elif type(model).__module__.startswith("torchvision.models"):
            mean, std, source = IMAGENET_MEAN, IMAGENET_STD, "torchvision (ImageNet)"
        else:
            raise ConversionError(
                f"the input normalization of {type(model).__name__} is unknown: pass mean=... and std=... "
                "(mean=0, std=1 for a model that takes images in [0, 1] as they are)")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == 1 and in_chans > 1:
        mean, std = mean * in_chans, std * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConversionError(f"mean/std have {len(mean)}/{len(std)} values but the model takes {in_chans} channels")
    return mean, std, source


def fold_input_normalization(conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float],
                             space_to_depth: int = 1) -> nn.Conv2d:
    """A copy of ``conv`` (same type) over ``[x, 1 - x]`` that computes ``conv((x - mean) / std)`` exactly,
    zero borders included. With ``space_to_depth`` (a block size), ``conv`` takes the image rearranged block-major
    (channels ``(block row, block column, colour)``, timm's ``SpaceToDepth``), and the copy takes ``[x, 1 - x]``
    rearranged the same way.

    Weights ``A_c = W_c (1 - mean_c) / std_c`` act on ``x_c`` and ``B_c = -W_c mean_c / std_c`` on
    ``1 - x_c``; a zero-padded tap gives 0 in both models. Computed in float64, stored in the conv's dtype.
    """
    if conv.groups != 1:
        raise ConversionError(f"the first layer must have groups=1 to fold the input normalization, got {conv.groups}")
    blocks = space_to_depth ** 2
    c = conv.in_channels // blocks
    if len(mean) != c or len(std) != c or c * blocks != conv.in_channels:
        raise ConversionError(f"mean/std have {len(mean)}/{len(std)} values but the first layer takes {c} channels"
                              + (f" (in {blocks} space-to-depth blocks)" if blocks > 1 else ""))
    w = conv.weight.detach()
    m = torch.tensor(mean, dtype=torch.float64, device=w.device).view(1, 1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float64, device=w.device).view(1, 1, c, 1, 1)
    w64 = w.double().reshape(w.shape[0], blocks, c, *w.shape[2:])
    folded = torch.cat([w64 * (1 - m) / s, -w64 * m / s], dim=2).reshape(w.shape[0], 2 * c * blocks, *w.shape[2:])
    new = copy.deepcopy(conv)
    new.in_channels = 2 * c * blocks
    new.weight = nn.Parameter(folded.to(w.dtype), requires_grad=conv.weight.requires_grad)
    return new
