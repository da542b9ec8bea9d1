"""bcosify.explain: batched, every target form, exact contributions."""

from __future__ import annotations

import pytest
import timm
import torch

import bcosify
from helpers import assert_batch_matches_single


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    bmodel = bcosify.convert(timm.create_model("resnet18", pretrained=False, num_classes=6)).double()
    return bcosify.calibrate(bmodel, torch.rand(4, 3, 32, 32, dtype=torch.float64), progress=False).eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(5, 3, 32, 32, dtype=torch.float64)


def test_shapes_and_completeness(model, x):
    e = bcosify.explain(model, x)
    assert e.logits.shape == (5, 6) and e.target.shape == (5,)
    assert e.weights.shape == e.encoded.shape == (5, 6, 32, 32)
    assert e.contributions.shape == (5, 32, 32)
    assert torch.equal(e.target, e.logits.argmax(1))
    torch.testing.assert_close(e.contributions, (e.encoded * e.weights).sum(1))
    torch.testing.assert_close(e.explained_logit + e.logit_bias, e.target_logits)
    assert e.completeness_error.shape == (5,) and e.completeness_error.max() < 1e-10
    torch.testing.assert_close(e.contributions.flatten(1).sum(1), e.explained_logit, rtol=1e-10, atol=0)


def test_batch_equals_per_image(model, x):
    assert_batch_matches_single(model, x, torch.tensor([0, 5, 2, 2, 1]), ("weights", "logits"))


def test_target_forms(model, x):
    logits = bcosify.explain(model, x).logits
    as_int = bcosify.explain(model, x, 3)
    assert as_int.target.tolist() == [3] * 5
    torch.testing.assert_close(as_int.target_logits, logits[:, 3])
    per_image = torch.tensor([1, 0, 4, 5, 2])
    as_tensor = bcosify.explain(model, x, per_image)
    assert torch.equal(as_tensor.target, per_image)
    torch.testing.assert_close(as_tensor.target_logits, logits[torch.arange(5), per_image])
    scalar_tensor = bcosify.explain(model, x, torch.tensor(2))
    assert scalar_tensor.target.tolist() == [2] * 5
    # different targets give different weights for the same image
    assert not torch.allclose(as_int.weights[0], bcosify.explain(model, x[:1], 1).weights[0])


@pytest.mark.parametrize("target, error, match", [
    (6, ValueError, r"lie in \[0, 6\)"),
    (-1, ValueError, r"lie in \[0, 6\)"),
    (torch.tensor([0, 1]), ValueError, "shape"),
    (torch.tensor([0.5] * 5), ValueError, "integer tensor"),
    ("cat", TypeError, "target must be"),
    (True, TypeError, "target must be"),
])
def test_bad_targets(model, x, target, error, match):
    with pytest.raises(error, match=match):
        bcosify.explain(model, x, target)


def test_works_under_no_grad_and_restores_mode(model, x):
    model.train()
    try:
        with torch.no_grad():
            e = bcosify.explain(model, x[:2])
        assert model.training
        assert e.weights.abs().sum() > 0
    finally:
        model.eval()
    assert not any(getattr(m, "explanation_mode", False) is True for m in model.modules())


def test_float32_completeness_is_close(model, x):
    e = bcosify.explain(model.float(), x.float())
    model.double()
    assert e.weights.dtype == torch.float32
    assert e.completeness_error.max() < 1e-3


def test_explain_needs_a_bcos_model(x):
    with pytest.raises(TypeError, match="BcosModel"):
        bcosify.explain(timm.create_model("resnet18", pretrained=False), x)


# --------------------------------------------------------------------------- logit maps, chunking, slicing


@pytest.fixture(scope="module")
def reordered():
    """A GAP-reordered model (classifier as a 1x1 conv before pooling): 2x2 logit maps at 64 px."""
    torch.manual_seed(2)
    bmodel = bcosify.convert(timm.create_model("resnet18", pretrained=False, num_classes=5), gap_reorder=True)
    bmodel = bmodel.double()
    return bcosify.calibrate(bmodel, torch.rand(3, 3, 64, 64, dtype=torch.float64), progress=False).eval()


def test_logit_maps_of_a_gap_reordered_model(reordered):
    torch.manual_seed(3)
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    e = bcosify.explain(reordered, x)
    assert e.logit_maps is not None and e.logit_maps.shape == (4, 5, 2, 2)
    # the pooled maps are the logits (without the logit bias), and the maps differ between locations
    torch.testing.assert_close(e.logit_maps.mean((2, 3)) + e.logit_bias, e.logits, rtol=1e-12, atol=1e-12)
    assert (e.logit_maps.flatten(2).std(2) > 0).all()
    torch.testing.assert_close(e.target_logit_maps.mean((1, 2)), e.explained_logit, rtol=1e-12, atol=1e-12)
    assert e.completeness_error.max() < 1e-10
    assert not e.logit_maps.requires_grad


def test_logit_maps_batch_equals_per_image(reordered):
    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    assert_batch_matches_single(reordered, x, torch.tensor([4, 0]), ("logit_maps", "weights"))


def test_no_logit_maps_without_gap_reorder(model, x):
    e = bcosify.explain(model, x[:2])
    assert e.logit_maps is None and e.target_logit_maps is None


def test_batch_size_chunks_give_the_same_result(model, x):
    target = torch.tensor([0, 5, 2, 2, 1])
    whole = bcosify.explain(model, x, target)
    chunked = bcosify.explain(model, x, target, batch_size=2)
    assert torch.equal(chunked.target, target) and len(chunked) == 5
    torch.testing.assert_close(chunked.weights, whole.weights, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.completeness_error, whole.completeness_error, rtol=0, atol=1e-12)
    predicted = bcosify.explain(model, x[:3], batch_size=2)
    assert torch.equal(predicted.target, whole.logits[:3].argmax(1))
    with pytest.raises(ValueError, match="batch_size"):
        bcosify.explain(model, x, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        bcosify.explain(model, x, torch.tensor([0, 1]), batch_size=2)


def test_indexing_an_explanation(model, x):
    e = bcosify.explain(model, x)
    one = e[3]
    assert len(one) == 1 and torch.equal(one.weights[0], e.weights[3]) and one.logit_bias == e.logit_bias
    assert torch.equal(e[-1].target, e.target[-1:])
    assert torch.equal(e[1:4].contributions, e.contributions[1:4])
    with pytest.raises(IndexError):
        e[5]
    with pytest.raises(TypeError, match="index"):
        e["a"]
