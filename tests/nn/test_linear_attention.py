"""EfficientViT-MIT's ReLU linear attention (timm's ``LiteMLA``) as :class:`bcosify.nn.LinearAttention`: q/k and v
channels split out of the fused and the aggregation convolutions; exact at b=1 with biases, dynamic linear in
explanation mode."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.efficientvit_mit import LiteMLA
from torch import nn

import bcosify
from bcosify.explanation.checks import equivalence_error
from bcosify.nn import BcosConv2d, DauConv2d, GatePath, LinearAttention, set_explanation_mode
from bcosify.surgery.support import randomised
from helpers import randomise_dau_layers


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


def test_autocast_keeps_the_attention_in_float32_as_timm_does():
    mla = _lite_mla().float()
    new = LinearAttention.from_module(copy.deepcopy(mla), _bcos(1.0, True)).eval()
    x = torch.randn(2, 12, 7, 6)
    autocast_in_attention = []
    attention = new._attn
    new._attn = lambda q, k, v: autocast_in_attention.append(torch.is_autocast_enabled("cpu")) or attention(q, k, v)
    with torch.no_grad():
        exact = mla(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, out = mla(x), new(x)
    assert autocast_in_attention == [False] and new.attention_dtype == torch.float32
    assert out.dtype == ref.dtype == torch.bfloat16  # (the projection runs in bfloat16 under autocast)
    scale = exact.abs().max()
    # the convolutions round to bfloat16 (2^-8 relative), the attention does not: both as far from float32
    assert (ref.float() - exact).abs().max() < 0.05 * scale and (out.float() - exact).abs().max() < 0.05 * scale
    assert (out.float() - ref.float()).abs().max() < 0.05 * scale


def _small_efficientvit() -> nn.Module:
    """The coverage check's EfficientViT-MIT (tests/surgery/coverage_checks_b.yaml): LiteMLA in two stages."""
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b0", widths=[8, 8, 8, 16, 16], depths=[1, 1, 1, 1, 1], head_dim=8,
                              head_widths=[32, 32], num_classes=5)
    return randomised(model).double().eval()


def test_dau_units_convert_the_values_and_explain_completely():
    original = _small_efficientvit()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # the attention runs in float32 (as timm's): float64 agreement to its rounding
    assert equivalence_error(original, x, unit="dau", rank=1) < 1e-6
    bmodel = bcosify.convert(original, unit="dau", rank=1)
    attentions = [m for m in bmodel.modules() if isinstance(m, LinearAttention)]
    assert len(attentions) == 2
    for attention in attentions:  # values through DAU layers, queries and keys kept
        assert not any(type(m) is nn.Conv2d for m in attention.v.modules())
        assert sum(isinstance(m, DauConv2d) for m in attention.v.modules()) == 3  # qkv's v part, aggreg's two
        assert not any(isinstance(m, DauConv2d) for m in attention.qk.modules())
    randomise_dau_layers(bmodel, torch.rand(4, 3, 64, 64, dtype=torch.float64))
    e = bcosify.explain(bmodel, x)
    assert bool((e.explained_logit.abs() > 0).all())
    assert e.completeness_error.max().item() < 1e-6
