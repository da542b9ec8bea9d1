"""The public conversion API: contract, options, errors."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import bcosify
from bcosify import BcosModel, ConversionError
from bcosify.explanation.checks import equivalence_error
from bcosify.nn import BcosConv2d, BcosLinear, DetachableModule
from bcosify.nn import ClassifierBeforePooling
from bcosify.surgery import Rule, register_rule
from bcosify.weights import build_model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=5).eval()


@pytest.fixture(scope="module")
def bresnet(resnet) -> BcosModel:
    return bcosify.convert(resnet)


def images(n=2, c=3, size=32, dtype=torch.float32):
    return torch.rand(n, c, size, size, dtype=dtype)


def test_original_model_is_not_modified(resnet):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    types_before = [type(m) for m in resnet.modules()]
    bcosify.convert(resnet, num_classes=3, gap_reorder=True)
    assert [type(m) for m in resnet.modules()] == types_before
    for k, v in resnet.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_converted_model_contract(bresnet):
    x = images()
    assert isinstance(bresnet, nn.Module)
    assert bresnet.in_chans == 3 and bresnet.num_classes == 5
    assert bresnet.logit_bias == pytest.approx(-math.log(4))
    assert torch.equal(bresnet(x), bresnet.forward_encoded(bresnet.encode(x)))
    z = bresnet.encode(x)
    assert torch.equal(z, torch.cat([x, 1 - x], 1))
    json.dumps(bresnet.config.to_dict())  # JSON-serialisable
    assert bresnet.config.b == 2.0 and bresnet.config.num_classes == 5


def test_converting_twice_is_refused(bresnet):
    with pytest.raises(ConversionError, match="already a BcosModel"):
        bcosify.convert(bresnet)
    with pytest.raises(ConversionError, match="already contains bcosify layers"):
        bcosify.convert(bresnet.network)


@pytest.mark.parametrize("bad, error, match", [
    (torch.full((1, 3, 8, 8), 1.5), ValueError, r"\[0, 1\]"),
    (torch.full((1, 3, 8, 8), -0.2), ValueError, r"\[0, 1\]"),
    (torch.rand(1, 1, 8, 8), ValueError, "expected 3 channels"),
    (torch.rand(1, 4, 8, 8), ValueError, "expected 3 channels"),
    (torch.rand(3, 8, 8), ValueError, r"shape \(N, 3, H, W\)"),
    (torch.tensor(float("nan")).expand(1, 3, 8, 8), ValueError, "NaN or inf"),
    (torch.tensor(float("inf")).expand(1, 3, 8, 8), ValueError, "NaN or inf"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ValueError, "divide by 255"),
    ([[0.5]], TypeError, "torch.Tensor"),
])
def test_bad_images_get_clear_errors(bresnet, bad, error, match):
    with pytest.raises(error, match=match):
        bresnet(bad)
    with pytest.raises(error, match=match):
        bcosify.explain(bresnet, bad)


def test_small_range_tolerance_is_accepted(bresnet):
    x = images().clamp(0, 1)
    x[0, 0, 0, 0] = 1 + 1e-6
    bresnet(x)


def test_unknown_specs_and_options():
    with pytest.raises(ValueError, match="unknown timm model"):
        bcosify.convert("timm:no_such_net", weights=None)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        bcosify.convert("torchvision:no_such_net", weights=None)
    with pytest.raises(ValueError, match="unknown model spec"):
        bcosify.convert("resnet18", weights=None)
    with pytest.raises(TypeError, match="unknown conversion options"):
        bcosify.convert("timm:resnet18", weights=None, frobnicate=True)
    with pytest.raises(TypeError, match="model must be"):
        bcosify.convert(42)
    with pytest.raises(ValueError, match="b must be"):
        bcosify.convert("timm:resnet18", weights=None, b=0.5)


def test_spec_with_local_weights_file(tmp_path, resnet):
    path = tmp_path / "ckpt.safetensors"
    save_file(resnet.state_dict(), str(path))
    bmodel = bcosify.convert("timm:resnet18", weights=path, model_kwargs={"num_classes": 5}, b=1, keep_bias=True)
    reference = bcosify.convert(resnet, b=1, keep_bias=True)
    x = images()
    torch.testing.assert_close(bmodel(x), reference(x))
    assert bmodel.config.spec == "timm:resnet18"
    with pytest.raises(TypeError, match="model specs only"):
        bcosify.convert(resnet, weights=path)


class _Scale(nn.Module):
    """A module bcosify does not know: it adds a bias of its own."""

    def forward(self, x):
        return x * 2 + 1


class _Custom(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.middle = middle
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.middle(self.conv(x)))))


def test_unknown_module_is_refused_with_path_and_type():
    model = _Custom(nn.Sequential(nn.ReLU(), _Scale()))
    register_rule(_Custom, Rule("descend"))
    with pytest.raises(ConversionError) as info:
        bcosify.convert(model, mean=0.5, std=0.25)
    assert "middle.1" in str(info.value) and "_Scale" in str(info.value)


def test_strict_false_leaves_and_reports_unknown_module():
    model = _Custom(_Scale())
    register_rule(_Custom, Rule("descend"))
    bmodel = bcosify.convert(model, mean=0.5, std=0.25, strict=False)
    left = bmodel.report.leftovers
    assert [(e.path, e.old_type.rsplit(".", 1)[-1]) for e in left] == [("middle", "_Scale")]
    assert "left" in bmodel.report.table()
    (verification,) = bmodel.report.by_action("verified")
    assert "FAILED" in verification.note and "not dynamic linear" in verification.note


def test_unregistered_custom_top_level_is_read_from_its_graph():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    bmodel = bcosify.convert(Unknown(), mean=0.5, std=0.5)
    assert [e.path for e in bmodel.report.by_action("read")] == ["<model>"]
    assert bmodel.report.by_action("verified")


def test_custom_model_needs_normalisation():
    register_rule(_Custom, Rule("descend"))
    with pytest.raises(ConversionError, match="pass mean=... and std=..."):
        bcosify.convert(_Custom(nn.Identity()))
    with pytest.raises(ConversionError, match="mean/std have 2/2 values"):
        bcosify.convert(_Custom(nn.Identity()), mean=(0.1, 0.2), std=(1, 1))
    with pytest.raises(ValueError, match="std must be positive"):
        bcosify.convert(_Custom(nn.Identity()), mean=0.1, std=0)
    with pytest.raises(ValueError, match="both mean and std"):
        bcosify.convert(_Custom(nn.Identity()), mean=0.1)


def test_input_transformed_before_first_layer_is_refused():
    class Shifted(_Custom):
        def forward(self, x):
            return super().forward(x - 0.5)

    register_rule(Shifted, Rule("descend"))
    with pytest.raises(ConversionError, match="the forward first transforms it by sub at test_api.py"):
        bcosify.convert(Shifted(nn.Identity()), mean=0.5, std=0.5)


def test_normalisation_sources():
    tv = torchvision.models.resnet18(num_classes=3)
    assert bcosify.convert(tv).config.normalization_from == "torchvision (ImageNet)"
    vit_cfg = timm.create_model("resnet18", pretrained=False, num_classes=3)
    vit_cfg.pretrained_cfg = {**vit_cfg.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    bmodel = bcosify.convert(vit_cfg)
    assert bmodel.config.mean == (0.5, 0.5, 0.5)
    assert bcosify.convert(vit_cfg, mean=(0.1, 0.2, 0.3), std=(1, 2, 3)).config.std == (1.0, 2.0, 3.0)


def test_grey_model_with_single_channel_normalisation():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1).double().eval()
    assert equivalence_error(model, images(c=1, dtype=torch.float64), mean=0.3, std=0.2) < 1e-10
    bmodel = bcosify.convert(model, mean=0.3, std=0.2)
    assert bmodel.in_chans == 1 and bmodel.config.mean == (0.3,)
    assert bmodel.network.conv1.in_channels == 2


def test_set_b_reaches_every_layer():
    bmodel = bcosify.convert(timm.create_model("resnet18", num_classes=5))
    bmodel.set_b(1.5)
    layers = [m for m in bmodel.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    assert layers and all(m.b == 1.5 for m in layers)
    assert bmodel.config.b == 1.5 and bmodel.b == 1.5
    with pytest.raises(ValueError, match="b must be"):
        bmodel.set_b(0.9)
    with pytest.raises(ValueError, match="b must be"):
        bmodel.set_b(float("nan"))


def test_b_changes_the_function(resnet):
    x = images()
    b1 = bcosify.convert(resnet, b=1).eval()
    b2 = bcosify.convert(resnet, b=2).eval()
    assert not torch.allclose(b1(x), b2(x))
    b2.set_b(1)
    torch.testing.assert_close(b1(x), b2(x))


def test_logit_bias_options(resnet):
    assert bcosify.convert(resnet, keep_bias=True).logit_bias == 0.0
    assert bcosify.convert(resnet, logit_bias=-3.0).logit_bias == -3.0
    x = images()
    m0 = bcosify.convert(resnet, logit_bias=0.0).eval()
    m3 = bcosify.convert(resnet, logit_bias=-3.0).eval()
    torch.testing.assert_close(m3(x), m0(x) - 3.0)


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18", "torchvision:efficientnet_b0",
                                  "timm:convnext_atto"])
def test_num_classes_replaces_classifier(spec):
    bmodel = bcosify.convert(spec, weights=None, num_classes=7)
    assert bmodel.num_classes == 7
    assert bmodel.eval()(images()).shape == (2, 7)
    assert bmodel.logit_bias == pytest.approx(-math.log(6))


def test_explanation_mode_context_restores(bresnet):
    flags = lambda: {m.explanation_mode for m in bresnet.modules() if isinstance(m, DetachableModule)}
    assert flags() == {False}
    with bresnet.explanation_mode():
        assert flags() == {True}
    assert flags() == {False}
    with pytest.raises(RuntimeError):
        with bresnet.explanation_mode():
            raise RuntimeError
    assert flags() == {False}


def test_maxpool_to_avgpool_option(resnet):
    kept = bcosify.convert(resnet)
    assert type(kept.network.maxpool) is nn.MaxPool2d
    swapped = bcosify.convert(resnet, maxpool_to_avgpool=True)
    assert type(swapped.network.maxpool) is nn.AvgPool2d
    assert any(e.path == "maxpool" and e.new_type.endswith("AvgPool2d") for e in swapped.report.entries)
    e = bcosify.explain(swapped.double(), images(dtype=torch.float64))
    assert e.completeness_error.max() < 1e-6


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18", "timm:efficientnet_b0",
                                  "torchvision:efficientnet_b0", "timm:densenet121", "torchvision:regnet_y_400mf"])
def test_gap_reorder_is_exact_and_complete(spec):
    torch.manual_seed(0)
    model = build_model(spec, weights=None, model_kwargs={"num_classes": 6}).double().eval()
    x = images(dtype=torch.float64)
    assert equivalence_error(model, x, gap_reorder=True) < 1e-10
    bmodel = bcosify.convert(model, gap_reorder=True)
    heads = [m for m in bmodel.modules() if isinstance(m, ClassifierBeforePooling)]
    assert len(heads) == 1 and isinstance(heads[0].classifier, BcosConv2d)
    assert bcosify.explain(bmodel, x).completeness_error.max() < 1e-6


@pytest.mark.parametrize("spec", ["timm:convnext_atto", "torchvision:vgg11"])
def test_gap_reorder_refused_when_head_is_not_pool_then_linear(spec):
    with pytest.raises(ConversionError, match="gap_reorder"):
        bcosify.convert(spec, weights=None, gap_reorder=True)


def test_report_table_is_readable(bresnet):
    table = bresnet.report.table()
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["module", "old", "type", "action"]
    assert any(line.startswith("conv1 ") and "BcosConv2d" in line and "first layer" in line for line in lines)
    assert "modules:" in lines[-1] and "replaced" in lines[-1]
    assert str(bresnet.report) == table


def test_model_returning_non_logits_is_refused():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.conv(x)

    register_rule(Features, Rule("descend"))
    with pytest.raises(ConversionError, match=r"logits of shape \(N, classes\)"):
        bcosify.convert(Features(), mean=0.5, std=0.5)


def test_unknown_but_unused_module_is_reported_not_refused():
    model = _Custom(nn.Identity())
    model.spare = _Scale()  # registered but never called
    register_rule(_Custom, Rule("descend"))
    bmodel = bcosify.convert(model, mean=0.5, std=0.5)
    assert [e.path for e in bmodel.report.by_action("unused")] == ["spare"]


def test_weight_standardised_convs_convert_exactly():
    """timm's StdConv2d / ScaledStdConv2d(Same) (BiT, NFNet): the standardised weight is baked in, first layer too."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.StdConv2d(3, 8, 3, padding=1), nn.ReLU(),
                          timm.layers.ScaledStdConv2dSame(8, 8, 3, stride=2, padding="same"), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        model[2].gain.uniform_(0.5, 1.5)
    x = images(c=3, dtype=torch.float64)
    assert equivalence_error(model, x, mean=0.5, std=0.25) < 1e-10
    bmodel = bcosify.convert(model, mean=0.5, std=0.25)
    assert [type(bmodel.network[i]).__name__ for i in (0, 2)] == ["BcosConv2d", "BcosConv2d"]
    assert bmodel.network[0].in_channels == 6 and bmodel.network[2].same_padding
    e = bcosify.explain(bcosify.calibrate(bmodel, x, progress=False), x)
    assert e.completeness_error.max().item() < 1e-10