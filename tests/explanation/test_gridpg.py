"""bcosify.metrics: the grid pointing game for B-cos explanations and captum's post-hoc methods."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import bcosify
from bcosify.cli import main
from bcosify.data import Normalized, normalize
from bcosify.explanation import gridpg as metrics
from bcosify.surgery import Rule, register_rule

captum = pytest.importorskip("captum", reason="the post-hoc baselines need the eval extra (captum)")


class OneCellNet(nn.Module):
    """Looks only at one cell of an n x n grid: 1x1 convolutions, then the features of that cell alone."""

    def __init__(self, n: int, cell: int, num_classes: int = 4) -> None:
        super().__init__()
        self.n, self.cell = n, cell
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        h, w = y.shape[2] // self.n, y.shape[3] // self.n
        row, col = divmod(self.cell, self.n)
        y = y[:, :, row * h:(row + 1) * h, col * w:(col + 1) * w]
        return self.fc(self.pool(y).flatten(1))


register_rule(OneCellNet, Rule("descend"))  # its forward only composes its children (and crops): exact
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _positive_classes(logits: torch.Tensor) -> torch.Tensor:
    """For every row, a class with a positive logit (so that the explanation has positive attribution)."""
    assert (logits.amax(1) > 0).all()
    return logits.argmax(1)


# --------------------------------------------------------------------------- grids


def test_tile_is_row_major():
    cells = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 5)
    grid = metrics.tile(cells, 2)
    assert grid.shape == (3, 4, 10)
    assert grid[0, :2, :5].unique().tolist() == [0] and grid[0, :2, 5:].unique().tolist() == [1]
    assert grid[0, 2:, :5].unique().tolist() == [2] and grid[0, 2:, 5:].unique().tolist() == [3]


def test_make_grids_uses_distinct_classes():
    images = torch.arange(9, dtype=torch.float32).view(9, 1, 1, 1).expand(9, 3, 4, 4)
    labels = torch.tensor([5, 1, 7, 3, 0, 2, 8, 6, 4])
    grids, classes = metrics.make_grids(images, labels, 2)
    assert grids.shape == (2, 3, 8, 8) and classes.shape == (2, 4)
    assert len(set(classes.flatten().tolist())) == 8  # each image used once
    for grid, cell_classes in zip(grids, classes):
        cell_images = grid[0, ::4, ::4].flatten().long()  # image index of each cell, row-major
        assert labels[cell_images].tolist() == cell_classes.tolist()
    again = metrics.make_grids(images, labels, 2)
    assert torch.equal(again[1], classes)  # deterministic for a seed
    many, many_classes = metrics.make_grids(images, labels, 3, num_grids=5, seed=1)
    assert many.shape == (5, 3, 12, 12)
    assert all(len(set(row.tolist())) == 9 for row in many_classes)
    with pytest.raises(ValueError, match="at least 16 distinct classes"):
        metrics.make_grids(images, labels, 4)
    with pytest.raises(ValueError, match="own class"):
        metrics.make_grids(images, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7]), 2)


def test_confident_images_keeps_the_most_confident_correct_one_per_class():
    logits = torch.tensor([[5.0, 0, 0], [2.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [9.0, 0, 0], [0, 3, 3.5]])
    labels = torch.tensor([0, 0, 1, 2, 1, 2])  # image 4 is misclassified; image 5 is correct for class 2
    chosen = metrics.confident_images(lambda x: logits[x[:, 0, 0, 0].long()],
                                      torch.arange(6.0).view(6, 1, 1, 1), labels)
    assert chosen.tolist() == [0, 2, 3]  # class 2: image 3 (p=.96) beats image 5 (p=.61)
    two = metrics.confident_images(lambda x: logits[x[:, 0, 0, 0].long()], torch.arange(6.0).view(6, 1, 1, 1),
                                   labels, per_class=2)
    assert two.tolist() == [0, 1, 2, 3, 5]


# --------------------------------------------------------------------------- scores


def test_cell_scores_of_known_maps():
    maps = torch.zeros(4, 6, 6)
    maps[0, 3:, 3:] = 1.0  # everything in cell 3
    maps[1] = 1.0  # uniform
    maps[2] = -1.0  # nothing positive
    maps[3, :3, :3], maps[3, 3:, :] = 3.0, -5.0  # cell 0 positive, the rest negative (ignored)
    scores = metrics.cell_scores(maps, 2, torch.tensor([3, 1, 0, 0]))
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.25, 0.0, 1.0], dtype=torch.float64))
    assert metrics.cell_scores(maps[:1], 2, torch.tensor([2])).item() == 0
    with pytest.raises(ValueError, match="cannot be split"):
        metrics.cell_scores(torch.ones(1, 5, 6), 2, torch.tensor([0]))
    with pytest.raises(ValueError, match="cell indices"):
        metrics.cell_scores(maps, 2, torch.tensor([0, 1, 2, 4]))


def test_uniform_attribution_scores_one_over_n_squared():
    grids = torch.rand(2, 3, 24, 24)
    result = metrics.grid_pointing_game(lambda x, t: torch.ones(len(x), 24, 24), grids,
                                        torch.arange(18).view(2, 9), 3, method="uniform")
    torch.testing.assert_close(result.scores, torch.full((2, 9), 1 / 9))
    assert result.summary()["cells"] == 18 and abs(result.mean - result.chance) < 1e-7
    assert "uniform" in str(result)


@pytest.mark.parametrize("cell", [0, 3])
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_model_that_looks_at_one_cell(cell):
    """B-cos contributions and post-hoc methods: score 1 for the cell the model sees, 0 for the others."""
    torch.manual_seed(cell)
    original = OneCellNet(2, cell).eval()
    bmodel = bcosify.convert(original, mean=MEAN, std=STD).double()
    grid = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        target = _positive_classes(bmodel(grid) - bmodel.logit_bias)
    classes = target.expand(1, 4)  # explain the same (positive) class for every cell
    expected = torch.zeros(1, 4)
    expected[0, cell] = 1
    bcos = metrics.grid_pointing_game(bcosify.Attribution(bmodel), grid, classes, 2)
    torch.testing.assert_close(bcos.scores, expected)
    original.double()
    for method in ("ixg", "ig"):
        attribute = metrics.posthoc_attribution(original, method, mean=MEAN, std=STD, steps=3)
        result = metrics.grid_pointing_game(attribute, grid, classes, 2, method=method)
        torch.testing.assert_close(result.scores, expected)
    # a captum method used as it is, on the original model taking images in [0, 1]
    from captum.attr import InputXGradient

    raw = InputXGradient(Normalized(original, MEAN, STD))
    torch.testing.assert_close(metrics.grid_pointing_game(raw, grid, classes, 2).scores, expected)


def test_model_that_looks_everywhere_alike_scores_chance():
    """1x1 convolutions on a grid of identical cells: every cell gets the same attribution, 1/n^2."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(6, 4)).eval().double()
    bmodel = bcosify.convert(original, mean=MEAN, std=STD).double()
    cell = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    grid = metrics.tile(cell.expand(9, -1, -1, -1), 3)[None]
    with torch.no_grad():
        target = _positive_classes(bmodel(grid) - bmodel.logit_bias)
    result = metrics.grid_pointing_game(bcosify.Attribution(bmodel), grid, target.expand(1, 9), 3)
    torch.testing.assert_close(result.scores, torch.full((1, 9), 1 / 9))


def test_bcos_contributions_at_b1_equal_input_x_gradient_of_the_original():
    """With b=1 and biases kept the converted model is the original, and its contributions are exactly
    captum's input x gradient on the normalised input: the two implementations check each other."""
    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False, num_classes=5).eval().double()
    for m in original.modules():  # non-trivial biases and running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    bmodel = bcosify.convert(original, b=1, keep_bias=True).double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    ixg = metrics.posthoc_attribution(original, "ixg", mean=bmodel.config.mean, std=bmodel.config.std)
    torch.testing.assert_close(bcosify.Attribution(bmodel).attribute(x, target), ixg.attribute(x, target),
                               rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- post-hoc smoke run, protocol


def _tiny_cnn(num_classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)).eval()


def _separable(model: nn.Module, x: torch.Tensor, head: nn.Linear, features) -> None:
    """Set the classifier so that image k is classified as class k: its row is the image's unit feature."""
    with torch.no_grad():
        f = F.normalize(features(x), dim=1)
        head.weight.copy_(f)
        head.bias.zero_()


def test_posthoc_methods_smoke_and_protocol():
    torch.manual_seed(0)
    original = _tiny_cnn()
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]).view(4, 3, 1, 1)
    x = 0.7 * colours + 0.3 * torch.rand(4, 3, 16, 16)  # four distinct images
    _separable(original, (x - 0.5) / 0.25, original[7], original[:7])
    assert metrics.last_conv_stage(original) == "4"  # the last ReLU's output: the last spatial feature map
    labels = torch.arange(4)
    with torch.no_grad():
        assert torch.equal(original((x - 0.5) / 0.25).argmax(1), labels)
    for method in metrics.POSTHOC_METHODS:
        maps = metrics.posthoc_attribution(original, method, mean=MEAN, std=STD, steps=4).attribute(x, labels)
        assert maps.shape == ((4, 1, 16, 16) if method == "gradcam" else (4, 3, 16, 16))
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    bmodel = bcosify.convert(original, mean=MEAN, std=STD, b=1, keep_bias=True)
    results = metrics.run_gridpg(x, labels, 2, bcos_model=bmodel, original=original, ig_steps=4)
    assert list(results) == ["bcos", "ixg", "gradcam", "ig"]
    for result in results.values():
        assert result.scores.shape == (1, 4) and result.classes[0].sort().values.tolist() == [0, 1, 2, 3]
        assert (result.scores >= 0).all() and (result.scores <= 1).all() and result.scores.sum() > 0
    # b=1 with biases: the B-cos contributions are input x gradient, so the scores agree
    torch.testing.assert_close(results["bcos"].scores, results["ixg"].scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: metrics.posthoc_attribution(m, "lime", mean=MEAN, std=STD), ValueError, "unknown post-hoc"),
    (lambda m: metrics.posthoc_attribution(bcosify.convert(m, mean=MEAN, std=STD), "ixg", mean=MEAN, std=STD),
     TypeError, "original model"),
    (lambda m: metrics.posthoc_attribution(m, "gradcam", mean=MEAN, std=STD, layer="nope"), ValueError, "nope"),
    (lambda m: bcosify.Attribution(m), TypeError, "BcosModel"),
    (lambda m: metrics.run_gridpg(torch.rand(4, 3, 8, 8), torch.arange(4), 2), ValueError, "needs a bcos_model"),
    (lambda m: metrics.run_gridpg(torch.rand(4, 3, 8, 8), torch.arange(4), 2, original=m, methods=["bcos"]),
     ValueError, "needs a bcos_model"),
    (lambda m: metrics.tile(torch.rand(3, 3, 4, 4), 2), ValueError, "expected 4 images"),
    (lambda m: metrics.make_grids(torch.rand(4, 3, 4, 4), torch.rand(4), 2), ValueError, "integer labels"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(_tiny_cnn())


# --------------------------------------------------------------------------- bcosify evaluate


def test_cli_evaluate(tmp_path, capsys):
    """A spec model on an ImageFolder: B-cos (b=1, biases kept) and the three post-hoc methods."""
    from safetensors.torch import save_file

    from bcosify.data import load_image

    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / "data" / str(k)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / str(k) / "a.png")
    x = torch.stack([load_image(tmp_path / "data" / str(k) / "a.png", 32) for k in range(4)])
    torch.manual_seed(0)
    original = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
    _separable(original, normalize(x, original.pretrained_cfg["mean"], original.pretrained_cfg["std"]), original.fc,
               lambda z: original.forward_head(original.forward_features(z), pre_logits=True))
    save_file(original.state_dict(), str(tmp_path / "weights.safetensors"))
    out = tmp_path / "result.json"
    code = main(["evaluate", "timm:resnet10t", "--weights", str(tmp_path / "weights.safetensors"), "--model-kwargs",
                 '{"num_classes": 4}', "--b", "1", "--keep-bias", "--data", str(tmp_path / "data"), "--gridpg", "2",
                 "--size", "32", "--ig-steps", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "top-1 accuracy 1.000" in printed and "Grad-CAM" in printed and "integrated gradients" in printed
    result = json.loads(out.read_text())
    assert set(result["gridpg"]) == {"bcos", "ixg", "gradcam", "ig"}
    assert all(r["cells"] == 4 and 0 <= r["mean"] <= 1 for r in result["gridpg"].values())
    assert abs(result["gridpg"]["bcos"]["mean"] - result["gridpg"]["ixg"]["mean"]) < 1e-4


def test_cli_evaluate_errors(tmp_path, capsys):
    model = bcosify.convert("timm:resnet18", weights=None, model_kwargs={"num_classes": 3})
    bcosify.save(model, tmp_path / "saved")
    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cat" / "a.png")
    cases = [
        (["--data", str(tmp_path / "nowhere"), "--gridpg", "2"], "data folder not found"),
        (["--data", str(tmp_path / "data"), "--gridpg", "2", "--methods", "ixg"], "post-hoc methods run on the "
                                                                                  "original model"),
        (["--data", str(tmp_path / "data"), "--gridpg", "2"], "cannot match the 1 class folders"),
        (["--data", str(tmp_path / "data"), "--gridpg", "0"], "--gridpg must be a positive"),
    ]
    for extra, message in cases:
        assert main(["evaluate", str(tmp_path / "saved"), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
