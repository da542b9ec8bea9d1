"""bcosify.Attribution: B-cos contributions in captum's shape, its convergence delta, and captum/quantus
pipelines that take it."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import bcosify
from bcosify.explanation.attribution import attribution_maps, quantus_explain

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _cnn(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)).eval()


def _images(n: int, size: int = 12, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return 0.1 + 0.8 * torch.rand(n, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> bcosify.BcosModel:
    torch.manual_seed(0)
    bmodel = bcosify.convert(_cnn(), mean=MEAN, std=STD).double()  # b=2, no biases
    return bcosify.calibrate(bmodel, _images(4, seed=7), progress=False).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return _images(4)


def test_attributions_are_per_colour_channel_and_sum_to_the_contributions(model, x):
    target = torch.tensor([0, 4, 2, 2])
    a = bcosify.Attribution(model).attribute(x, target)
    e = bcosify.explain(model, x, target)
    assert a.shape == x.shape and a.dtype == x.dtype and not a.requires_grad
    w = e.weights  # (N, 6, H, W): weights on x, then on 1 - x
    torch.testing.assert_close(a, x * w[:, :3] + (1 - x) * w[:, 3:], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.sum(1), e.contributions, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(attribution_maps(bcosify.Attribution(model), x, target), e.contributions)


@pytest.mark.parametrize("target, expected", [
    (None, None),  # the predicted class
    (3, [3, 3, 3, 3]),
    ([1, 0, 4, 2], [1, 0, 4, 2]),
    (torch.tensor([2, 2, 0, 1]), [2, 2, 0, 1]),
    (torch.tensor(4), [4, 4, 4, 4]),
    (torch.tensor([1]), [1, 1, 1, 1]),  # captum: a one-element tensor is every image's class
])
def test_targets_as_captum_takes_them(model, x, target, expected):
    with torch.no_grad():
        logits = model(x)
    classes = logits.argmax(1) if expected is None else torch.tensor(expected)
    attribution = bcosify.Attribution(model)
    a, delta = attribution.attribute(x, target, return_convergence_delta=True)
    assert torch.equal(attribution.explain(x, target).target, classes)
    torch.testing.assert_close(a, bcosify.Attribution(model).attribute(x, classes), rtol=0, atol=0)
    # the attributions add up to the logit of that class (a plain forward pass), bias excluded
    explained = logits.gather(1, classes[:, None])[:, 0] - model.logit_bias
    torch.testing.assert_close(a.flatten(1).sum(1), explained, rtol=1e-10, atol=0)
    assert delta.abs().max() < 1e-10 * explained.abs().max()


@pytest.mark.parametrize("target, error, match", [
    ((1, 2), TypeError, "tuple targets"),
    ([1, 2], ValueError, r"one class per image \(4\), got 2"),
    ([1.0, 2.0, 0.0, 1.0], TypeError, "one int class per image"),
    ([0, 1, 5, 0], ValueError, r"lie in \[0, 5\)"),
    (torch.tensor([0.5] * 4), ValueError, "integer tensor"),
    ("cat", TypeError, "target must be"),
])
def test_bad_targets(model, x, target, error, match):
    with pytest.raises(error, match=match):
        bcosify.Attribution(model).attribute(x, target)


def test_bad_inputs(model, x):
    attribution = bcosify.Attribution(model)
    with pytest.raises(ValueError, match="one input tensor, got a tuple of 2"):
        attribution.attribute((x, x))
    with pytest.raises(ValueError, match="expected 3 channels"):
        attribution.attribute(x[:, :1])
    with pytest.raises(TypeError, match="BcosModel"):
        bcosify.Attribution(_cnn())
    with pytest.raises(TypeError, match="attribution method"):
        attribution_maps("ixg", x, torch.zeros(4, dtype=torch.long))


def test_batch_equals_single_images_and_chunks(model, x):
    target = [3, 0, 1, 4]
    attribution = bcosify.Attribution(model)
    batched, delta = attribution.attribute(x, target, return_convergence_delta=True)
    for i in range(len(x)):
        single, single_delta = attribution.attribute(x[i:i + 1], target[i], return_convergence_delta=True)
        torch.testing.assert_close(single[0], batched[i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(single_delta[0], delta[i], rtol=0, atol=1e-12)
    chunked = bcosify.Attribution(model, batch_size=3).attribute(x, target)
    torch.testing.assert_close(chunked, batched, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(attribution.attribute(x, target, batch_size=1), batched, rtol=1e-12, atol=1e-14)
    as_tuple = attribution.attribute((x,), target)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], batched)


def test_delta_is_the_signed_completeness_gap_constants_included():
    """A ViT: class token and positional embedding carry part of the logit; the delta accounts for them."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=4)
    bmodel = bcosify.calibrate(bcosify.convert(vit.double().eval()), _images(2, 16, seed=3), progress=False).eval()
    x = _images(3, 16)
    attribution = bcosify.Attribution(bmodel)
    assert attribution.has_convergence_delta() and attribution.multiplies_by_inputs
    a, delta = attribution.attribute(x, 2, return_convergence_delta=True)
    e = bcosify.explain(bmodel, x, 2)
    assert (e.constant_contribution.abs() > 1e-3 * e.explained_logit.abs()).all()  # constants matter here
    scale = e.explained_logit.abs().max()
    gap = a.flatten(1).sum(1) + e.constant_contribution - e.explained_logit
    torch.testing.assert_close(delta, gap, rtol=0, atol=1e-13 * scale.item())  # summation order aside
    assert delta.abs().max() < 1e-10 * scale
    # the delta is the signed gap whose relative size is explain's completeness_error
    assert torch.equal(delta, e.completeness_gap)
    assert torch.equal(delta.abs() / e.explained_logit.abs(), e.completeness_error)
    # without the constants' share, the pixels alone would leave a large gap
    assert ((a.flatten(1).sum(1) - e.explained_logit).abs() > 1e3 * delta.abs()).all()
    # float32: a real, small gap
    _, delta32 = bcosify.Attribution(bmodel.float()).attribute(x.float(), 2, return_convergence_delta=True)
    bmodel.double()
    assert delta32.dtype == torch.float32 and delta32.abs().max() < 1e-3 * e.explained_logit.abs().max()


# --------------------------------------------------------------------------- captum and quantus pipelines


def test_captum_sensitivity_max_takes_the_attribution(model, x):
    """captum.metrics calls ``attribute`` on perturbed inputs: continuous B-cos explanations barely change
    for tiny perturbations, and change more for larger ones."""
    from captum.metrics import sensitivity_max

    attribute = bcosify.Attribution(model).attribute
    tiny = sensitivity_max(attribute, x, target=[0, 1, 2, 3], perturb_radius=1e-7, n_perturb_samples=3)
    large = sensitivity_max(attribute, x, target=[0, 1, 2, 3], perturb_radius=0.05, n_perturb_samples=3)
    assert tiny.shape == large.shape == (4,)
    assert (tiny < 1e-4).all() and (large > 10 * tiny).all()


def test_quantus_faithfulness_correlation_of_a_linear_model_is_one():
    """At b=1 without biases and ReLUs the B-cos model is linear; with mean 0 the contribution of a value is
    exactly the logit change when it is set to 0, so quantus's faithfulness correlation (baseline 0) is 1.
    Shuffled attributions, the control, are far from it."""
    quantus = pytest.importorskip("quantus")
    import numpy as np

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    bmodel = bcosify.convert(linear.eval(), b=1, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = _images(3, 8, dtype=torch.float32).numpy()
    with torch.no_grad():
        y = bmodel(torch.from_numpy(x)).argmax(1).numpy()

    def shuffled(model, inputs, targets, **kwargs):
        a = quantus_explain(model, inputs, targets, **kwargs)
        return np.random.default_rng(0).permutation(a.reshape(-1)).reshape(a.shape)

    scores = {}
    for name, explain_func in (("bcos", quantus_explain), ("shuffled", shuffled)):
        metric = quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=24, perturb_baseline=0.0, abs=False,
                                                 normalise=False, return_aggregate=False, disable_warnings=True)
        np.random.seed(0)
        scores[name] = np.asarray(metric(model=bmodel, x_batch=x, y_batch=y, explain_func=explain_func,
                                         softmax=False, device="cpu"))
    assert scores["bcos"].shape == (3,) and (scores["bcos"] > 1 - 1e-4).all()
    assert (scores["shuffled"] < 0.9).all()


def test_quantus_randomisation_test_sees_the_explanations_change():
    """quantus's model-parameter randomisation test (MPRT) explains copies of the model with its layers
    re-initialised top-down; B-cos explanations must change (Spearman similarity to the original below 1)."""
    quantus = pytest.importorskip("quantus")
    import numpy as np

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    bmodel = bcosify.convert(net.eval(), mean=MEAN, std=STD).eval()
    x = _images(3, 8, dtype=torch.float32).numpy()
    metric = quantus.MPRT(abs=False, normalise=False, disable_warnings=True)
    scores = metric(model=bmodel, x_batch=x, y_batch=np.array([0, 1, 2]), explain_func=quantus_explain,
                    device="cpu")
    assert list(scores) == ["original", "network.6", "network.2", "network.0"]  # the B-cos layers, top-down
    np.testing.assert_allclose(scores["original"], 1.0)  # the unchanged model explains itself identically
    for layer in ("network.6", "network.2", "network.0"):
        assert (np.asarray(scores[layer]) < 0.9).all(), (layer, scores[layer])
