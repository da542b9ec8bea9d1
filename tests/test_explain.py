"""bcosify.explain: batched, every target form, exact contributions."""

from __future__ import annotations

import pytest
import timm
import torch

import bcosify
from helpers import rescale_bcos_layers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    bmodel = bcosify.convert(timm.create_model("resnet18", pretrained=False, num_classes=6)).double()
    return rescale_bcos_layers(bmodel, torch.rand(4, 3, 32, 32, dtype=torch.float64)).eval()


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
    target = torch.tensor([0, 5, 2, 2, 1])
    batched = bcosify.explain(model, x, target)
    for i in range(len(x)):
        single = bcosify.explain(model, x[i:i + 1], int(target[i]))
        torch.testing.assert_close(batched.weights[i], single.weights[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(batched.logits[i], single.logits[0], rtol=1e-12, atol=1e-14)


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
