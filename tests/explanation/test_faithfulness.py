"""Faithfulness metrics: the border share, deletion/insertion curves (checked against quantus' PixelFlipping),
LRP through zennit, and the padding option that removes the border signal (completeness, save/load)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import bcosify
from bcosify.explanation.attribution import posthoc_attribution
from bcosify.explanation.faithfulness import (border_share, curve_auc, foreground_share, perturbation_curves,
                                           top_left_share)
from bcosify.explanation.gridpg import run_gridpg
from bcosify.nn import BcosConv2d


def _classifier(seed: int = 0, size: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * size * size, 5)).double().eval()


def _images(n: int, size: int = 8, seed: int = 1) -> torch.Tensor:
    x = torch.rand(n, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x[:, :, 0, 0] = 0  # quantus' "black" baseline is each image's minimum: make it 0 as ours
    return x


# --------------------------------------------------------------------------- border share


def test_border_share_of_known_maps():
    maps = torch.zeros(3, 8, 8)
    maps[0, 0, 3] = 2.0  # all positive mass on the border
    maps[0, 4, 4] = -5.0  # negative mass does not count
    maps[1] = 1.0  # spread evenly: the border's share of the area
    share = border_share(maps, width=2)
    assert share[0] == 1.0 and share[2] == 0.0  # an empty map scores 0
    assert share[1].item() == pytest.approx(1 - 16 / 64)
    assert border_share(maps[:, None].expand(3, 2, 8, 8), width=1)[1].item() == pytest.approx(1 - 36 / 64)
    with pytest.raises(ValueError, match="no interior"):
        border_share(maps, width=4)
    with pytest.raises(ValueError, match="width"):
        border_share(maps, width=0)
    corner = top_left_share(maps, size=2)
    assert corner[0] == 0.0 and corner[2] == 0.0 and corner[1].item() == pytest.approx(4 / 64)
    maps[0, 1, 1] = 6.0
    assert top_left_share(maps, size=2)[0].item() == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="size"):
        top_left_share(maps, size=9)
    images = torch.zeros(3, 1, 8, 8)
    images[:, :, 4:, 4:] = 0.5  # the object: the bottom-right quarter
    on = foreground_share(maps, images, threshold=0.05)
    assert on[0].item() == 0.0 and on[2].item() == 0.0 and on[1].item() == pytest.approx(16 / 64)
    maps[0, 5, 5] = 2.0
    assert foreground_share(maps, images)[0].item() == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="do not match"):
        foreground_share(maps, images[:2])


# --------------------------------------------------------------------------- deletion / insertion


def test_deletion_curve_matches_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    model, x = _classifier(), _images(3)
    targets = torch.tensor([0, 3, 4])
    attributions = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = perturbation_curves(model, x, targets, attributions, mode="deletion", steps=4)
    metric = quantus.PixelFlipping(features_in_step=16, perturb_baseline="black", abs=False, normalise=False,
                                   disable_warnings=True)
    theirs = metric(model=model.float(), x_batch=x.float().numpy(), y_batch=targets.numpy(),
                    a_batch=attributions.float().numpy(), channel_first=True, device="cpu")
    model.double()
    with torch.no_grad():
        unperturbed = model(x).softmax(1)[range(3), targets]
    np.testing.assert_allclose(ours[:, 0].numpy(), unperturbed.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours[:, 1:].numpy(), np.asarray(theirs), rtol=1e-4, atol=1e-6)
    # the AUC is quantus' trapezoid (dx=1 over the perturbed points) rescaled to [0, 1] with the first point
    auc = curve_auc(ours)
    expected = np.trapezoid(np.concatenate([unperturbed.numpy()[:, None], np.asarray(theirs)], 1), axis=1) / 4
    np.testing.assert_allclose(auc.numpy(), expected, rtol=1e-4)


def test_insertion_is_deletion_of_the_reversed_ranking():
    model, x = _classifier(1), _images(2, seed=3)
    targets = torch.tensor([1, 2])
    a = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    insertion = perturbation_curves(model, x, targets, a, mode="insertion", steps=8)
    deletion = perturbation_curves(model, x, targets, -a, mode="deletion", steps=8)
    torch.testing.assert_close(insertion, deletion.flip(1))
    with torch.no_grad():
        torch.testing.assert_close(insertion[:, -1], model(x).float().softmax(1)[range(2), targets])
        blank = model(torch.zeros_like(x)).float().softmax(1)[range(2), targets]
    torch.testing.assert_close(insertion[:, 0], blank)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curves(model, x, targets, a, mode="flip")
    with pytest.raises(ValueError, match="do not match"):
        perturbation_curves(model, x, targets, a[:, :, :4])


def test_deletion_of_the_evidence_ranks_a_faithful_map_first():
    """On a linear model, deleting pixels by their exact contribution drops the score faster than at random."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False)).double().eval()
    x = _images(4, seed=5)
    exact = x * model[1].weight[0].view(1, 1, 8, 8).detach()
    random = torch.randn_like(x)
    good = curve_auc(perturbation_curves(model, x, torch.zeros(4), exact, steps=8))
    bad = curve_auc(perturbation_curves(model, x, torch.zeros(4), random, steps=8))
    assert bool((good < bad).all())


# --------------------------------------------------------------------------- LRP (zennit)


def test_lrp_conserves_the_unit_relevance_of_the_target():
    pytest.importorskip("zennit")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 3, bias=False)).eval()
    x = torch.rand(2, 1, 8, 8)
    lrp = posthoc_attribution(model, "lrp", mean=[0.5], std=[0.25])
    relevance = lrp.attribute(x, target=torch.tensor([2, 0]))
    assert relevance.shape == x.shape
    # bias-free layers and exact rules (flat, epsilon with a tiny epsilon) conserve the unit start relevance
    torch.testing.assert_close(relevance.sum((1, 2, 3)), torch.ones(2), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(lrp.attribute(x, target=0), lrp.attribute(x, target=2))
    with torch.no_grad():
        predicted = model((x - 0.5) / 0.25).argmax(1)
    torch.testing.assert_close(lrp.attribute(x), lrp.attribute(x, target=predicted))  # None: the predicted class


def test_run_gridpg_takes_lrp_and_several_images_per_class():
    pytest.importorskip("zennit")
    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=4).eval()
    images = torch.rand(12, 1, 16, 16)
    with torch.no_grad():
        labels = bcosify.data.Normalized(original, [0.5], [0.25])(images).argmax(1)  # all correct
    results = run_gridpg(images, labels, 1, original=original, methods=["lrp"], num_grids=5, per_class=12,
                         mean=[0.5], std=[0.25])
    assert results["lrp"].scores.shape == (5, 1) and results["lrp"].method.startswith("LRP")
    assert bool((results["lrp"].scores <= 1).all())
    with pytest.raises(ValueError, match="unknown GridPG methods"):
        run_gridpg(images, labels, 1, original=original, methods=["lrp-z"])


# --------------------------------------------------------------------------- padding_mode


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()


@pytest.mark.parametrize("mode,layers", [("replicate", "first"), ("reflect", "first"), ("replicate", "all")])
def test_padding_mode_keeps_completeness_exact(mode, layers):
    bmodel = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode=mode, padding_layers=layers).double()
    convs = [m for m in bmodel.modules() if isinstance(m, BcosConv2d)]
    padded = [m for m in convs if m.padding_mode == mode]
    assert len(padded) == (1 if layers == "first" else len(convs)) and padded[0] is convs[0]
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = bcosify.explain(bmodel, x, target=torch.tensor([0, 5, 9]))
    assert e.completeness_error.max().item() < 1e-10
    zeros = bcosify.convert(_resnet(), mean=[0.3], std=[0.35]).double().eval()
    with torch.no_grad():  # a different function (an option, not a default); logits without the logit bias
        raw, raw_zeros = bmodel.eval().network(bmodel.encode(x)), zeros.network(zeros.encode(x))
    assert not torch.allclose(raw, raw_zeros, rtol=1e-3, atol=0)


def test_replicate_padding_removes_the_border_signal_of_a_uniform_image():
    """On a black image, the zero-padded first layer sees an edge at the border; replicate padding sees none."""
    x = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    outputs = {}
    for mode in ("zeros", "replicate"):
        bmodel = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode=mode).double().eval()
        first = bmodel.network.conv1
        with torch.no_grad():
            outputs[mode] = first(bmodel.encode(x))
    for mode, out in outputs.items():
        spread = (out - out[..., 8:9, 8:9]).abs().amax().item()  # every position vs an interior one
        assert (spread < 1e-12) == (mode == "replicate"), mode
    torch.testing.assert_close(outputs["zeros"][..., 2:-2, 2:-2], outputs["replicate"][..., 2:-2, 2:-2])


def test_padding_mode_survives_save_and_load(tmp_path):
    bmodel = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode="replicate", padding_layers="all")
    bcosify.save(bmodel, tmp_path / "m")
    loaded = bcosify.load(tmp_path / "m")
    assert loaded.config.padding_mode == "replicate" and loaded.config.padding_layers == "all"
    assert all(m.padding_mode == "replicate" for m in loaded.modules() if isinstance(m, BcosConv2d))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), bmodel.eval()(x))


def _with_random_statistics(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_constant_padding_with_the_mean_colour_is_the_original_at_b1():
    """Zero padding of normalized images is the mean colour: padding [x, 1 - x] with it keeps b=1 exact."""
    original = _with_random_statistics(_resnet().double())
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = original(bcosify.data.normalize(x, [0.3], [0.35]))
        for value, exact in ((None, True), ((0.0,), False)):
            bmodel = bcosify.convert(original, b=1, keep_bias=True, mean=[0.3], std=[0.35], padding_mode="constant",
                                     padding_value=value).eval()
            assert bmodel.config.padding_value == ((0.3,) if value is None else value)  # resolved at conversion
            error = ((bmodel(x) - reference).norm() / reference.norm()).item()
            assert (error < 1e-12) == exact, (value, error)


@pytest.mark.parametrize("value", [None, (0.0,)])
def test_constant_padding_is_explained_as_a_constant(value):
    bmodel = bcosify.convert(_with_random_statistics(_resnet()), mean=[0.3], std=[0.35], padding_mode="constant",
                             padding_value=value).double()
    first = bmodel.network.conv1
    colour = 0.3 if value is None else 0.0
    assert bmodel.constants == ["conv1.padding_value"] and not first.padding_value.requires_grad
    torch.testing.assert_close(first.padding_value.flatten(), torch.tensor([colour, 1 - colour], dtype=torch.float64))
    with torch.no_grad():  # as after fine-tuning (folded weights give the mean colour's taps exactly 0)
        first.weight.add_(0.1 * torch.randn(first.weight.shape, generator=torch.Generator().manual_seed(3),
                                            dtype=torch.float64))
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    e = bcosify.explain(bmodel, x, target=torch.tensor([0, 5, 9]))
    assert e.completeness_error.max().item() < 1e-10
    # the padding's share: the same model with the colour's taps zeroed misses exactly that much
    assert (e.constant_contribution.abs() > 1e-6 * e.explained_logit.abs()).all()
    with torch.no_grad():
        first.padding_value.zero_()
        without = bmodel.network(bmodel.encode(x)).gather(1, e.target[:, None])[:, 0]
    assert not torch.allclose(without, e.explained_logit)


def test_constant_padding_of_the_background_removes_the_border_edge_and_is_saved(tmp_path):
    bmodel = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode="constant", padding_value=[0.0]).eval()
    with torch.no_grad():  # a black image padded with black: every position of the first layer sees the same
        out = bmodel.double().network.conv1(bmodel.encode(torch.zeros(1, 1, 32, 32, dtype=torch.float64)))
    assert (out - out[..., 8:9, 8:9]).abs().amax().item() < 1e-12
    bcosify.save(bmodel.float(), tmp_path / "m")
    loaded = bcosify.load(tmp_path / "m")
    assert loaded.config.padding_mode == "constant" and loaded.config.padding_value == (0.0,)
    assert loaded.constants == ["conv1.padding_value"]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), bmodel(x))
    torch.testing.assert_close(bcosify.explain(loaded, x).contributions, bcosify.explain(bmodel, x).contributions)


def test_constant_padding_options_are_checked():
    with pytest.raises(ValueError, match="padding_value applies to padding_mode='constant' only"):
        bcosify.BcosConfig(padding_value=[0.0])
    with pytest.raises(ValueError, match=r"colour in \[0, 1\]"):
        bcosify.BcosConfig(padding_mode="constant", padding_value=[1.5])
    with pytest.raises(ValueError, match="padding_layers='first' only"):
        bcosify.BcosConfig(padding_mode="constant", padding_layers="all")
    with pytest.raises(bcosify.ConversionError, match="padding_value has 2 values but the model takes 1 channels"):
        bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode="constant", padding_value=[0.0, 0.5])
    with pytest.raises(ValueError, match="needs a value per input channel"):
        BcosConv2d(2, 4, 3, padding=1).set_padding("constant")


def _top_left_quadrant_share(bmodel, x) -> float:
    """Share of ``|W(x)|`` (both halves of ``[x, 1 - x]``, summed over images) in the top-left quarter."""
    w = bcosify.explain(bmodel, x).weights.abs().sum((0, 1))
    h = w.shape[0] // 2
    return (w[:h, :h].sum() / w.sum()).item()


def test_center_grid_shifts_the_last_downsampling_and_centres_what_the_model_sees():
    original = _with_random_statistics(_resnet().double())
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    plain = bcosify.convert(original, b=1, mean=[0.3], std=[0.35]).double()
    centred = bcosify.convert(original, b=1, mean=[0.3], std=[0.35], center_grid=True).double()
    shifted = [e.path for e in centred.report.by_action("shifted")]
    assert shifted == ["layer4.0.conv1", "layer4.0.downsample.0"]
    assert centred.network.layer4[0].conv1.grid_shift == 1 and plain.network.layer4[0].conv1.grid_shift == 0
    # at 32 px the last grid is one position: on the top-left pixel, or (shifted) on pixel 16
    assert _top_left_quadrant_share(plain, x) > 0.9
    assert 0.15 < _top_left_quadrant_share(centred, x) < 0.35
    b2 = bcosify.convert(original, mean=[0.3], std=[0.35], center_grid=True, verify=True).double()
    assert bcosify.explain(b2, x).completeness_error.max().item() < 1e-10
    with torch.no_grad():  # a different function: an option, fine-tuned after
        assert not torch.allclose(centred.eval()(x), plain.eval()(x))
    with pytest.raises(ValueError, match="a B-cos option that unit='dau' does not have"):
        bcosify.BcosConfig(unit="dau", center_grid=True)
    training = bcosify.convert(original.train(), mean=[0.3], std=[0.35], center_grid=True)  # finding the layers
    assert training.training  # runs the network once, in eval mode: no BatchNorm statistics change
    torch.testing.assert_close(training.network.bn1.running_var, plain.network.bn1.running_var, rtol=0, atol=0)


def test_center_grid_refuses_what_it_cannot_shift():
    with pytest.raises(bcosify.ConversionError, match="needs a network that downsamples with strided convolutions"):
        bcosify.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(4, 3)), mean=[0.5], std=[0.5], center_grid=True)
    pooled_last = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.AvgPool2d(3, stride=2, padding=1),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(bcosify.ConversionError, match=r"center_grid=True shifts the last downsampling, and 1 "):
        bcosify.convert(pooled_last, mean=[0.5], std=[0.5], center_grid=True)
    # "auto" (what the recipes use, so that they run with any --model): left as is, and said in the report
    left = bcosify.convert(pooled_last, mean=[0.5], std=[0.5], center_grid="auto")
    assert not left.report.by_action("shifted")
    assert [e.path for e in left.report.entries if "center_grid='auto': grid left as is" in e.note] == ["1"]
    shifted = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], center_grid="auto")
    assert [e.path for e in shifted.report.by_action("shifted")] == ["layer4.0.conv1", "layer4.0.downsample.0"]
    with pytest.raises(ValueError, match="center_grid must be one of"):
        bcosify.BcosConfig(center_grid="yes")


def test_padding_options_are_checked():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        bcosify.BcosConfig(padding_mode="circular")
    with pytest.raises(ValueError, match="padding_layers must be one of"):
        bcosify.BcosConfig(padding_layers="last")
    bmodel = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode="reflect", padding_layers="all")
    with pytest.raises(ValueError, match="use padding_mode='replicate'"):
        bmodel(torch.rand(1, 1, 32, 32))  # the last stage's maps are 1x1: nothing to mirror
    # verification compares the surgery with the original, so it uses zero padding and still passes
    checked = bcosify.convert(_resnet(), mean=[0.3], std=[0.35], padding_mode="replicate", verify=True)
    assert checked.config.padding_mode == "replicate"
