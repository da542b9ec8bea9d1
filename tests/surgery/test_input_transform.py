"""torchvision GoogLeNet / Inception v3 built for torchvision's weights re-normalize their input (``transform_input``):
a fixed per-channel affine map, folded into the input normalization at conversion."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import bcosify
from bcosify.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from bcosify.errors import ConversionError
from bcosify.surgery.adapters import fold_input_transform
from bcosify.surgery.support import randomised


def _googlenet(transform_input: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=10,
                                             transform_input=transform_input)
    return randomised(model.double().eval())


def test_the_fold_is_the_map_torchvision_applies():
    model = _googlenet()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    mapped = model._transform_input(normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    mean, std = fold_input_transform(model, IMAGENET_MEAN, IMAGENET_STD)
    assert model.transform_input is False
    torch.testing.assert_close(normalize(x, mean, std), mapped, rtol=1e-12, atol=1e-12)
    assert mean + std == pytest.approx((0.5,) * 6, abs=1e-15)  # (x - 0.5) / 0.5
    assert fold_input_transform(model, IMAGENET_MEAN, IMAGENET_STD) == (IMAGENET_MEAN, IMAGENET_STD)  # now off


def test_googlenet_with_transform_input_converts_exactly(one_thread, tmp_path):
    original = _googlenet()
    bmodel = bcosify.convert(original, mean=IMAGENET_MEAN, std=IMAGENET_STD, verify=True)
    assert original.transform_input is True  # the user's model is never modified
    assert bmodel.network.transform_input is False and bmodel.config.mean == IMAGENET_MEAN  # what the original takes
    (folded,) = bmodel.report.by_action("folded")
    assert folded.path == "<model>" and "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in folded.note
    assert "not informative" not in bmodel.report.by_action("verified")[0].note
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    exact = bcosify.convert(original, mean=IMAGENET_MEAN, std=IMAGENET_STD, b=1.0, keep_bias=True, logit_bias=0.0,
                            verify=False)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), original(normalize(x, IMAGENET_MEAN, IMAGENET_STD)), rtol=1e-10,
                                   atol=1e-12)
    assert bcosify.explain(bmodel, x).completeness_error.max() < 1e-10
    bcosify.save(bmodel, tmp_path / "googlenet")
    for skeleton in (_googlenet(True), _googlenet(False)):  # the folded weights are in the file either way
        loaded = bcosify.load(tmp_path / "googlenet", model=skeleton)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), bmodel(x), rtol=1e-12, atol=1e-12)


def test_a_map_that_does_not_come_first_is_refused():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 3, 1)
            self.net = _googlenet()

        def forward(self, x):
            return self.net(self.stem(x))

    with pytest.raises(ConversionError, match=r"net \(GoogLeNet\): an input map \(transform_input\) that is not"):
        bcosify.convert(Wrapper().double(), mean=IMAGENET_MEAN, std=IMAGENET_STD)
