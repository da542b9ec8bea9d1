"""Small, ImageNet-style preprocessed photo batch from scikit-image for tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PHOTO_NAMES: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Return `image` as an H x W x 3 array (grey and RGBA converted)."""
    if image.ndim == 2:
        return np.stack([image] * 3, axis=-1)
    if image.shape[-1] == 4:
        return image[..., :3]
    if image.shape[-1] == 1:
        return np.concatenate([image] * 3, axis=-1)
    return image


def _preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize short side to size/0.875, center crop `size`, as 3 x size x size in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(_to_rgb(image)))
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float().clamp(0.0, 1.0)
    x = x.permute(2, 0, 1).unsqueeze(0)
    height, width = x.shape[-2:]
    short = round(size / 0.875)  # 256 for 224, as in timm's crop_pct=0.875
    scale = short / min(height, width)
    new_h = max(short, round(height * scale))
    new_w = max(short, round(width * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    return x.squeeze(0).clamp(0.0, 1.0).contiguous()


def imagenet_photos(size: int = 224) -> tuple[list[str], torch.Tensor]:
    """Names and a float32 N x 3 x size x size batch in [0, 1] of scikit-image photos."""
    import skimage.data

    names = list(PHOTO_NAMES)
    batch = torch.stack([_preprocess(getattr(skimage.data, name)(), size) for name in names])
    return names, batch.to(torch.float32)
