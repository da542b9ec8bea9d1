"""The real ImageNet EfficientNet-Lite0 checkpoint, converted in one call, keeps its predictions."""

from __future__ import annotations

import torch

import bcosify
from bcosify.data import sample_photos as imagenet_photos
from bcosify.data import normalize
from bcosify.demo import efficientnet_lite0_checkpoint_path
from bcosify.weights import build_model


def test_b1_with_biases_reproduces_top5_on_photos():
    path = efficientnet_lite0_checkpoint_path()
    original = build_model("timm:efficientnet_lite0", weights=path, key_map="positional").eval()
    bmodel = bcosify.convert("timm:efficientnet_lite0", weights=path, key_map="positional", b=1, keep_bias=True)
    assert not bmodel.training
    names, x = imagenet_photos(224)
    with torch.no_grad():
        reference = original(normalize(x, bmodel.config.mean, bmodel.config.std))
        converted = bmodel(x)
    assert torch.equal(reference.topk(5).indices, converted.topk(5).indices), names
    torch.testing.assert_close(converted, reference, rtol=1e-4, atol=1e-4)
    # and the predictions are the sensible ones the checkpoint is known for
    top1 = dict(zip(names, reference.argmax(1).tolist()))
    assert 281 <= top1["chelsea"] <= 285  # a cat
    assert top1["coffee"] == 967  # espresso


def test_b2_conversion_of_real_checkpoint_is_complete():
    path = efficientnet_lite0_checkpoint_path()
    bmodel = bcosify.convert("timm:efficientnet_lite0", weights=path, key_map="positional")
    _, x = imagenet_photos(224)
    e = bcosify.explain(bmodel.double(), x[:2].double())
    assert bool((e.explained_logit.abs() > 0).all())
    assert e.completeness_error.max().item() < 1e-6
