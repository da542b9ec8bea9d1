"""Data in: datasets and image files as images in [0, 1], the input normalization constants, and
``normalize`` (the one ``(x - mean) / std``).

Fashion-MNIST from its IDX files, any image folder (with or without class sub-folders), single image files,
and scikit-image's sample photos.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .errors import BcosifyError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet input normalization
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: torch.uint8}


class DataError(BcosifyError, FileNotFoundError):
    """A dataset is missing or unreadable."""


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The array stored in an IDX file (optionally gzip-compressed), as a uint8 tensor."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{str(path)!r} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{str(path)!r} is truncated (incomplete header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(data) - header != count:
        raise DataError(f"{str(path)!r} is truncated or corrupted: {len(data) - header} bytes for shape {shape}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*shape)


def _find(root: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (root / name, root / f"{name}.gz", root / "FashionMNIST" / "raw" / name,
                      root / "FashionMNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)``, served as float ``[0, 1]`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], channels: int = 1):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if channels not in (images.shape[1], 3):
            raise ValueError(f"channels must be {images.shape[1]} or 3, got {channels}")
        self.images = images
        self.labels = labels.long()
        self.classes = classes
        self.channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.channels != image.shape[0]:
            image = image.expand(self.channels, -1, -1).contiguous()
        return image, int(self.labels[index])


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, *, size: int | None = None,
                  channels: int = 1, download: bool = False, limit: int | None = None) -> ImageTensorDataset:
    """Fashion-MNIST (28x28 grey, 10 classes) as images in [0, 1].

    Read from the IDX files under ``root`` (default: the Debian package ``dataset-fashion-mnist`` folder
    ``/usr/share/datasets/fashion-mnist``); with ``download=True`` torchvision fetches them where a network
    exists. ``size`` resizes (bilinear, antialiased); ``channels=3`` replicates the grey channel;
    ``limit`` keeps the first ``limit`` images.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = pathlib.Path(root) if root is not None else FASHION_MNIST_DIR
    image_name, label_name = _FILES[split]
    image_file, label_file = _find(root, image_name), _find(root, label_name)
    if (image_file is None or label_file is None) and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
        image_file, label_file = _find(root, image_name), _find(root, label_name)
    if image_file is None or label_file is None:
        raise DataError(
            f"Fashion-MNIST {split} files ({image_name}[.gz], {label_name}[.gz]) not found under {str(root)!r}. "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass root=FOLDER, or "
            "use download=True where a network is available.")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(f"unexpected Fashion-MNIST shapes: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = images[:, None]
    if size is not None and size != images.shape[-1]:
        images = resize_uint8(images, size)
    return ImageTensorDataset(images, labels, FASHION_MNIST_CLASSES, channels)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a uint8 batch ``(N, C, H, W)`` to ``size x size`` (bilinear, antialiased), in chunks."""
    out = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(part.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _folder_transform(size: int, channels: int):
    """Resize and centre-crop a PIL image (read as RGB) to a ``(channels, size, size)`` tensor in [0, 1]."""
    from torchvision import transforms

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    steps = [transforms.Resize(size), transforms.CenterCrop(size)]  # the loader yields RGB images
    if channels == 1:
        steps.append(transforms.Grayscale())
    return transforms.Compose(steps + [transforms.ToTensor()])


def image_folder(root: str | os.PathLike, size: int = 224, channels: int = 3, *, transform=None):
    """A ``torchvision.datasets.ImageFolder`` (one sub-folder per class) as ``size x size`` images in [0, 1].

    ``transform`` (PIL image -> tensor in [0, 1]) replaces the default resize and centre crop, e.g. for training
    augmentation.
    """
    from torchvision import datasets

    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} not found (expected one sub-folder of images per class)")
    default = _folder_transform(size, channels)
    try:
        return datasets.ImageFolder(str(root), transform=transform or default)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot use {str(root)!r} as an image folder: {e}") from None


def has_class_folders(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds sub-folders (read as class folders, as ImageFolder does) rather than being a plain
    folder of images."""
    root = pathlib.Path(root)
    return root.is_dir() and any(entry.is_dir() for entry in root.iterdir())


class PlainImageFolder(Dataset):
    """The image files of a plain folder (no class sub-folders), each read as RGB and ``transform``-ed
    (default: resized and centre-cropped to ``size x size``, ``channels`` channels, in [0, 1]).

    Items are images alone, without labels: training data for the label-free losses (``distill``, ``align``).

    Raises:
        DataError: ``root`` is missing, holds sub-folders (use :func:`image_folder`) or holds no image files.
    """

    def __init__(self, root: str | os.PathLike, size: int = 224, channels: int = 3, *, transform=None) -> None:
        self.root = pathlib.Path(root)
        if has_class_folders(self.root):
            raise DataError(f"{str(self.root)!r} holds sub-folders: read it as an image folder with classes")
        self.files = image_files(self.root)
        self.transform = transform or _folder_transform(size, channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


# --------------------------------------------------------------------------- normalization


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of an ``(N, C, H, W)`` (or ``(C, H, W)``) batch, in ``x``'s dtype.

    torchvision's ``normalize``: what the original (unconverted) model expects as input.
    """
    from torchvision.transforms.functional import normalize as tv_normalize

    return tv_normalize(x, list(mean), list(std))


class Normalized(nn.Module):
    """``model(normalize(x, mean, std))``: an original model that takes images in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x, self.mean, self.std))


# --------------------------------------------------------------------------- image files

def preprocess(image: Any, size: int = 224, *, crop_pct: float = 0.875, channels: int = 3) -> torch.Tensor:
    """A PIL image or ``(H, W[, C])`` uint8/float array as a ``(channels, size, size)`` float tensor in [0, 1].

    The short side is resized to ``size / crop_pct`` (antialiased bilinear), then the centre is cropped,
    as in the usual ImageNet evaluation.
    """
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(image, Image.Image):
        array = np.array(image.convert("RGB" if channels == 3 else "L"))
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(array)).float() / 255
    elif np.issubdtype(array.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(array)).float().clamp(0, 1)
    else:
        raise ValueError(f"expected a uint8 or float image array, got dtype {array.dtype}")
    x = x[..., :3].permute(2, 0, 1)
    if channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif channels == 1 and x.shape[0] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    h, w = x.shape[1:]
    short = round(size / crop_pct)
    scale = short / min(h, w)
    new_h, new_w = max(short, round(h * scale)), max(short, round(w * scale))
    x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0, 1).contiguous()


def augmented_views(images: torch.Tensor, crops: int = 4, *, scale: tuple[float, float] = (0.35, 1.0),
                    seed: int = 0) -> torch.Tensor:
    """``images`` ``(N, C, H, W)``, their mirror images, and ``crops`` random resized crops (mirrored at random)
    of each, all at the input size: ``(N * (2 + crops), C, H, W)`` in the value range of ``images``.

    A few photos become enough unlabelled images to calibrate a converted model on. ``scale`` bounds the area of a
    crop relative to the image; ``seed`` makes the crops reproducible.
    """
    from torchvision.transforms import v2

    generator = torch.Generator().manual_seed(seed)
    height, width = images.shape[-2:]
    views = [images, images.flip(-1)]
    for _ in range(crops):
        for image in images:
            area = height * width * torch.empty(1).uniform_(*scale, generator=generator).item()
            side_h = min(height, max(1, round(area ** 0.5)))
            side_w = min(width, max(1, round(area / side_h)))
            top = int(torch.randint(height - side_h + 1, (1,), generator=generator))
            left = int(torch.randint(width - side_w + 1, (1,), generator=generator))
            crop = v2.functional.resized_crop(image, top, left, side_h, side_w, [height, width], antialias=True)
            views.append((crop.flip(-1) if torch.rand(1, generator=generator) < 0.5 else crop)[None])
    return torch.cat(views).clamp(images.min(), images.max())


def load_image(path: str | os.PathLike, size: int = 224, *, crop_pct: float = 0.875,
               channels: int = 3) -> torch.Tensor:
    """Read an image file with Pillow and :func:`preprocess` it to ``(channels, size, size)`` in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return preprocess(image, size, crop_pct=crop_pct, channels=channels)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {str(path)!r}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise OSError(f"cannot read image {str(path)!r}: {error}") from None


#: file name endings read as images (torchvision's ImageFolder list)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(root: str | os.PathLike) -> list[pathlib.Path]:
    """Every image file under ``root``, at any depth (class sub-folders or none), in sorted order.

    Raises:
        DataError: ``root`` is not a folder, or holds no image files.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r} or its sub-folders")
    return files


def unlabelled_images(root: str | os.PathLike, size: int = 224, channels: int = 3, *,
                      limit: int | None = None) -> torch.Tensor:
    """The images under ``root`` (a class-folder tree or a plain folder; labels are not read) as one
    ``(N, channels, size, size)`` batch in [0, 1], each resized and centre-cropped (:func:`load_image`).

    ``limit`` takes at most that many files, evenly spaced in sorted order (so that every class folder of a tree
    contributes).

    Raises:
        DataError: ``root`` is missing or holds no image files.
        OSError: an image file cannot be read.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    files = image_files(root)
    if limit is not None and limit < len(files):
        files = [files[i * len(files) // limit] for i in range(limit)]
    return torch.stack([load_image(path, size, channels=channels) for path in files])


def sample_photos(size: int = 224, names: Sequence[str] = SAMPLE_PHOTOS) -> tuple[list[str], torch.Tensor]:
    """scikit-image's sample photos (``skimage.data``) as a ``(N, 3, size, size)`` batch in [0, 1]."""
    try:
        from skimage import data
    except ImportError:
        raise DataError("the sample photos need scikit-image: pip install scikit-image") from None
    return list(names), torch.stack([preprocess(getattr(data, name)(), size) for name in names])


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in the usual index order (from torchvision's weight metadata)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
