"""timm's norm(+act) layers inside a plain model: exact at b=1, complete at b=2."""

from __future__ import annotations

import pytest
import timm.layers as tl
import torch
from torch import nn

import bcosify
from bcosify.explanation.checks import equivalence_error
from helpers import value_path_modules


def _randomise_affine(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and p.dim() == 1:
                    p.uniform_(0.5, 1.5) if name == "weight" else p.uniform_(-0.3, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _model(norm: nn.Module, channels_last: bool = False) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 8, 3, padding=1, groups=2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return _randomise_affine(nn.Sequential(*layers)).double().eval()


NORMS = {
    "BatchNormAct2d": lambda: tl.BatchNormAct2d(8, act_layer=nn.SiLU),
    "GroupNormAct": lambda: tl.GroupNormAct(8, num_groups=4, act_layer=nn.GELU),
    "GroupNorm1Act": lambda: tl.GroupNorm1Act(8, act_layer=nn.ReLU),
    "LayerNormAct2d": lambda: tl.LayerNormAct2d(8, act_layer=nn.Hardswish),
    "GroupNorm": lambda: tl.GroupNorm(8, num_groups=4),
    "GroupNorm1": lambda: tl.GroupNorm1(8),
    "nn.GroupNorm": lambda: nn.GroupNorm(2, 8),
    "LayerNorm2d": lambda: tl.LayerNorm2d(8),
    "BatchNorm2d": lambda: nn.BatchNorm2d(8),
}


@pytest.mark.parametrize("name", NORMS)
def test_norm_layer_equivalence_and_completeness(name):
    torch.manual_seed(0)
    model = _model(NORMS[name]())
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    assert equivalence_error(model, x, mean=0.4, std=0.3) < 1e-10
    bmodel = bcosify.calibrate(bcosify.convert(model, mean=0.4, std=0.3), x, progress=False)
    assert bmodel.report.leftovers == []
    for path, module in value_path_modules(bmodel.network):
        assert not any(n == "bias" for n, _ in module.named_parameters(recurse=False)), path
    e = bcosify.explain(bmodel, x)
    assert bool((e.explained_logit.abs() > 1e-6).all())
    assert e.completeness_error.max() < 1e-10


def test_layer_norm_act_channels_last():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = tl.LayerNormAct(8, act_layer=nn.GELU)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    from bcosify.surgery import Rule, register_rule

    register_rule(Block, Rule("descend"))
    model = _randomise_affine(Block()).double().eval()
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    assert equivalence_error(model, x, mean=0.5, std=0.2) < 1e-10
    e = bcosify.explain(bcosify.convert(model, mean=0.5, std=0.2), x)
    assert e.completeness_error.max() < 1e-10
