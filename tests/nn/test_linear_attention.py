"""EfficientViT-MIT's ReLU linear attention (timm's ``LiteMLA``) as :class:`bcosify.nn.LinearAttention`: q/k and v
channels split out of the fused and the aggregation convolutions; exact at b=1 with biases, dynamic linear in
explanation mode."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.efficientvit_mit import LiteMLA
from torch import nn

from bcosify.nn import BcosConv2d, GatePath, LinearAttention, set_explanation_mode


def _lite_mla(**kwargs) -> LiteMLA:
    torch.manual_seed(0)
    kwargs = {"in_channels": 12, "out_channels": 10, "dim": 4, "use_bias": True, "scales": (3, 5), **kwargs}
    mla = LiteMLA(**kwargs).double().eval()
    with torch.no_grad():
        for m in mla.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return mla


def _bcos(b: float, keep_bias: bool):
    return lambda conv, name: BcosConv2d.from_module(conv, b, keep_bias=keep_bias)


def test_split_b1_with_biases_equals_timm():
    mla = _lite_mla()
    new = LinearAttention.from_module(copy.deepcopy(mla), _bcos(1.0, True)).eval()
    assert isinstance(new.qk, GatePath) and len(new.v.aggreg) == 2
    assert new.v.proj.out_channels == 12 and new.v.aggreg[0][1].groups == 3  # 3 heads: the v group of each
    x = torch.randn(2, 12, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        ref, out = mla(x), new(x)
    # timm computes the attention in float32; so does the layer by default: the same rounding
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()
    new.attention_dtype = None  # the input's dtype: differs from timm by timm's float32 rounding only
    with torch.no_grad():
        assert 0 < (new(x) - ref).abs().max() < 1e-5 * ref.abs().max()


def test_explanation_mode_is_dynamic_linear():
    mla = _lite_mla()
    mla.proj = mla.proj.conv  # a value-path projection with no bias
    mla.proj.bias = None
    new = LinearAttention.from_module(mla, _bcos(2.0, False), attention_dtype=None).eval()
    x = torch.randn(2, 12, 6, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 10, 6, 5, dtype=torch.float64)
    set_explanation_mode(new, True)
    y = (new(x) * r).sum(dim=(1, 2, 3))
    (grad,) = torch.autograd.grad(y.sum(), x)
    contributions = (x * grad).sum(dim=(1, 2, 3))
    assert torch.allclose(contributions, y, rtol=1e-12, atol=0), (contributions, y)
    set_explanation_mode(new, False)  # outside explanation mode the gradient also goes through q, k
    (grad,) = torch.autograd.grad((new(x) * r).sum(), x)
    assert not torch.allclose((x * grad).sum(dim=(1, 2, 3)), y.detach(), rtol=1e-6)


def test_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="qkv.norm"):
        LinearAttention.from_module(_lite_mla(norm_layer=(nn.BatchNorm2d, nn.BatchNorm2d)), _bcos(1.0, True))
    mla = _lite_mla()
    mla.aggreg[0][1] = nn.Conv2d(36, 36, 1, groups=2).double()  # groups of 18 channels mix q, k and v
    with pytest.raises(ValueError, match="aggreg.0.1: a group"):
        LinearAttention.from_module(mla, _bcos(1.0, True))
