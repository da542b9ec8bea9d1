"""Small, ImageNet-style preprocessed photo batch from scikit-image for tests."""

from __future__ import annotations

import torch

from bcosify.viz import preprocess

PHOTO_NAMES: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")


def imagenet_photos(size: int = 224) -> tuple[list[str], torch.Tensor]:
    """Names and a float32 N x 3 x size x size batch in [0, 1] of scikit-image photos."""
    import skimage.data

    names = list(PHOTO_NAMES)
    batch = torch.stack([preprocess(getattr(skimage.data, name)(), size) for name in names])
    return names, batch.to(torch.float32)
