"""Pictures of B-cos explanations: the color explanation, signed contribution maps and PNG grids.

Everything here works with Pillow alone (a torchvision dependency); :func:`plot_explanations` also
draws a matplotlib figure when matplotlib is installed (``pip install 'bcosify[viz]'``).
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .explanation import Explanation

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = [
    "color_explanation",
    "composite",
    "contribution_map",
    "explanation_grid",
    "plot_explanations",
    "row_titles",
    "save_explanation_grid",
]

DEFAULT_PERCENTILE = 99.5
# ColorBrewer RdBu, blue (negative) -> white (zero) -> red (positive)
_DIVERGING = np.array([
    (5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (247, 247, 247),
    (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31)], dtype=np.float64) / 255
_BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}
_MIN_CELL = 160


# --------------------------------------------------------------------------- explanations as arrays


def _weights_and_input(explanation: Explanation | torch.Tensor, encoded: torch.Tensor | None):
    if isinstance(explanation, Explanation):
        return explanation.weights.detach(), explanation.encoded.detach()
    if not isinstance(explanation, torch.Tensor):
        raise TypeError(f"expected an Explanation or a weight tensor, got {type(explanation).__name__}")
    if encoded is None:
        raise ValueError("pass the encoded input [x, 1 - x] with a weight tensor (or pass the Explanation)")
    weights, encoded = explanation.detach(), encoded.detach()
    if weights.dim() == 3:
        weights, encoded = weights[None], encoded[None]
    if weights.dim() != 4 or weights.shape[1] % 2 or weights.shape != encoded.shape:
        raise ValueError("expected weights and encoded input of one shape (N, 2 * channels, H, W), got "
                         f"{tuple(weights.shape)} and {tuple(encoded.shape)}")
    return weights, encoded


def _smooth_size(smooth: int | None, height: int, width: int) -> int:
    if smooth is None:  # the papers' 15 px at 224 px, scaled with the image
        smooth = round(15 * min(height, width) / 224)
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be a non-negative int or None, got {smooth!r}")
    return max(smooth, 1) | 1  # odd, so that the output keeps its size


def _check_percentile(percentile: float) -> float:
    percentile = float(percentile)
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    return percentile


def _per_image_quantile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """``(N,)`` percentile of each image's values (``(N, ...)``)."""
    flat = values.flatten(1).float()
    return torch.quantile(flat, percentile / 100, dim=1).to(values.dtype)


def color_explanation(explanation: Explanation | torch.Tensor, encoded: torch.Tensor | None = None, *,
                       smooth: int | None = None, percentile: float = DEFAULT_PERCENTILE,
                       alpha: str = "norm") -> torch.Tensor:
    """The B-cos color explanation as an ``(N, 4, H, W)`` RGBA tensor in [0, 1].

    Per pixel, the weights ``w = [w_x, w_{1-x}]`` (of an :class:`Explanation`, or a weight tensor with its
    ``encoded`` input) are scaled by their largest magnitude and made non-negative; the color is
    ``w_x / (w_x + w_{1-x})`` per channel, the color the weights align with. The opacity is the weight norm
    (``alpha="norm"``, the papers' choice) or the contribution (``alpha="contribution"``) where the
    contribution is positive, zero elsewhere, averaged over ``smooth`` pixels (default: 15 at 224 px,
    scaled with the image; 1 = none) and divided by its ``percentile`` per image, clipped to 1.
    Images with other than 3 channels are shown in grey.
    """
    weights, z = _weights_and_input(explanation, encoded)
    if alpha not in ("norm", "contribution"):
        raise ValueError(f"alpha must be 'norm' or 'contribution', got {alpha!r}")
    percentile = _check_percentile(percentile)
    channels = weights.shape[1] // 2
    kernel = _smooth_size(smooth, *weights.shape[2:])
    contributions = (z * weights).sum(1, keepdim=True)
    scaled = (weights / (weights.abs().amax(1, keepdim=True) + 1e-12)).clamp_min(0)
    color = scaled[:, :channels] / (scaled[:, :channels] + scaled[:, channels:] + 1e-12)
    if channels != 3:
        color = color.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    strength = weights.norm(dim=1, keepdim=True) if alpha == "norm" else contributions
    strength = torch.where(contributions > 0, strength, torch.zeros_like(strength))
    if kernel > 1:
        strength = F.avg_pool2d(strength, kernel, stride=1, padding=kernel // 2)
    scale = _per_image_quantile(strength, percentile).clamp_min(torch.finfo(strength.dtype).tiny)
    opacity = (strength / scale.view(-1, 1, 1, 1)).clamp(0, 1)
    return torch.cat([color, opacity], 1).clamp(0, 1)


def composite(rgba: torch.Tensor, background: str | Sequence[float] = "black") -> torch.Tensor:
    """An ``(N, 4, H, W)`` RGBA tensor laid over a plain ``background`` color: ``(N, 3, H, W)``."""
    if isinstance(background, str):
        if background not in _BACKGROUNDS:
            raise ValueError(f"background must be one of {sorted(_BACKGROUNDS)} or an RGB triple, got "
                             f"{background!r}")
        background = _BACKGROUNDS[background]
    color = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
    if color.shape != (3,):
        raise ValueError(f"background must be an RGB triple in [0, 1], got {background!r}")
    alpha = rgba[:, 3:4]
    return rgba[:, :3] * alpha + color.view(1, 3, 1, 1) * (1 - alpha)


def contribution_map(contributions: Explanation | torch.Tensor, *, percentile: float = DEFAULT_PERCENTILE,
                     return_scale: bool = False):
    """Signed per-pixel contributions as an ``(N, 3, H, W)`` RGB heat map in [0, 1].

    Diverging colors (blue negative, white zero, red positive) on a symmetric scale ``[-s, s]`` per image,
    ``s`` the ``percentile`` of the absolute contributions; with ``return_scale`` also returns ``s`` ``(N,)``.
    """
    if isinstance(contributions, Explanation):
        contributions = contributions.contributions
    if not isinstance(contributions, torch.Tensor):
        raise TypeError(f"expected an Explanation or a contribution tensor, got {type(contributions).__name__}")
    c = contributions.detach()
    if c.dim() == 2:
        c = c[None]
    if c.dim() != 3:
        raise ValueError(f"expected contributions of shape (N, H, W), got {tuple(contributions.shape)}")
    percentile = _check_percentile(percentile)
    scale = _per_image_quantile(c.abs(), percentile).clamp_min(torch.finfo(c.dtype).tiny)
    position = ((c / scale.view(-1, 1, 1)).clamp(-1, 1) + 1) / 2 * (len(_DIVERGING) - 1)
    lut = torch.as_tensor(_DIVERGING, dtype=torch.float32, device=c.device)
    low = position.floor().long().clamp(0, len(_DIVERGING) - 2)
    frac = (position - low).float().unsqueeze(-1)
    rgb = (lut[low] * (1 - frac) + lut[low + 1] * frac).permute(0, 3, 1, 2).clamp(0, 1)
    return (rgb, scale) if return_scale else rgb


# --------------------------------------------------------------------------- grids


def row_titles(explanation: Explanation, class_names: Sequence[str] | None = None,
               labels: Sequence[str] | None = None) -> list[str]:
    """One title per explained image: ``[label: ]class name (index) · logit[ · constants share]``.

    The share is the part of the explained logit that comes from constants added inside the network
    (transformers' positional embeddings and tokens), not from any pixel.
    """
    titles = []
    logits = explanation.target_logits.tolist()
    constants, explained_logits = explanation.constant_contribution.tolist(), explanation.explained_logit.tolist()
    for i, k in enumerate(explanation.target.tolist()):
        name = class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
        title = f"{name} ({k}) · logit {logits[i]:.4g}"
        constant, explained = constants[i], explained_logits[i]
        if constant != 0 and explained != 0:
            title += f" · constants {constant / explained:.0%}"
        if labels is not None:
            title = f"{labels[i]}: {title}"
        titles.append(title)
    return titles


def _to_pil(image: torch.Tensor, size: tuple[int, int], resample) -> "PILImage.Image":
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    picture = Image.fromarray(array, "RGB")
    return picture if picture.size == size else picture.resize(size, resample)


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _check_images(images: torch.Tensor, explanation: Explanation) -> torch.Tensor:
    if not isinstance(explanation, Explanation):
        raise TypeError(f"expected an Explanation, got {type(explanation).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("expected images as an (N, C, H, W) tensor in [0, 1], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if len(images) != len(explanation) or images.shape[2:] != explanation.contributions.shape[1:]:
        raise ValueError(f"images {tuple(images.shape)} do not match the explanation of {len(explanation)} "
                         f"images of size {tuple(explanation.contributions.shape[1:])}")
    return images


def explanation_grid(images: torch.Tensor, explanation: Explanation, *,
                     class_names: Sequence[str] | None = None, titles: Sequence[str] | None = None,
                     labels: Sequence[str] | None = None, smooth: int | None = None,
                     percentile: float = DEFAULT_PERCENTILE, background: str = "black",
                     cell_size: int | None = None) -> "PILImage.Image":
    """A picture with one row per image: image | color explanation | signed contribution map.

    Each row has a title (``titles``, or the class name from ``class_names`` and the logit, after the
    optional per-row ``labels``) and the contribution map's scale. Images smaller than 160 px are
    enlarged (or all are resized to ``cell_size``). Needs only Pillow.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = _check_images(images, explanation)
    if titles is not None and len(titles) != len(explanation):
        raise ValueError(f"expected {len(explanation)} titles, got {len(titles)}")
    if titles is None:
        titles = row_titles(explanation, class_names, labels)
    color = composite(color_explanation(explanation, smooth=smooth, percentile=percentile), background)
    heat, scales = contribution_map(explanation, percentile=percentile, return_scale=True)
    h, w = images.shape[2:]
    if cell_size is None:
        factor = max(1, -(-_MIN_CELL // max(h, w)))
        size = (w * factor, h * factor)
    else:
        if isinstance(cell_size, bool) or not isinstance(cell_size, int) or cell_size < 16:
            raise ValueError(f"cell_size must be an int >= 16, got {cell_size!r}")
        size = (max(1, round(w * cell_size / max(h, w))), max(1, round(h * cell_size / max(h, w))))
    small = size[0] >= 2 * w  # enlarged pixel art: keep the pixels sharp
    resample = Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR
    font = ImageFont.load_default(size=13)
    gap, margin, line = 6, 8, 18
    header = ("image", "B-cos explanation", ("contributions (red +, blue -)", "contrib. (red +, blue -)",
                                             "contributions"))
    width = margin * 2 + 3 * size[0] + 2 * gap
    row_height = 2 * line + size[1] + gap
    canvas = Image.new("RGB", (width, margin + line + len(images) * row_height + margin - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(header):
        x0 = margin + j * (size[0] + gap)
        if isinstance(text, tuple):  # the longest wording that fits the cell
            text = next((t for t in text if draw.textlength(t, font=font) <= size[0]), text[-1])
        draw.text((x0 + size[0] / 2, margin), _fit(draw, text, font, size[0]), fill=(60, 60, 60), font=font,
                  anchor="ma")
    for i in range(len(images)):
        top = margin + line + i * row_height
        title = f"{titles[i]} · contributions ±{scales[i].item():.2g}"
        draw.text((margin, top), _fit(draw, title, font, width - 2 * margin), fill=(0, 0, 0), font=font)
        y0 = top + line + 2
        for j, picture in enumerate((images[i], color[i], heat[i])):
            canvas.paste(_to_pil(picture, size, resample), (margin + j * (size[0] + gap), y0))
    return canvas


def save_explanation_grid(path: str | os.PathLike, images: torch.Tensor, explanation: Explanation, *,
                          colors: int | None = None, **kwargs: Any) -> pathlib.Path:
    """Write :func:`explanation_grid` as a PNG file (parent folders are created) and return its path.

    ``colors`` (2 to 256) writes a palette PNG with that many colors: a smaller file, e.g. for web pages.
    ``kwargs`` go to :func:`explanation_grid`.
    """
    from PIL import Image

    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the grid is written as PNG: expected a path ending in .png, got {str(path)!r}")
    if colors is not None and (isinstance(colors, bool) or not isinstance(colors, int) or not 2 <= colors <= 256):
        raise ValueError(f"colors must be an int in [2, 256] or None, got {colors!r}")
    picture = explanation_grid(images, explanation, **kwargs)
    if colors is not None:
        picture = picture.quantize(colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG", optimize=True)
    return path


def plot_explanations(images: torch.Tensor, explanation: Explanation, *,
                      class_names: Sequence[str] | None = None, titles: Sequence[str] | None = None,
                      labels: Sequence[str] | None = None, smooth: int | None = None,
                      percentile: float = DEFAULT_PERCENTILE, background: str = "black",
                      cell_inches: float = 2.4):
    """The same rows as :func:`explanation_grid` as a matplotlib figure, with a color bar per contribution map.

    Needs matplotlib (``pip install 'bcosify[viz]'``).
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        raise ImportError("plot_explanations needs matplotlib: pip install 'bcosify[viz]' (or matplotlib); "
                          "explanation_grid and save_explanation_grid work with Pillow alone") from None
    images = _check_images(images, explanation)
    if titles is None:
        titles = row_titles(explanation, class_names, labels)
    color = composite(color_explanation(explanation, smooth=smooth, percentile=percentile), background)
    _, scales = contribution_map(explanation, percentile=percentile, return_scale=True)
    cmap = LinearSegmentedColormap.from_list("bcosify_diverging", _DIVERGING)
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(3 * cell_inches + 0.6, n * (cell_inches + 0.35)), squeeze=False)
    for i in range(n):
        image = images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        axes[i, 0].imshow(image if image.shape[-1] == 3 else image[..., 0], cmap=None if image.shape[-1] == 3
                          else "gray", vmin=0, vmax=1)
        axes[i, 1].imshow(color[i].permute(1, 2, 0).cpu().numpy())
        s = scales[i].item()
        shown = axes[i, 2].imshow(explanation.contributions[i].detach().float().cpu().numpy(), cmap=cmap,
                                  vmin=-s, vmax=s)
        fig.colorbar(shown, ax=axes[i, 2], fraction=0.046, pad=0.03)
        axes[i, 0].set_title(titles[i], loc="left", fontsize=9)
        for j, name in enumerate(("image", "B-cos explanation", "contributions")):
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_xlabel(name, fontsize=8)
                axes[i, j].xaxis.set_label_position("top")
    fig.tight_layout()
    return fig


def colour_explanation(*args, **kwargs) -> torch.Tensor:
    """Deprecated name of :func:`color_explanation`."""
    warnings.warn("colour_explanation is deprecated; use color_explanation", DeprecationWarning, stacklevel=2)
    return color_explanation(*args, **kwargs)
