"""Localisation metrics: the grid pointing game (GridPG) for B-cos explanations and post-hoc methods.

GridPG (B-cos papers): tile ``n x n`` confidently classified images of distinct classes into one image,
explain the class of each cell in turn, and score the share of the positive attribution that falls inside
that cell. A perfect explanation scores 1; one spread evenly over the grid scores ``1 / n**2``.

Any attribution method of :mod:`~bcosify.explanation.attribution` plays: B-cos contributions
(:class:`bcosify.Attribution`) and the post-hoc baselines from captum (input x gradient, Grad-CAM, integrated
gradients; ``pip install 'bcosify[eval]'``) on the original, unconverted model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD, Normalized
from ..model import BcosModel
from .attribution import (LRP_METHOD, POSTHOC_METHODS, Attribution, Method, attribution_maps, last_conv_stage,
                          method_name, posthoc_attribution)

__all__ = [
    "POSTHOC_METHODS",
    "GridPGResult",
    "cell_scores",
    "confident_images",
    "grid_pointing_game",
    "last_conv_stage",
    "make_grids",
    "method_name",
    "posthoc_attribution",
    "run_gridpg",
    "tile",
]


@dataclass
class GridPGResult:
    """Scores of one attribution method on a set of grids.

    Attributes:
        method: name of the attribution method.
        n: grid side (``n x n`` cells).
        scores: ``(grids, n * n)`` share of positive attribution inside the explained cell (0 where an
            explanation has no positive attribution at all), cells in row-major order.
        classes: ``(grids, n * n)`` class of every cell (the class explained for that cell).
    """

    method: str
    n: int
    scores: torch.Tensor
    classes: torch.Tensor

    @property
    def mean(self) -> float:
        return self.scores.mean().item()

    @property
    def median(self) -> float:
        return self.scores.flatten().double().quantile(0.5).item()

    @property
    def std(self) -> float:
        return self.scores.std().item() if self.scores.numel() > 1 else 0.0

    @property
    def chance(self) -> float:
        """The score of an attribution spread evenly over the grid, ``1 / n**2``."""
        return 1 / self.n ** 2

    def summary(self) -> dict[str, float | int | str]:
        """Method, grid size, number of grids and cells, and mean/median/std/min/max of the scores."""
        flat = self.scores.flatten()
        return {"method": self.method, "n": self.n, "grids": int(self.scores.shape[0]), "cells": flat.numel(),
                "mean": self.mean, "median": self.median, "std": self.std, "min": flat.min().item(),
                "max": flat.max().item(), "chance": self.chance}

    def __str__(self) -> str:
        s = self.summary()
        return (f"GridPG {self.n}x{self.n} {self.method}: mean {s['mean']:.3f}, median {s['median']:.3f}, "
                f"std {s['std']:.3f} over {s['cells']} cells of {s['grids']} grids (chance {s['chance']:.3f})")


# --------------------------------------------------------------------------- grids


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the grid side n must be a positive int, got {n!r}")
    return n


def tile(images: torch.Tensor, n: int) -> torch.Tensor:
    """``n * n`` images ``(n * n, C, H, W)`` tiled row-major into one ``(C, n * H, n * W)`` image."""
    n = _check_n(n)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) != n * n:
        raise ValueError(f"expected {n * n} images of shape (C, H, W) as a ({n * n}, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    _, c, h, w = images.shape
    return images.view(n, n, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, n * h, n * w)


@torch.no_grad()
def confident_images(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor, *, per_class: int = 1, batch_size: int = 32) -> torch.Tensor:
    """Indices of the most confidently and correctly classified images, at most ``per_class`` per class.

    ``classify`` maps images ``(B, C, H, W)`` in [0, 1] to logits; confidence is the softmax probability of
    the true class. The result is ordered by class, then by falling confidence.
    """
    labels = _check_labels(images, labels)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    probs = torch.cat([classify(images[i:i + batch_size]).float().softmax(1).cpu()
                       for i in range(0, len(images), batch_size)])
    if probs.dim() != 2 or len(probs) != len(images):
        raise ValueError(f"classify must return logits of shape ({len(images)}, classes), got {tuple(probs.shape)}")
    correct = probs.argmax(1) == labels
    confidence = probs.gather(1, labels.clamp(0, probs.shape[1] - 1)[:, None])[:, 0]
    chosen = []
    for k in labels.unique().tolist():
        candidates = torch.nonzero((labels == k) & correct)[:, 0]
        order = confidence[candidates].argsort(descending=True, stable=True)
        chosen.append(candidates[order[:per_class]])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def _check_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (len(images),):
        raise ValueError(f"expected integer labels of shape ({len(images)},), got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    return labels.long().cpu()


def make_grids(images: torch.Tensor, labels: torch.Tensor, n: int, *, num_grids: int | None = None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile images of distinct classes into ``n x n`` grids.

    ``images`` ``(M, C, H, W)`` with ``labels`` ``(M,)`` (e.g. from :func:`confident_images`); every grid
    holds ``n * n`` different classes. Without ``num_grids`` the images are shuffled and used once each
    (``M // n**2`` grids, needs one image per class); with it, each grid draws its classes at random.
    Returns ``grids`` ``(G, C, n * H, n * W)`` and their cell classes ``(G, n * n)``, row-major.
    """
    n = _check_n(n)
    labels = _check_labels(images, labels)
    cells = n * n
    classes = labels.unique()
    if len(classes) < cells:
        raise ValueError(f"a {n}x{n} grid needs images of at least {cells} distinct classes, got "
                         f"{len(classes)}")
    generator = torch.Generator().manual_seed(seed)
    if num_grids is None:
        if len(classes) != len(labels):
            raise ValueError("without num_grids every image must have its own class; pass num_grids to draw "
                             "grids at random")
        order = torch.randperm(len(labels), generator=generator)
        picks = [order[g * cells:(g + 1) * cells] for g in range(len(labels) // cells)]
    else:
        if isinstance(num_grids, bool) or not isinstance(num_grids, int) or num_grids < 1:
            raise ValueError(f"num_grids must be a positive int, got {num_grids!r}")
        by_class = {k: torch.nonzero(labels == k)[:, 0] for k in classes.tolist()}
        picks = []
        for _ in range(num_grids):
            chosen = classes[torch.randperm(len(classes), generator=generator)[:cells]].tolist()
            picks.append(torch.stack([by_class[k][torch.randint(len(by_class[k]), (1,), generator=generator)][0]
                                      for k in chosen]))
    grids = torch.stack([tile(images[p], n) for p in picks])
    return grids, torch.stack([labels[p] for p in picks])


# --------------------------------------------------------------------------- scoring


def cell_scores(attributions: torch.Tensor, n: int, cells: torch.Tensor) -> torch.Tensor:
    """Share of positive attribution inside the given cell of each map.

    ``attributions`` ``(B, H, W)`` with ``H`` and ``W`` divisible by ``n``; ``cells`` ``(B,)`` row-major cell
    indices in ``[0, n * n)``. Returns ``(B,)`` scores in [0, 1] (0 for a map without positive values).
    """
    n = _check_n(n)
    if not isinstance(attributions, torch.Tensor) or attributions.dim() != 3:
        raise ValueError(f"expected attribution maps of shape (B, H, W), got "
                         f"{getattr(attributions, 'shape', type(attributions).__name__)}")
    b, h, w = attributions.shape
    if h % n or w % n:
        raise ValueError(f"attribution maps of size {h}x{w} cannot be split into a {n}x{n} grid")
    cells = torch.as_tensor(cells, device=attributions.device).long().view(-1)
    if cells.shape != (b,) or bool(((cells < 0) | (cells >= n * n)).any()):
        raise ValueError(f"expected {b} cell indices in [0, {n * n}), got {cells.tolist()}")
    positive = attributions.detach().double().clamp_min(0)
    per_cell = positive.view(b, n, h // n, n, w // n).sum((2, 4)).flatten(1)  # (B, n * n) row-major
    total = per_cell.sum(1)
    inside = per_cell.gather(1, cells[:, None])[:, 0]
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def grid_pointing_game(attribute: Method, grids: torch.Tensor, classes: torch.Tensor, n: int, *,
                       method: str = "attribution") -> GridPGResult:
    """Score the attribution method ``attribute`` on every cell of every grid (from :func:`make_grids`).

    ``attribute`` is any :class:`~bcosify.explanation.attribution.AttributionMethod` (:class:`bcosify.Attribution`,
    :func:`posthoc_attribution`, a captum method on a model that takes images in [0, 1]) or a function
    ``(images, targets) -> attributions``; attributions are summed over channels. For each grid, the ``n * n`` cell classes are explained in one batch; maps smaller than the grid
    (e.g. Grad-CAM's) are scored on their own resolution when it divides by ``n``, else upsampled.
    """
    n = _check_n(n)
    if not isinstance(grids, torch.Tensor) or grids.dim() != 4:
        raise ValueError(f"expected grids of shape (G, C, H, W), got {getattr(grids, 'shape', type(grids).__name__)}")
    classes = torch.as_tensor(classes).long()
    if classes.shape != (len(grids), n * n):
        raise ValueError(f"expected cell classes of shape ({len(grids)}, {n * n}), got {tuple(classes.shape)}")
    cells = torch.arange(n * n)
    scores = []
    for grid, targets in zip(grids, classes):
        try:
            maps = attribution_maps(attribute, grid.expand(n * n, -1, -1, -1), targets.to(grid.device))
        except ValueError as error:
            raise ValueError(f"{method}: {error}") from None
        if maps.shape[1] % n or maps.shape[2] % n:
            maps = F.interpolate(maps[:, None].float(), size=grid.shape[1:], mode="bilinear",
                                 align_corners=False)[:, 0]
        scores.append(cell_scores(maps, n, cells.to(maps.device)).cpu())
    return GridPGResult(method, n, torch.stack(scores).float(), classes.cpu())


def run_gridpg(images: torch.Tensor, labels: torch.Tensor, n: int, *, bcos_model: BcosModel | None = None,
               original: nn.Module | None = None, methods: Sequence[str] | None = None,
               num_grids: int | None = None, seed: int = 0, ig_steps: int = 20,
               gradcam_layer: str | None = None, per_class: int = 1, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, progress: bool = False) -> dict[str, GridPGResult]:
    """The whole GridPG protocol for every requested method, one :class:`GridPGResult` each.

    ``"bcos"`` explains ``bcos_model``; the post-hoc methods (:data:`POSTHOC_METHODS`) explain ``original``
    with the input normalization ``mean``/``std`` (default: that of ``bcos_model``, or ImageNet's). Each model builds its own grids from the
    images it classifies correctly and most confidently (``per_class`` per class, :func:`confident_images`),
    with the same ``seed``. ``methods`` defaults to every method whose model was given; ``"lrp"`` (zennit) runs
    only when asked for.
    """
    if bcos_model is None and original is None:
        raise ValueError("run_gridpg needs a bcos_model, an original model, or both")
    if methods is None:
        methods = (["bcos"] if bcos_model is not None else []) + (list(POSTHOC_METHODS) if original is not None else [])
    posthoc = POSTHOC_METHODS + (LRP_METHOD,)
    unknown = [m for m in methods if m not in ("bcos",) + posthoc]
    if unknown:
        raise ValueError(f"unknown GridPG methods {unknown}; expected some of {['bcos', *posthoc]}")
    if "bcos" in methods and bcos_model is None:
        raise ValueError("the 'bcos' method needs a bcos_model")
    if any(m in posthoc for m in methods) and original is None:
        raise ValueError("post-hoc methods need the original (unconverted) model")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None:
        mean = bcos_model.config.mean if bcos_model is not None else IMAGENET_MEAN
        std = bcos_model.config.std if bcos_model is not None else IMAGENET_STD
    labels = _check_labels(images, labels)
    grid_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def grids_for(key: str, classify) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in grid_sets:
            chosen = confident_images(classify, images, labels, per_class=per_class)
            grid_sets[key] = make_grids(images[chosen], labels[chosen], n, num_grids=num_grids, seed=seed)
        return grid_sets[key]

    results = {}
    iterator = methods
    if progress:
        from tqdm import tqdm

        iterator = tqdm(methods, desc="GridPG", unit="method")
    wrapped = Normalized(original, mean, std) if original is not None else None
    for method in iterator:
        if method == "bcos":
            bcos_model.eval()
            grids, classes = grids_for("bcos", bcos_model)
            attribute = Attribution(bcos_model)
        else:
            original.eval()
            grids, classes = grids_for("original", wrapped)
            attribute = posthoc_attribution(original, method, mean=mean, std=std, steps=ig_steps,
                                            layer=gradcam_layer, internal_batch_size=4 * n * n)
        results[method] = grid_pointing_game(attribute, grids, classes, n, method=method_name(method))
    return results
