"""Training data of a recipe: which dataset, how it is augmented (timm's data pipeline, images kept in [0, 1]),
and the loaders, sharded over the processes of a distributed run."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..config import Options
from ..data import DataError, PlainImageFolder, fashion_mnist, has_class_folders, image_files, image_folder

DATASETS = ("image-folder", "fashion-mnist")


@dataclass
class DataConfig(Options):
    """The ``data`` section of a recipe.

    Attributes:
        dataset: ``image-folder`` (torchvision ImageFolder layout: one sub-folder of images per class) or
            ``fashion-mnist`` (the IDX files; ``root`` defaults to the Debian package's folder).
        root, val_root: training and validation folders (image-folder); the IDX folder (fashion-mnist). A
            training folder without sub-folders is a plain folder of unlabelled images (for the label-free losses;
            ``val_root`` optional then).
        size: images are ``size x size``; channels: 1 (grey) or 3.
        batch_size: the **global** batch, split evenly over the processes of a distributed run.
        limit, val_limit: use only the first N training / validation images (fashion-mnist).
        workers: data loader worker processes per training process; ``None``: :func:`default_workers`.
        augment: training augmentation (image-folder): random resized crop and flips from
            ``timm.data.create_transform``; ``False`` resizes and centre-crops only.
        auto_augment: timm's auto-augment policy string, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment) or
            ``trivialaugment`` (TrivialAugment); ``None`` for none.
        hflip: probability of a horizontal flip; crop_scale: area range of the random resized crop.
    """

    dataset: str = "image-folder"
    root: str | None = None
    val_root: str | None = None
    size: int = 224
    channels: int = 3
    batch_size: int = 256
    limit: int | None = None
    val_limit: int | None = None
    workers: int | None = None
    augment: bool = True
    auto_augment: str | None = None
    hflip: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)

    KIND = "data"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.dataset == "fashion-mnist" and self.auto_augment:
            raise ValueError("auto_augment applies to image-folder data, not fashion-mnist")


def train_transform(config: DataConfig):
    """The training transform: timm's ``create_transform``, images left in [0, 1] (the model folds the input
    normalisation into its first layer)."""
    import timm.data
    from torchvision import transforms

    # mean 0, std 1: timm's normalize=False would return uint8 tensors (its GPU prefetcher's input)
    steps = [timm.data.create_transform(config.size, is_training=True, no_aug=not config.augment,
                                        scale=config.crop_scale, hflip=config.hflip, color_jitter=None,
                                        auto_augment=config.auto_augment, mean=(0.0,) * 3, std=(1.0,) * 3)]
    if config.channels == 1:
        steps.append(transforms.Grayscale())
    return transforms.Compose(steps)


def build_datasets(config: DataConfig) -> tuple[Dataset, Dataset | None, tuple[str, ...] | None]:
    """``(train, val, class names)`` of ``config``: images in [0, 1] with integer labels.

    An image-folder ``root`` without class sub-folders is a plain folder of images: its items are images alone
    (a :class:`~bcosify.data.PlainImageFolder`, for the label-free losses ``distill`` and ``align``), ``val_root``
    is then optional (``val`` is ``None`` without it), and the class names are the validation folder's (``None``
    without one).

    Raises:
        DataError: a folder is missing or holds no images, train and val have different class folders, or a
            validation folder has no class sub-folders.
    """
    if config.dataset == "fashion-mnist":
        kwargs: dict[str, Any] = dict(root=config.root, size=config.size, channels=config.channels)
        train = fashion_mnist("train", limit=config.limit, **kwargs)
        return train, fashion_mnist("test", limit=config.val_limit, **kwargs), train.classes
    plain = bool(config.root) and pathlib.Path(config.root).is_dir() and not has_class_folders(config.root)
    if not config.root or not (config.val_root or plain):
        raise DataError("image-folder data needs a training and a validation folder: --data DIR (with DIR/train "
                        "and DIR/val) or root and val_root in the recipe; for label-free fine-tuning the training "
                        "folder may be a plain folder of images, without validation")
    if config.val_root and pathlib.Path(config.val_root).is_dir() and not has_class_folders(config.val_root):
        raise DataError(f"the validation folder {config.val_root!r} has no class sub-folders: validation measures "
                        "accuracy and needs labels (one sub-folder of images per class)")
    val = image_folder(config.val_root, config.size, config.channels) if config.val_root else None
    if plain:
        train = PlainImageFolder(config.root, transform=train_transform(config))
        return train, val, tuple(val.classes) if val is not None else None
    train = image_folder(config.root, config.size, config.channels, transform=train_transform(config))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"the class folders of {config.root!r} and {config.val_root!r} differ: only in train "
                        f"{only_train}, only in val {only_val}")
    return train, val, tuple(train.classes)


def first_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` (its labels, if any, dropped) as one batch: calibration images."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


def per_process_batch(global_batch: int, world_size: int) -> int:
    """The batch of each of ``world_size`` processes that together make ``global_batch``."""
    if global_batch % world_size:
        raise ValueError(f"the global batch {global_batch} is not divisible by the world size {world_size}: "
                         f"choose a batch of a multiple of {world_size}, or --batch-size per process")
    return global_batch // world_size


def default_workers(cuda: bool) -> int:
    """Data loader workers of each process: none on CPU (the training shares its cores), else the CPU cores of this
    machine shared by its processes (``LOCAL_WORLD_SIZE``), at most 8."""
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))


def build_loaders(train: Dataset, val: Dataset | None, batch_size: int, *, workers: int = 0, seed: int = 0,
                  rank: int = 0, world_size: int = 1,
                  pin_memory: bool = False) -> tuple[DataLoader, DataLoader | None]:
    """Loaders of this process's share: ``batch_size`` images per process and step.

    Training batches come from a ``DistributedSampler`` (shuffled with ``seed`` and the epoch, incomplete last
    batches dropped) in every run, so that the ``world_size`` processes of one step see together exactly the
    global batch a single process would see. Validation images are split without repeats (``rank::world_size``;
    no ``val``, no validation loader).
    Worker processes draw their seeds from ``seed`` and ``rank``: reproducible, and different in every process, so
    that the processes do not augment their images alike.
    """
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise DataError(f"{len(train)} training images are fewer than one global batch of "
                        f"{batch_size * world_size}")
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    seeds = torch.Generator().manual_seed(seed + 1_000_003 * rank)  # else every process's workers alike
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True, generator=seeds, **common)
    if val is None:
        return train_loader, None
    val_share = Subset(val, range(rank, len(val), world_size)) if world_size > 1 else val
    return train_loader, DataLoader(val_share, batch_size=batch_size, **common)


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Give ``loader``'s ``DistributedSampler`` the epoch, so that every epoch is shuffled anew."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def folder_root(data: str | pathlib.Path) -> dict[str, str | None]:
    """``root``/``val_root`` options for an ImageFolder tree with ``train/`` and ``val/`` sub-folders, or for a plain
    folder of images without sub-folders (``root`` alone: label-free fine-tuning without validation)."""
    data = pathlib.Path(data)
    missing = [name for name in ("train", "val") if not (data / name).is_dir()]
    if not missing:
        return {"root": str(data / "train"), "val_root": str(data / "val")}
    if data.is_dir() and not has_class_folders(data) and image_files(data):
        return {"root": str(data), "val_root": None}
    raise DataError(f"--data {str(data)!r} must hold train/ and val/ folders (one sub-folder per class), or be a "
                    f"plain folder of images (label-free fine-tuning); missing: {', '.join(missing)}")
