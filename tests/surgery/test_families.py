"""Equivalence (b=1, biases kept) and completeness (b=2, no biases) for every claimed family, in float64."""

from __future__ import annotations

import pytest
import timm.layers
import torch
from torch import nn

import bcosify
from bcosify import SupportedModel as Family
from bcosify.explanation.checks import equivalence_error
from helpers import randomise_dau_layers, randomise_zero_weights, value_path_modules

#: the alignment units every family converts to. DAU layers with rank 1: B holds rank x the weights (VGG's
#: classifier alone has 103M), and ranks > 1 are tested on small layers (tests/nn/test_dau.py) and networks
#: (tests/test_coda.py, tests/test_config.py, tests/export)
UNITS = {"bcos": {}, "dau": {"unit": "dau", "rank": 1}}
UNCONVERTED_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, timm.layers.BatchNormAct2d)


def _original(family: Family) -> nn.Module:
    torch.manual_seed(0)
    return randomise_zero_weights(
        family.build(num_classes=10).double().eval())


def _images(family: Family, n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, family.size, family.size, dtype=torch.float64)


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", bcosify.list_supported(), ids=lambda f: f.id)
def test_equivalence_at_b1_with_biases(family: Family, unit: str):
    """B-cos at b=1 and DAU layers as converted (static) compute the original logits."""
    error = equivalence_error(_original(family), _images(family), **UNITS[unit])
    assert error < 1e-10  # DESIGN.md asks < 1e-5; float64 surgery is exact to rounding


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", bcosify.list_supported(), ids=lambda f: f.id)
def test_completeness_after_conversion(family: Family, unit: str):
    """B-cos at b=2, DAU layers with a random dynamic part; no biases."""
    original = _original(family)
    bmodel = bcosify.convert(original, **UNITS[unit])
    assert bmodel.logit_bias == pytest.approx(-torch.log(torch.tensor(9.0)).item())
    x = _images(family, n=3)
    calibration = torch.rand(4, 3, family.size, family.size, dtype=torch.float64)
    if unit == "bcos":
        assert bmodel.b == 2.0
        bcosify.calibrate(bmodel, calibration, progress=False)
    else:
        with torch.no_grad():
            static = bmodel(x)
        randomise_dau_layers(bmodel, calibration)
        with torch.no_grad():
            change = ((bmodel(x) - static).norm() / (static - bmodel.logit_bias).norm()).item()
        assert change > 1e-3, f"the dynamic part barely changes the logits ({change:.1e}): the test would be weak"
    e = bcosify.explain(bmodel, x)
    # explanation mode changes gradients only, never the forward value (up to rounding: a gated activation rounds
    # differently (1e-16) in explanation mode, which the randomised, uncalibrated DAU networks amplify to up to 2e-5;
    # the DAU layers themselves compute the same value in both modes, tests/nn/test_dau.py)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, bmodel(x), rtol=1e-10 if unit == "bcos" else 1e-4, atol=0)
    explained = e.explained_logit
    assert bool((explained.abs() > 0).all()), "degenerate logits: completeness would be vacuous"
    assert e.completeness_error.max().item() < 1e-6
    total = e.contributions.flatten(1).sum(1) + e.constant_contribution
    torch.testing.assert_close(total, explained, rtol=1e-6, atol=0)


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", bcosify.list_supported(), ids=lambda f: f.id)
def test_report_has_no_leftovers_and_value_path_is_bias_free(family: Family, unit: str):
    bmodel = bcosify.convert(_original(family), **UNITS[unit])
    assert bmodel.report.leftovers == []
    assert bmodel.report.by_action("replaced"), "nothing was replaced"
    gate_paths = [e.path for e in bmodel.report.by_action("gated")]  # gate branches read from graphs stay as they are
    for path, module in value_path_modules(bmodel.network):
        if any(path == g or path.startswith(g + ".") for g in gate_paths):
            continue
        assert type(module) not in UNCONVERTED_TYPES, f"{path} ({type(module).__name__}) left unconverted"
        for name, _ in module.named_parameters(recurse=False):
            assert name != "bias", f"{path} keeps a bias on the value path"


@pytest.mark.parametrize("family", bcosify.list_supported("torchvision:swin*"), ids=lambda f: f.id)
def test_torchvision_swin_with_random_biases_and_odd_sizes(family: Family):
    """torchvision's Swin initialises every linear bias to zero; with random biases (V2's key bias too, which its
    forward zeroes) and a feature map that needs padding and shifted-window masks at every stage, the converted
    attention still computes the original (b=1, biases kept), and b=2 is complete."""
    original = _original(family)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in original.named_parameters():
            if name.endswith("bias") or name.endswith("logit_scale"):
                param.add_(torch.randn_like(param) * 0.5)
    x = torch.rand(2, 3, 44, 36, dtype=torch.float64)  # 11 x 9 patches: padded to 12 x 9, then 6 x 5 -> 6 x 6
    assert equivalence_error(original, x) < 1e-10
    bmodel = bcosify.calibrate(bcosify.convert(original), torch.rand(4, 3, 44, 36, dtype=torch.float64),
                               progress=False)
    e = bcosify.explain(bmodel, x)
    assert bool((e.explained_logit.abs() > 1e-3).all())
    assert e.completeness_error.max().item() < 1e-6
