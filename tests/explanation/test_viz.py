"""bcosify.viz (colour explanations, contribution maps, PNG grids) and the ``bcosify explain`` command."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bcosify
from bcosify.cli import main
from bcosify.explanation import viz


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    bmodel = bcosify.convert("timm:resnet18", weights=None, model_kwargs={"num_classes": 4})
    return bcosify.calibrate(bmodel, torch.rand(4, 3, 32, 32), progress=False).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


@pytest.fixture(scope="module")
def explanation(model, images):
    return bcosify.explain(model, images)


# --------------------------------------------------------------------------- colour explanation


def test_colour_is_the_colour_the_weights_align_with():
    # 1 x 2 image; weights on [x_r, x_g, x_b, (1-x)_r, (1-x)_g, (1-x)_b]
    weights = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 0.5],     # aligns with red, against green: colour (1, 0, .5)
                            [-1.0, 0.05, 0.0, 0.0, 0.0, 0.0]])  # w_x for red negative -> clamped to 0
    weights = weights.T.reshape(1, 6, 1, 2)
    x = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]).view(1, 3, 1, 2)
    encoded = torch.cat([x, 1 - x], 1)
    rgba = viz.color_explanation(weights, encoded, smooth=1, percentile=100)
    assert rgba.shape == (1, 4, 1, 2)
    torch.testing.assert_close(rgba[0, :3, 0, 0], torch.tensor([1.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    # second pixel: contribution -0.1 + 0.05 * 0.9 < 0, so it is transparent; the first one is opaque
    assert (weights[0, :, 0, 1] * encoded[0, :, 0, 1]).sum() < 0
    torch.testing.assert_close(rgba[0, 3, 0], torch.tensor([1.0, 0.0]))


def test_alpha_is_weight_norm_or_contribution_clipped_at_the_percentile():
    torch.manual_seed(0)
    weights = torch.rand(2, 6, 8, 8)  # non-negative weights on positive inputs: every contribution positive
    encoded = torch.cat([torch.full((2, 3, 8, 8), 0.5)] * 2, 1)
    norm = weights.norm(dim=1)
    rgba = viz.color_explanation(weights, encoded, smooth=1, percentile=100)
    torch.testing.assert_close(rgba[:, 3], norm / norm.flatten(1).amax(1).view(2, 1, 1))
    by_contribution = viz.color_explanation(weights, encoded, smooth=1, percentile=100, alpha="contribution")
    contribution = (weights * encoded).sum(1)
    torch.testing.assert_close(by_contribution[:, 3], contribution / contribution.flatten(1).amax(1).view(2, 1, 1))
    clipped = viz.color_explanation(weights, encoded, smooth=1, percentile=50)
    assert (clipped[:, 3] == 1).float().mean() >= 0.5 - 1 / 64 and clipped[:, 3].min() < 1


def test_smoothing_spreads_the_opacity():
    weights = torch.zeros(1, 6, 9, 9)
    weights[0, :3, 4, 4] = 1.0
    encoded = torch.ones(1, 6, 9, 9)
    sharp = viz.color_explanation(weights, encoded, smooth=1, percentile=100)[0, 3]
    smooth = viz.color_explanation(weights, encoded, smooth=3, percentile=100)[0, 3]
    assert (sharp > 0).sum() == 1
    assert (smooth > 0).sum() == 9 and bool((smooth[3:6, 3:6] > 0).all())


def test_color_explanation_of_a_model(explanation):
    rgba = viz.color_explanation(explanation, smooth=1)
    assert rgba.shape == (3, 4, 32, 32) and rgba.min() >= 0 and rgba.max() <= 1
    negative = explanation.contributions <= 0
    assert negative.any() and bool((rgba[:, 3][negative] == 0).all())
    assert (rgba[:, 3] == 1).any()  # the percentile maps the strongest pixels to full opacity
    on_white, on_black = viz.composite(rgba, "white"), viz.composite(rgba, "black")
    assert on_white.shape == on_black.shape == (3, 3, 32, 32)
    assert bool((on_white[0][:, negative[0]] == 1).all()) and bool((on_black[0][:, negative[0]] == 0).all())


# --------------------------------------------------------------------------- contribution map


def test_contribution_map_is_diverging_and_symmetric():
    c = torch.tensor([[[-2.0, -1.0, 0.0, 1.0, 2.0]]])
    rgb, scale = viz.contribution_map(c, percentile=100, return_scale=True)
    assert rgb.shape == (1, 3, 1, 5) and scale.tolist() == [2.0]
    red, blue = rgb[0, :, 0, 4], rgb[0, :, 0, 0]
    assert red[0] > red[2] and blue[2] > blue[0]  # positive red, negative blue
    torch.testing.assert_close(rgb[0, :, 0, 2], torch.full((3,), 247 / 255))  # zero is (near) white
    # symmetric scale: +v and -v are equally far from white
    for i, j in ((4, 0), (3, 1)):
        assert abs((1 - rgb[0, :, 0, i]).sum() - (1 - rgb[0, :, 0, j]).sum()) < 0.15
    mirrored = viz.contribution_map(-c, percentile=100)
    torch.testing.assert_close(mirrored[0, :, 0], rgb[0, :, 0].flip(-1))


# --------------------------------------------------------------------------- grids and files


def test_grid_layout(images, explanation):
    picture = viz.explanation_grid(images, explanation, class_names=["cat", "dog", "cow", "owl"],
                                   labels=["a", "b", "c"])
    assert picture.mode == "RGB"
    # 32 px images are enlarged 5x to 160 px cells; three columns, one row per image
    assert picture.width > 3 * 160 and picture.height > 3 * 160
    assert picture.width < 3 * 160 + 60 and picture.height < 3 * (160 + 50) + 40
    titles = viz.row_titles(explanation, ["cat", "dog", "cow", "owl"], ["a", "b", "c"])
    k = explanation.target[0].item()
    assert titles[0].startswith(f"a: {['cat', 'dog', 'cow', 'owl'][k]} ({k})")
    # the first image cell holds the image, pixel for pixel (nearest-neighbour enlarged 5x)
    array = np.asarray(picture)
    expected = (images[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    found = [(top, left) for top in range(80) for left in range(30)
             if np.array_equal(array[top:top + 160:5, left:left + 160:5], expected)]
    assert found, "the first image is not in the grid"
    top, left = found[0]
    assert np.array_equal(array[top:top + 160, left:left + 160], np.repeat(np.repeat(expected, 5, 0), 5, 1))


def test_save_png_without_matplotlib(images, explanation, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    path = viz.save_explanation_grid(tmp_path / "sub" / "grid.png", images, explanation)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == viz.explanation_grid(images, explanation).size
    small = viz.save_explanation_grid(tmp_path / "small.png", images, explanation, colors=64)
    with Image.open(small) as png:
        assert png.mode == "P" and len(png.getcolors(256)) <= 64
    with pytest.raises(ImportError, match="pip install"):
        viz.plot_explanations(images, explanation)


def test_matplotlib_figure(images, explanation):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional viz extra")
    import matplotlib

    matplotlib.use("Agg")
    fig = viz.plot_explanations(images[:2], explanation[:2], class_names=["cat", "dog", "cow", "owl"])
    try:
        assert len(fig.axes) == 2 * 3 + 2  # three panels per row and a colour bar per contribution map
        assert fig.axes[0].get_title(loc="left").endswith(f"logit {explanation.target_logits[0].item():.4g}")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


@pytest.mark.parametrize("call, error, match", [
    (lambda e, x: viz.color_explanation(e, percentile=0), ValueError, "percentile"),
    (lambda e, x: viz.color_explanation(e, alpha="max"), ValueError, "alpha"),
    (lambda e, x: viz.color_explanation(e, smooth=-1), ValueError, "smooth"),
    (lambda e, x: viz.color_explanation(e.weights), ValueError, "encoded"),
    (lambda e, x: viz.color_explanation(e.weights[:, :5], e.encoded[:, :5]), ValueError, "2 \\* channels"),
    (lambda e, x: viz.color_explanation("w"), TypeError, "Explanation"),
    (lambda e, x: viz.contribution_map(e.weights), ValueError, "shape"),
    (lambda e, x: viz.composite(viz.color_explanation(e), "grey"), ValueError, "background"),
    (lambda e, x: viz.explanation_grid(x[:2], e), ValueError, "do not match"),
    (lambda e, x: viz.explanation_grid(x, e, titles=["one"]), ValueError, "titles"),
    (lambda e, x: viz.save_explanation_grid("grid.jpg", x, e), ValueError, ".png"),
    (lambda e, x: viz.save_explanation_grid("grid.png", x, e, colors=1), ValueError, "colors"),
])
def test_bad_inputs(explanation, images, call, error, match):
    with pytest.raises(error, match=match):
        call(explanation, images)


# --------------------------------------------------------------------------- reading images


# --------------------------------------------------------------------------- bcosify explain


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain") / "r18"
    bcosify.save(model, folder, class_names=["cat", "dog", "cow", "owl"])
    return folder


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = folder / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_cli_explain_writes_a_grid(model, saved, photo_files, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "bcosify.cli", "explain", str(saved), *photo_files[:2],
                             "--topk", "2", "--size", "32", "--out", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "photo0.png: " in result.stdout and "wrote" in result.stdout
    with Image.open(tmp_path / "explanations.png") as png:
        one_row = viz.explanation_grid(torch.rand(1, 3, 32, 32), bcosify.explain(model, torch.rand(1, 3, 32, 32))).size
        assert png.width == one_row[0] and png.height > 3.5 * one_row[1]  # 2 images x top-2 = 4 rows


def test_cli_explain_pages_and_target(saved, photo_files, tmp_path, capsys):
    assert main(["explain", str(saved), *photo_files[:3], "--target", "3", "--rows", "2", "--size", "32",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"explanations-00{i}.png" for i in (1, 2)]
    assert out.count("owl (3)") == 3


@pytest.mark.parametrize("extra, message", [
    (["--target", "4"], "--target must lie in [0, 4)"),
    (["--topk", "5"], "--topk 5 is more than"),
    (["--weights", "x.pth"], "apply to a model spec"),
    (["--rows", "0"], "--rows must be a positive"),
])
def test_cli_explain_errors(saved, photo_files, tmp_path, capsys, extra, message):
    assert main(["explain", str(saved), photo_files[0], "--size", "32", "--out", str(tmp_path), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_explain_bad_model_and_image(saved, tmp_path, capsys):
    assert main(["explain", "resnet18", "img.png", "--out", str(tmp_path)]) == 1
    assert "saved model folder or a spec" in capsys.readouterr().err
    assert main(["explain", str(saved), str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image file not found" in err[0]
