"""Faithfulness metrics that no maintained library computes in the form the benchmarks need.

- :func:`border_share` / :func:`top_left_share`: the share of positive attribution in the outer pixels of an image (the "border signal"
  a bias-free network can build from the zero-padded border of the ``[x, 1 - x]`` encoding).
- :func:`perturbation_curves` / :func:`curve_auc`: deletion (remove the most important pixels first) and
  insertion (add them first to a blank image) curves of the target class probability, batched. The deletion
  curve is quantus' ``PixelFlipping`` with a fixed baseline and the unperturbed point prepended (tested against
  it); quantus has no insertion curve.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["border_share", "curve_auc", "perturbation_curves", "top_left_share"]

CURVE_MODES = ("deletion", "insertion")


def _maps(attributions: torch.Tensor) -> torch.Tensor:
    if not isinstance(attributions, torch.Tensor) or attributions.dim() not in (3, 4):
        raise ValueError(f"expected attributions of shape (N, C, H, W) or (N, H, W), got "
                         f"{getattr(attributions, 'shape', type(attributions).__name__)}")
    attributions = attributions.detach()
    return attributions.sum(1) if attributions.dim() == 4 else attributions


def border_share(attributions: torch.Tensor, width: int = 2) -> torch.Tensor:
    """``(N,)`` share of the positive attribution that lies in the outer ``width`` pixels of each image.

    ``attributions``: ``(N, C, H, W)`` (summed over channels) or maps ``(N, H, W)``. An image without positive
    attribution scores 0. For reference, a map spread evenly scores the border's share of the area,
    ``1 - (H - 2 width)(W - 2 width) / (H W)``.
    """
    maps = _maps(attributions).double().clamp_min(0)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    h, w = maps.shape[-2:]
    if 2 * width >= min(h, w):
        raise ValueError(f"a border of {width} px leaves no interior in {h}x{w} maps")
    total = maps.flatten(1).sum(1)
    inner = maps[:, width:h - width, width:w - width].flatten(1).sum(1)
    return torch.where(total > 0, (total - inner) / total.clamp_min(torch.finfo(total.dtype).tiny),
                       torch.zeros_like(total))


def top_left_share(attributions: torch.Tensor, size: int = 4) -> torch.Tensor:
    """``(N,)`` share of the positive attribution in the top-left ``size x size`` pixels of each image.

    Where explanations collect in networks whose stride-2 layers see even-sized inputs: each leaves its output grid
    half a step towards the top-left (``convert(..., center_grid=True)`` centres it). A map spread evenly scores
    ``size**2 / (H W)``; 0 without positive values.
    """
    maps = _maps(attributions).double().clamp_min(0)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(maps.shape[-2:]):
        raise ValueError(f"size must be an int in [1, {min(maps.shape[-2:])}], got {size!r}")
    total = maps.flatten(1).sum(1)
    corner = maps[:, :size, :size].flatten(1).sum(1)
    return torch.where(total > 0, corner / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def foreground_share(attributions: torch.Tensor, images: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """``(N,)`` share of the positive attribution on the pixels of ``images`` (``(N, C, H, W)`` in [0, 1]) brighter
    than ``threshold`` in some channel: the object, on a black background (Fashion-MNIST's garments). 0 without
    positive attribution."""
    maps = _maps(attributions).double().clamp_min(0)
    if images.dim() != 4 or images.shape[0] != maps.shape[0] or images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"images of shape {tuple(images.shape)} do not match attributions of shape "
                         f"{tuple(attributions.shape)}")
    mask = (images.detach() > threshold).any(1)
    total = maps.flatten(1).sum(1)
    on = (maps * mask).flatten(1).sum(1)
    return torch.where(total > 0, on / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


@torch.no_grad()
def perturbation_curves(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        targets: torch.Tensor, attributions: torch.Tensor, *, mode: str = "deletion",
                        steps: int = 16, baseline: float = 0.0, batch_size: int = 256) -> torch.Tensor:
    """Deletion or insertion curves: ``(N, steps + 1)`` softmax probabilities of the target class.

    Pixels are ranked by their attribution (summed over channels; highest first, ties in raster order). Step
    ``k`` of ``mode="deletion"`` sets the top ``k / steps`` of the pixels (all channels) to ``baseline``; of
    ``"insertion"`` it starts from an image of ``baseline`` and puts the top ``k / steps`` back. ``classify``
    maps images ``(B, C, H, W)`` to logits. A faithful attribution gives a low deletion and a high insertion
    area (:func:`curve_auc`).
    """
    if mode not in CURVE_MODES:
        raise ValueError(f"mode must be one of {CURVE_MODES}, got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    maps = _maps(attributions)
    n, _, h, w = images.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"attributions of shape {tuple(attributions.shape)} do not match images {tuple(images.shape)}")
    targets = torch.as_tensor(targets, device=images.device).long().reshape(-1)
    if targets.shape != (n,):
        raise ValueError(f"expected {n} targets, got {targets.shape[0]}")
    pixels = h * w
    order = maps.reshape(n, pixels).argsort(dim=1, descending=True, stable=True).to(images.device)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=images.device).expand(n, -1))
    counts = [min(pixels, -(-k * pixels // steps)) for k in range(steps + 1)]  # ceil(k * pixels / steps)
    curves = []
    for count in counts:
        top = (rank < count).view(n, 1, h, w)  # the first `count` pixels in the ranking
        keep = ~top if mode == "deletion" else top
        perturbed = torch.where(keep, images, torch.full_like(images, baseline))
        probs = torch.cat([classify(perturbed[i:i + batch_size]).float().softmax(1)
                           for i in range(0, n, batch_size)])
        curves.append(probs.gather(1, targets[:, None])[:, 0].cpu())
    return torch.stack(curves, 1)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """``(N,)`` area under curves ``(N, K + 1)`` sampled evenly on [0, 1] (trapezoidal rule)."""
    if not isinstance(curves, torch.Tensor) or curves.dim() != 2 or curves.shape[1] < 2:
        raise ValueError(f"expected curves of shape (N, K + 1) with K >= 1, got "
                         f"{getattr(curves, 'shape', type(curves).__name__)}")
    return torch.trapezoid(curves.double(), dx=1.0 / (curves.shape[1] - 1), dim=1)
