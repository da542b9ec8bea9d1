"""CondConv (timm ``CondConv2d``): expert kernels mixed per sample by routing weights, a gate."""

from __future__ import annotations

import pytest
import torch

import bcosify
from bcosify.data import normalize
from bcosify.errors import ConversionError
from bcosify.nn import BcosCondConv2d
from bcosify.surgery.support import randomised

timm = pytest.importorskip("timm")
from timm.layers import CondConv2d  # noqa: E402
from timm.models._efficientnet_builder import decode_arch_def  # noqa: E402
from timm.models.efficientnet import EfficientNet  # noqa: E402

NORM = dict(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def _cond_conv(padding, stride, groups=1, bias=True) -> CondConv2d:
    torch.manual_seed(0)
    conv = CondConv2d(6, 8, 3, stride=stride, padding=padding, groups=groups, bias=bias, num_experts=3).double()
    with torch.no_grad():
        if bias:
            conv.bias.normal_()
    return conv


@pytest.mark.parametrize("padding, stride, groups", [("", 1, 1), ("", 2, 2), ("same", 2, 1)],
                         ids=["symmetric", "strided-grouped", "tf-same"])
def test_at_b1_with_biases_the_layer_computes_timms_condconv(padding, stride, groups):
    conv = _cond_conv(padding, stride, groups)
    new = BcosCondConv2d.from_module(conv, b=1.0, keep_bias=True)
    assert new.same_padding == conv.dynamic_padding
    x = torch.randn(4, 6, 9, 11, dtype=torch.float64)
    routing = torch.rand(4, 3, dtype=torch.float64)
    torch.testing.assert_close(new(x, routing), conv(x, routing), rtol=1e-12, atol=1e-12)
    conv.load_state_dict(new.state_dict())  # the same parameter names and shapes, both ways
    new.load_state_dict(conv.state_dict())


def test_in_explanation_mode_the_output_is_the_dynamic_weight_times_the_input():
    new = BcosCondConv2d.from_module(_cond_conv("", 2, bias=False), b=2.0)
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    routing = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    bcosify.nn.set_explanation_mode(new, True)
    out = new(x, routing)
    for i in range(3):  # one output unit per sample: W(x) x == out, and the routing weights take no gradient
        (grad_x, grad_r) = torch.autograd.grad(out[i, 5, 1, 2], (x, routing), allow_unused=True, retain_graph=True)
        assert torch.allclose((grad_x * x).sum(), out[i, 5, 1, 2], rtol=1e-12)
        assert grad_r is None or grad_r.abs().max() == 0
    bcosify.nn.set_explanation_mode(new, False)
    grad_r = torch.autograd.grad(new(x, routing).sum(), routing)[0]
    assert grad_r.abs().max() > 0  # trained: the routing weights get their gradient


def test_routing_weights_of_the_wrong_shape_are_refused():
    new = BcosCondConv2d.from_module(_cond_conv("", 1))
    with pytest.raises(ValueError, match="routing_weights must be"):
        new(torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64))


def _condconv_efficientnet() -> EfficientNet:
    """EfficientNet-CondConv's block kinds, small: routing, three CondConvs, squeeze-excite, 'SAME' or not."""
    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e2_c16_se0.25_cc4"], ["ir_r1_k5_s2_e2_c24_cc4"]]
    torch.manual_seed(0)
    return EfficientNet(block_args=decode_arch_def(arch), stem_size=8, num_features=32, num_classes=10)


def test_a_condconv_efficientnet_converts_exactly(one_thread):
    original = randomised(_condconv_efficientnet().double().eval())
    bmodel = bcosify.convert(original, verify=True, **NORM)
    (entry,) = bmodel.report.by_action("verified")
    assert "not informative" not in entry.note, entry.note
    assert bmodel.report.leftovers == []
    assert sum(isinstance(m, BcosCondConv2d) for m in bmodel.modules()) == 6
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    e = bcosify.explain(bmodel, x)
    assert e.explained_logit.abs().min() > 1e-6
    assert e.completeness_error.max() < 1e-10
    exact = bcosify.convert(original, b=1.0, keep_bias=True, logit_bias=0.0, **NORM)
    with torch.no_grad():
        reference = original(normalize(x, NORM["mean"], NORM["std"]))
        torch.testing.assert_close(exact(x), reference, rtol=1e-10, atol=1e-12)


def test_the_dau_unit_refuses_condconv_naming_the_layer():
    with pytest.raises(ConversionError, match=r"blocks\.1\.0\.conv_pw \(CondConv2d\): unit='dau'"):
        bcosify.convert(_condconv_efficientnet().double(), unit="dau", **NORM)
