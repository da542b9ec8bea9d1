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
from bcosify.explanation.faithfulness import border_share, curve_auc, perturbation_curves, top_left_share
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
