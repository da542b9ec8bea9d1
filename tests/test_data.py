"""Data in: Fashion-MNIST from the Debian package's IDX files, image folders, image files, and clear errors."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bcosify.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataError, augmented_views, fashion_mnist,
                          image_folder, load_image, preprocess, read_idx)


def test_real_fashion_mnist_is_read():
    train = fashion_mnist("train", limit=500)
    test = fashion_mnist("test")
    assert len(test) == 10_000 and len(train) == 500
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    assert train.classes == FASHION_MNIST_CLASSES and 0 <= y < 10
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the known balanced test split


def test_resize_and_channels():
    ds = fashion_mnist("test", size=32, channels=3, limit=8)
    x, _ = ds[3]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
    with pytest.raises(ValueError, match="channels"):
        fashion_mnist("test", channels=2, limit=8)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)


def test_truncated_and_corrupted_idx(tmp_path):
    source = FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(source.read_bytes())
    (tmp_path / "short-idx1-ubyte").write_bytes(data[:100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short-idx1-ubyte")
    (tmp_path / "garbage").write_bytes(b"\x12\x34\x56\x78 not idx")
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "garbage")
    (tmp_path / "broken.gz").write_bytes(source.read_bytes()[:50])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "broken.gz")
    # a custom root with copied files works
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_MNIST_DIR / name, tmp_path / name)
    assert len(fashion_mnist("test", root=tmp_path, limit=3)) == 3


def test_image_folder(tmp_path):
    for label, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (40 + i, 30), colour).save(tmp_path / label / f"{i}.png")
    ds = image_folder(tmp_path, size=24)
    x, y = ds[0]
    assert ds.classes == ["cats", "dogs"] and x.shape == (3, 24, 24) and 0 <= x.min() and x.max() <= 1
    assert image_folder(tmp_path, size=24, channels=1)[0][0].shape == (1, 24, 24)
    with pytest.raises(DataError, match="not found"):
        image_folder(tmp_path / "nope")


def test_preprocess_resizes_and_centre_crops(tmp_path):
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 30:50] = 255  # a white band in the middle, black left and right
    x = preprocess(array, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[:, :, 16].min() > 0.99 and x[:, :, 0].max() < 0.01
    grey = preprocess(array[..., 0], 32)
    torch.testing.assert_close(grey, x)
    Image.fromarray(array).save(tmp_path / "band.png")
    torch.testing.assert_close(load_image(tmp_path / "band.png", 32), x)
    assert load_image(tmp_path / "band.png", 32, channels=1).shape == (1, 32, 32)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(OSError, match="cannot read image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="size"):
        preprocess(array, 0)


def test_augmented_views_are_the_images_their_mirrors_and_reproducible_crops():
    x = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    views = augmented_views(x, crops=3, seed=5)
    assert views.shape == (2 * 5, 3, 16, 12)
    assert torch.equal(views[:2], x) and torch.equal(views[2:4], x.flip(-1))
    assert x.min() <= views.min() and views.max() <= x.max()
    assert not any(torch.equal(v, u) for v in views[4:] for u in views[:4])  # crops differ from the images
    assert torch.equal(augmented_views(x, crops=3, seed=5), views)
    assert not torch.equal(augmented_views(x, crops=3, seed=6), views)
