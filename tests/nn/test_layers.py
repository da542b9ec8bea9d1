"""Unit tests of ``bcosify.nn`` against independent reference implementations (float64, tiny tensors).

The references below never call into ``bcosify``: B-cos convolutions are recomputed from ``F.unfold``
patches and the explicit formula ``out = lin * |lin / sqrt(||z||^2 + eps)|^(b-1)``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from bcosify.nn import (BcosConv2d, BcosLinear, DetachableGroupNorm, DetachableLayerNorm, DetachableLayerNorm2d,
                        DetachableModule, DetachedGate, GatedActivation, InputEncoder, LogitBias,
                        UncenteredBatchNorm2d, bcos_scale, conv_patch_sq_norms, gated, gelu_gate, gelu_tanh_gate,
                        hardswish_gate, relu6_gate, set_explanation_mode)

DT = torch.float64
EPS = 1e-6  # the layers' default eps
TOL = dict(rtol=1e-10, atol=1e-12)
B_VALUES = (1.0, 1.5, 2.0, 2.5)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Every test here uses tiny tensors."""


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


# --- independent references ------------------------------------------------------------------------

def ref_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def ref_patches(x, kernel_size, stride, padding, dilation, groups):
    """``(N, groups, C/groups * kh * kw, L)`` patches and the output spatial size."""
    n, c, h, w = x.shape
    k, s, p, d = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kh*kw, L), channel-major
    out_hw = (ref_out_size(h, k[0], s[0], p[0], d[0]), ref_out_size(w, k[1], s[1], p[1], d[1]))
    assert cols.shape[-1] == out_hw[0] * out_hw[1]
    return cols.view(n, groups, (c // groups) * k[0] * k[1], -1), out_hw


def ref_patch_sq_norms(x, kernel_size, stride, padding, dilation, groups):
    patches, (ho, wo) = ref_patches(x, kernel_size, stride, padding, dilation, groups)
    return patches.pow(2).sum(2).view(x.shape[0], groups, ho, wo)


def ref_weight_rows(weight, normalize):
    rows = weight.reshape(weight.shape[0], -1)
    if normalize:
        rows = rows / rows.norm(dim=1, keepdim=True)
    return rows


def ref_bcos(lin, sq, b, eps=EPS):
    return lin * (lin.abs() / torch.sqrt(sq + eps)) ** (b - 1)


def ref_bcos_conv(x, weight, bias, stride, padding, dilation, groups, b, normalize, eps=EPS):
    out_ch = weight.shape[0]
    patches, (ho, wo) = ref_patches(x, weight.shape[2:], stride, padding, dilation, groups)
    rows = ref_weight_rows(weight, normalize)
    per_group = out_ch // groups
    outs = []
    for o in range(out_ch):
        z = patches[:, o // per_group]  # (N, K, L)
        lin = torch.einsum("k,nkl->nl", rows[o], z)
        outs.append(ref_bcos(lin, z.pow(2).sum(1), b, eps))
    out = torch.stack(outs, 1).view(x.shape[0], out_ch, ho, wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def ref_bcos_linear(x, weight, bias, b, normalize, eps=EPS):
    rows = ref_weight_rows(weight, normalize)
    lin = x @ rows.T
    out = ref_bcos(lin, x.pow(2).sum(-1, keepdim=True), b, eps)
    return out if bias is None else out + bias


def ref_tf_same_pad(x, kernel_size, stride, dilation):
    pads = []
    for size, k, s, d in zip(x.shape[-2:], _pair(kernel_size), _pair(stride), _pair(dilation)):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])


def grad_of(fn, x, select):
    """Gradient of ``select(fn(x))`` (a scalar) with respect to ``x``, and the output."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(select(out), x)
    return grad, out.detach()


# --- 1 & 2: BcosConv2d and conv_patch_sq_norms over a grid of geometries ---------------------------

GROUPINGS = {  # name -> (in_channels, out_channels, groups)
    "g1": (4, 6, 1),
    "g2": (4, 6, 2),
    "depthwise_x2": (4, 8, 4),
}
KERNELS = [(1, 1), (3, 3), (5, 5), (3, 1)]
GRID = list(itertools.product(GROUPINGS, (1, 2), (0, 1, 2), (1, 2), KERNELS))
EXTRA_GEOMETRIES = [  # (grouping, stride, padding, dilation, kernel) with per-axis values
    ("g1", (2, 1), (1, 0), (1, 1), (3, 1)),
    ("g2", (1, 2), (0, 2), (2, 1), (1, 3)),
    ("depthwise_x2", (2, 2), (2, 1), (1, 2), (5, 3)),
    ("g1", (1, 1), (0, 1), (1, 1), (1, 1)),
]
ALL_GEOMETRIES = GRID + EXTRA_GEOMETRIES
H, W = 11, 10  # large enough for a 5x5 kernel with dilation 2 and no padding


def _geometry_id(case):
    grouping, stride, padding, dilation, kernel = case
    return f"{grouping}-s{stride}-p{padding}-d{dilation}-k{kernel}".replace(" ", "")


def _make_conv(grouping, stride, padding, dilation, kernel, bias=True, seed=0):
    in_ch, out_ch, groups = GROUPINGS[grouping]
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=bias).to(DT)
    with torch.no_grad():
        conv.weight.copy_(_randn(*conv.weight.shape, seed=seed + 1))
        if bias:
            conv.bias.copy_(_randn(out_ch, seed=seed + 2))
    return conv


@pytest.mark.parametrize("case", ALL_GEOMETRIES, ids=_geometry_id)
def test_conv_patch_sq_norms_matches_unfold(case):
    grouping, stride, padding, dilation, kernel = case
    in_ch, _, groups = GROUPINGS[grouping]
    x = _randn(2, in_ch, H, W, seed=3)
    got = conv_patch_sq_norms(x, _pair(kernel), _pair(stride), _pair(padding), _pair(dilation), groups)
    want = ref_patch_sq_norms(x, kernel, stride, padding, dilation, groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("case", ALL_GEOMETRIES, ids=_geometry_id)
def test_bcos_conv2d_matches_reference(case):
    grouping, stride, padding, dilation, kernel = case
    conv = _make_conv(*case)
    x = _randn(2, conv.in_channels, H, W, seed=4)
    for b, normalize in itertools.product(B_VALUES, (False, True)):
        layer = BcosConv2d.from_module(conv, b, normalize)
        assert layer.bias is None
        want = ref_bcos_conv(x, conv.weight, None, stride, padding, dilation, conv.groups, b, normalize)
        torch.testing.assert_close(layer(x), want, **TOL, msg=lambda m: f"b={b} normalize={normalize}: {m}")
        with_bias = BcosConv2d.from_module(conv, b, normalize, keep_bias=True)
        want = ref_bcos_conv(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups, b, normalize)
        torch.testing.assert_close(with_bias(x), want, **TOL,
                                   msg=lambda m: f"keep_bias b={b} normalize={normalize}: {m}")
    # b = 1 without weight normalisation is exactly the original convolution
    torch.testing.assert_close(BcosConv2d.from_module(conv, 1.0, keep_bias=True)(x), conv(x), **TOL)
    torch.testing.assert_close(BcosConv2d.from_module(conv, 1.0)(x), conv(x) - conv.bias.view(1, -1, 1, 1), **TOL)


@pytest.mark.parametrize("kernel,stride,dilation,size", [
    (3, 2, 1, (35, 35)), (5, 2, 1, (35, 34)), ((3, 1), 2, 1, (33, 35)), (3, 2, 2, (35, 35)),
    (4, 2, 1, (35, 35)), (3, 1, 1, (35, 36)), (1, 2, 1, (35, 35)),
], ids=str)
def test_bcos_conv2d_same_padding(kernel, stride, dilation, size):
    torch.manual_seed(0)
    conv = timm.layers.Conv2dSame(3, 4, kernel, stride, dilation=dilation, bias=True).to(DT)
    x = _randn(2, 3, *size, seed=5)
    same = BcosConv2d.from_module(conv, 1.0, keep_bias=True, same_padding=True)
    torch.testing.assert_close(same(x), conv(x), **TOL)
    for b, normalize in itertools.product((1.5, 2.0), (False, True)):
        layer = BcosConv2d.from_module(conv, b, normalize, same_padding=True)
        want = ref_bcos_conv(ref_tf_same_pad(x, kernel, stride, dilation), conv.weight, None, stride, 0, dilation,
                             1, b, normalize)
        torch.testing.assert_close(layer(x), want, **TOL)


@pytest.mark.parametrize("padding,kernel,dilation", [("same", 3, 1), ("same", (5, 3), 2), ("valid", 3, 1)])
def test_bcos_conv2d_string_padding(padding, kernel, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation).to(DT)
    x = _randn(1, 3, 9, 8, seed=6)
    torch.testing.assert_close(BcosConv2d.from_module(conv, 1.0, keep_bias=True)(x), conv(x), **TOL)


def test_bcos_conv2d_refuses_inexact_conversions():
    with pytest.raises(ValueError):
        BcosConv2d.from_module(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError):
        BcosConv2d.from_module(nn.Conv2d(2, 2, 2, padding="same"))


# --- 3: BcosLinear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 5, 7)], ids=str)
def test_bcos_linear_matches_reference(shape):
    torch.manual_seed(0)
    linear = nn.Linear(7, 4).to(DT)
    x = _randn(*shape, seed=7)
    for b, normalize in itertools.product(B_VALUES, (False, True)):
        layer = BcosLinear.from_module(linear, b, normalize)
        assert layer.bias is None
        got = layer(x)
        assert got.shape == shape[:-1] + (4,)
        torch.testing.assert_close(got, ref_bcos_linear(x, linear.weight, None, b, normalize), **TOL)
        with_bias = BcosLinear.from_module(linear, b, normalize, keep_bias=True)
        torch.testing.assert_close(with_bias(x), ref_bcos_linear(x, linear.weight, linear.bias, b, normalize), **TOL)
    torch.testing.assert_close(BcosLinear.from_module(linear, 1.0, keep_bias=True)(x), linear(x), **TOL)


# --- 4: the custom backward ------------------------------------------------------------------------

def _functional(layer):
    return lambda x, w: torch.func.functional_call(layer, {"weight": w}, (x,))


@pytest.mark.parametrize("b", (1.5, 2.0, 3.0))
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("conv_kwargs", [
    dict(in_channels=3, out_channels=2, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 1), stride=2, padding=1, groups=2),
    dict(in_channels=2, out_channels=4, kernel_size=3, dilation=2, padding=2, groups=2),
], ids=["g1", "g2_stride", "depthwise_dilated"])
def test_gradcheck_bcos_conv2d(b, normalize, conv_kwargs):
    layer = BcosConv2d(**conv_kwargs, b=b, normalize_weights=normalize, dtype=DT)
    with torch.no_grad():
        layer.weight.copy_(_randn(*layer.weight.shape, seed=8))
    x = _randn(1, conv_kwargs["in_channels"], 5, 4, seed=9).requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(_functional(layer), (x, w))


@pytest.mark.parametrize("b", (1.5, 2.0, 3.0))
@pytest.mark.parametrize("normalize", (False, True))
def test_gradcheck_bcos_linear(b, normalize):
    layer = BcosLinear(5, 3, b=b, normalize_weights=normalize, dtype=DT)
    x = _randn(2, 3, 5, seed=10).requires_grad_(True)
    w = _randn(3, 5, seed=11).requires_grad_(True)
    assert torch.autograd.gradcheck(_functional(layer), (x, w))


@pytest.mark.parametrize("b", (1.5, 2.0, 3.0))
def test_gradcheck_bcos_scale_function(b):
    lin = _randn(2, 3, 4, seed=12).requires_grad_(True)
    sq = (_randn(2, 1, 4, seed=13).pow(2) + 0.5).requires_grad_(True)  # broadcast over dim 1
    assert torch.autograd.gradcheck(lambda a, s: bcos_scale(a, s, b, EPS, False), (lin, sq))
    torch.testing.assert_close(bcos_scale(lin, sq, b, EPS, False), ref_bcos(lin, sq, b), **TOL)


@pytest.mark.parametrize("b", (1.5, 2.0))
def test_gradients_finite_at_zero_lin(b):
    conv = BcosConv2d(2, 3, 3, padding=1, b=b, dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(_randn(*conv.weight.shape, seed=14))
        conv.weight[1] = 0  # lin == 0 on non-zero patches too
    x = _randn(1, 2, 7, 7, seed=15)
    x[:, :, :4, :4] = 0  # whole patches of zeros: lin == 0 and ||z|| == 0
    x.requires_grad_(True)
    out = conv(x)
    assert (out == 0).any()
    out.backward(_randn(*out.shape, seed=16))
    assert torch.isfinite(x.grad).all() and torch.isfinite(conv.weight.grad).all()
    assert x.grad.abs().sum() > 0

    linear = BcosLinear(4, 3, b=b, dtype=DT)
    with torch.no_grad():
        linear.weight.copy_(_randn(3, 4, seed=17))
        linear.weight[0] = 0
    xl = _randn(3, 4, seed=18)
    xl[0] = 0
    xl.requires_grad_(True)
    out = linear(xl)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(xl.grad).all() and torch.isfinite(linear.weight.grad).all()


# --- 5: explanation mode (dynamic linearity) -------------------------------------------------------

EXPLAIN_CONVS = [
    dict(grouping="g1", stride=1, padding=1, dilation=1, kernel=3, normalize=False),
    dict(grouping="g2", stride=2, padding=2, dilation=2, kernel=(3, 1), normalize=True),
    dict(grouping="depthwise_x2", stride=2, padding=1, dilation=1, kernel=3, normalize=False),
]


@pytest.mark.parametrize("cfg", EXPLAIN_CONVS, ids=lambda c: c["grouping"])
def test_bcos_conv2d_explanation_mode(cfg):
    b = 2.0
    geometry = (cfg["grouping"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["kernel"])
    conv = _make_conv(*geometry, bias=False, seed=20)
    layer = BcosConv2d.from_module(conv, b, cfg["normalize"])
    x = _randn(1, conv.in_channels, 7, 6, seed=21)
    patches, (ho, wo) = ref_patches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    rows = ref_weight_rows(conv.weight, cfg["normalize"])
    per_group = conv.out_channels // conv.groups
    normal_out = layer(x)
    # output elements with a clearly non-zero value (a patch entirely in the padding gives exactly 0)
    candidates = (normal_out[0].abs() > 0.1 * normal_out.abs().max()).nonzero().tolist()
    for o, i, j in [candidates[0], candidates[len(candidates) // 2], candidates[-1]]:
        select = lambda out: out[0, o, i, j]  # noqa: E731
        layer.explanation_mode = False
        g_normal, out_n = grad_of(layer, x, select)
        layer.explanation_mode = True
        g_expl, out_e = grad_of(layer, x, select)
        torch.testing.assert_close(out_e, normal_out, rtol=0, atol=0)  # identical forward values
        torch.testing.assert_close(out_n, normal_out, rtol=0, atol=0)
        # reference dynamic weight: scale * w_o on the patch of output (i, j), zero elsewhere
        g, l = o // per_group, i * wo + j
        z = patches[0, g, :, l]
        lin = rows[o] @ z
        scale = (lin.abs() / torch.sqrt(z.pow(2).sum() + EPS)) ** (b - 1)
        cols = torch.zeros_like(patches)
        cols[0, g, :, l] = scale * rows[o]
        want = F.fold(cols.view(1, -1, ho * wo), x.shape[-2:], conv.kernel_size, dilation=conv.dilation,
                      padding=conv.padding, stride=conv.stride)
        torch.testing.assert_close(g_expl, want, **TOL)
        out_k = normal_out[0, o, i, j]
        torch.testing.assert_close((x * g_expl).sum(), out_k, **TOL)
        # normal mode: the gradient is not the dynamic weight (it carries the derivative of the factor)...
        assert (g_normal - g_expl).norm() > 0.1 * g_expl.norm()
        # ...but its contributions x * grad differ elementwise from the dynamic-linear ones
        assert (x * g_normal - x * g_expl).abs().max() > 1e-3 * out_k.abs()
        # and (Euler: the layer is positively homogeneous of degree 1 up to eps) they still sum to out_k
        torch.testing.assert_close((x * g_normal).sum(), out_k, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("normalize", (False, True))
def test_bcos_linear_explanation_mode(normalize):
    b = 2.0
    weight = _randn(4, 7, seed=22)
    layer = BcosLinear(7, 4, b=b, normalize_weights=normalize, dtype=DT)
    with torch.no_grad():
        layer.weight.copy_(weight)
    x = _randn(2, 5, 7, seed=23)
    rows = ref_weight_rows(weight, normalize)
    normal_out = layer(x)
    for idx in [(0, 0, 0), (1, 4, 3), (1, 2, 1)]:
        select = lambda out: out[idx]  # noqa: E731
        layer.explanation_mode = False
        g_normal, _ = grad_of(layer, x, select)
        layer.explanation_mode = True
        g_expl, out_e = grad_of(layer, x, select)
        torch.testing.assert_close(out_e, normal_out, rtol=0, atol=0)
        z = x[idx[0], idx[1]]
        scale = (rows[idx[2]] @ z).abs() / torch.sqrt(z.pow(2).sum() + EPS)
        want = torch.zeros_like(x)
        want[idx[0], idx[1]] = scale * rows[idx[2]]
        torch.testing.assert_close(g_expl, want, **TOL)
        torch.testing.assert_close((x * g_expl).sum(), normal_out[idx], **TOL)
        # normal-mode gradient: analytic derivative, b*scale*w - (b-1) out z / (||z||^2 + eps)
        analytic = torch.zeros_like(x)
        analytic[idx[0], idx[1]] = b * scale * rows[idx[2]] - (b - 1) * normal_out[idx] * z / (z.pow(2).sum() + EPS)
        torch.testing.assert_close(g_normal, analytic, **TOL)
        assert (g_normal - g_expl).norm() > 0.1 * g_expl.norm()


def test_explanation_mode_b1_is_plain_linear():
    conv = _make_conv("g1", 1, 1, 1, 3, bias=False)
    layer = BcosConv2d.from_module(conv, 1.0)
    x = _randn(1, 4, 5, 5, seed=24)
    for mode in (False, True):
        layer.explanation_mode = mode
        g, out = grad_of(layer, x, lambda o: o[0, 2, 2, 2])
        torch.testing.assert_close((x * g).sum(), out[0, 2, 2, 2], **TOL)


# --- 6: normalisation layers -----------------------------------------------------------------------

def _random_bn(c=5, momentum=0.1, seed=30):
    bn = nn.BatchNorm2d(c, momentum=momentum).to(DT)
    with torch.no_grad():
        bn.running_mean.copy_(_randn(c, seed=seed))
        bn.running_var.copy_(_randn(c, seed=seed + 1).pow(2) + 0.3)
        bn.weight.copy_(_randn(c, seed=seed + 2))
        bn.bias.copy_(_randn(c, seed=seed + 3))
    return bn


def test_uncentered_batchnorm_eval():
    bn = _random_bn().eval()
    x = _randn(2, 5, 3, 4, seed=31) * 2 + 1
    kept = UncenteredBatchNorm2d.from_module(bn, keep_bias=True)
    assert not kept.training
    torch.testing.assert_close(kept(x), bn(x), **TOL)
    plain = UncenteredBatchNorm2d.from_module(bn)
    assert plain.bias is None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(plain(x), x * scale.view(1, -1, 1, 1), **TOL)
    # explanation mode in eval: a fixed per-channel scale, identical values
    plain.explanation_mode = True
    g, out = grad_of(plain, x, lambda o: o[1, 3, 2, 1])
    torch.testing.assert_close((x * g).sum(), out[1, 3, 2, 1], **TOL)


def test_uncentered_batchnorm_without_affine_or_stats():
    bn = nn.BatchNorm2d(3, affine=False).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.copy_(_randn(3, seed=35))
        bn.running_var.copy_(_randn(3, seed=36).pow(2) + 0.3)
    x = _randn(2, 3, 2, 2, seed=37)
    torch.testing.assert_close(UncenteredBatchNorm2d.from_module(bn, keep_bias=True)(x), bn(x), **TOL)
    with pytest.raises(ValueError):
        UncenteredBatchNorm2d.from_module(nn.BatchNorm2d(3, track_running_stats=False))


@pytest.mark.parametrize("momentum", (0.1, None))
def test_uncentered_batchnorm_training(momentum):
    bn = _random_bn(momentum=momentum).train()
    ub = UncenteredBatchNorm2d.from_module(bn)
    assert ub.training
    for step in range(2):
        x = _randn(3, 5, 4, 4, seed=40 + step) * 1.5 + 2.0  # far from zero mean
        out = ub(x)
        bn(x)
        var = x.var(dim=(0, 2, 3), unbiased=False)
        want = x * (bn.weight / torch.sqrt(var + bn.eps)).view(1, -1, 1, 1)
        torch.testing.assert_close(out, want, **TOL)
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        assert (mean.abs() > 0.5 * std).all()  # not centred (x has mean 2, std 1.5 per channel)
        torch.testing.assert_close(ub.running_var, bn.running_var, **TOL)
        assert int(ub.num_batches_tracked) == int(bn.num_batches_tracked)


def test_uncentered_batchnorm_training_explanation_mode():
    ub = UncenteredBatchNorm2d.from_module(_random_bn().train())
    x = _randn(3, 5, 2, 2, seed=45) + 1
    ub.explanation_mode = False
    g_normal, out_n = grad_of(ub, x, lambda o: o[0, 1, 1, 0])
    ub.explanation_mode = True
    g_expl, out_e = grad_of(ub, x, lambda o: o[0, 1, 1, 0])
    torch.testing.assert_close(out_e, out_n, **TOL)
    torch.testing.assert_close((x * g_expl).sum(), out_e[0, 1, 1, 0], **TOL)
    assert (x * g_normal).sum().sub(out_n[0, 1, 1, 0]).abs() > 1e-3 * out_n[0, 1, 1, 0].abs()


def _randomize_affine(module, seed):
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(_randn(*module.weight.shape, seed=seed))
        if module.bias is not None:
            module.bias.copy_(_randn(*module.bias.shape, seed=seed + 1))
    return module


def _check_dynamic_linearity(layer, x, idx):
    """In explanation mode sum(x * grad) == out[idx]; in normal mode (scale invariance) it is far from it."""
    layer.explanation_mode = False
    g_normal, out_n = grad_of(layer, x, lambda o: o[idx])
    layer.explanation_mode = True
    g_expl, out_e = grad_of(layer, x, lambda o: o[idx])
    layer.explanation_mode = False
    torch.testing.assert_close(out_e, out_n, **TOL)
    torch.testing.assert_close((x * g_expl).sum(), out_e[idx], **TOL)
    assert ((x * g_normal).sum() - out_n[idx]).abs() > 0.1 * out_n[idx].abs()


NORM_CASES = {
    "layernorm": (lambda: nn.LayerNorm(6), DetachableLayerNorm, (2, 3, 6), (1, 2, 4)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((3, 6), eps=1e-6), DetachableLayerNorm, (2, 3, 6), (0, 1, 5)),
    "layernorm_no_affine": (lambda: nn.LayerNorm(6, elementwise_affine=False), DetachableLayerNorm, (4, 6), (2, 3)),
    "layernorm_no_bias": (lambda: nn.LayerNorm(6, bias=False), DetachableLayerNorm, (4, 6), (2, 3)),
    "timm_layernorm2d": (lambda: timm.layers.LayerNorm2d(5), DetachableLayerNorm2d, (2, 5, 3, 4), (1, 2, 0, 3)),
    "groupnorm": (lambda: nn.GroupNorm(3, 6), DetachableGroupNorm, (2, 6, 3, 4), (1, 4, 2, 1)),
    "groupnorm_3d_input": (lambda: nn.GroupNorm(2, 6), DetachableGroupNorm, (2, 6, 5), (0, 3, 4)),
    "groupnorm_no_affine": (lambda: nn.GroupNorm(2, 4, affine=False), DetachableGroupNorm, (2, 4, 3, 3), (1, 1, 2, 2)),
}


@pytest.mark.parametrize("name", NORM_CASES)
def test_detachable_norms(name):
    make, cls, shape, idx = NORM_CASES[name]
    ref = _randomize_affine(make().to(DT), seed=50)
    x = _randn(*shape, seed=51) * 2 + 0.5
    want = ref(x)
    kept = cls.from_module(ref, keep_bias=True)
    torch.testing.assert_close(kept(x), want, **TOL)
    plain = cls.from_module(ref)
    assert plain.bias is None
    if getattr(ref, "bias", None) is not None:
        bias = ref.bias.view((1, -1) + (1,) * (x.dim() - 2)) if cls is not DetachableLayerNorm else ref.bias
        want = want - bias
    torch.testing.assert_close(plain(x), want, **TOL)
    _check_dynamic_linearity(plain, x, idx)


def test_layernorm2d_equals_channels_first_reference():
    ln = _randomize_affine(timm.layers.LayerNorm2d(5, eps=1e-5).to(DT), seed=52)
    x = _randn(2, 5, 3, 4, seed=53)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(DetachableLayerNorm2d.from_module(ln, keep_bias=True)(x), want, **TOL)


# --- 7: gated activations --------------------------------------------------------------------------

ACTIVATIONS = {  # name -> (activation factory, gate as used in bcosify/surgery/rules.py; None = ratio gate)
    "relu6": (lambda: nn.ReLU6(), relu6_gate),
    "relu6_inplace": (lambda: nn.ReLU6(inplace=True), relu6_gate),
    "gelu": (lambda: nn.GELU(), gelu_gate),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), gelu_tanh_gate),
    "silu": (lambda: nn.SiLU(), torch.sigmoid),
    "hardswish": (lambda: nn.Hardswish(), hardswish_gate),
    "tanh": (lambda: nn.Tanh(), None),
}


def _activation_inputs():
    special = [0.0, -0.0, 1e-12, -1e-12, 1e-300, 6.0, 6 - 1e-9, 6 + 1e-9, 5.5, 6.5, 3.0, -3.0, 3 - 1e-9, 3 + 1e-9,
               -3 - 1e-9, -3 + 1e-9, 2.9, -2.9, 1e3, -1e3, 40.0, -40.0]
    return torch.cat([torch.linspace(-10, 10, 161, dtype=DT), torch.tensor(special, dtype=DT),
                      _randn(3, 4, seed=60).flatten() * 4])


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gated_activation(name):
    make, gate = ACTIVATIONS[name]
    reference = make()
    act = gated(make(), gate)
    assert isinstance(act, GatedActivation)
    assert not getattr(act.activation, "inplace", False)
    x = _activation_inputs()
    x_before = x.clone()
    want = reference(x.clone())
    torch.testing.assert_close(act(x), want, rtol=0, atol=0)
    act.explanation_mode = True
    got = act(x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # never modified in place
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300, msg=lambda m: f"explanation-mode forward: {m}")
    g, out = grad_of(act, x, lambda o: o.sum())
    torch.testing.assert_close(x * g, out, rtol=1e-15, atol=0)
    assert torch.isfinite(g).all()
    # the gradient is the gate, detached (not the derivative of the activation)
    gate_fn = gate if gate is not None else act.gate
    torch.testing.assert_close(g, gate_fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["relu6", "gelu", "gelu_tanh", "silu", "hardswish", "tanh"])
def test_rules_table_gates_match_activations(name):
    from bcosify.surgery.rules import RULES

    make, _ = ACTIVATIONS[name]
    activation = make()
    converted = RULES[type(activation)].build(make(), None)
    x = _activation_inputs()
    set_explanation_mode(converted, True)
    torch.testing.assert_close(converted(x), activation(x), rtol=1e-12, atol=1e-300)


# --- 8: DetachedGate -------------------------------------------------------------------------------

def test_detached_gate():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid()).to(DT)
    layer = DetachedGate(branch, lambda module, x: module(x))
    x = _randn(2, 4, 3, 3, seed=70)
    v = _randn(2, 4, 3, 3, seed=71)
    gate = branch(x).detach()
    torch.testing.assert_close(layer(x), x * gate, **TOL)
    g_normal, _ = grad_of(layer, x, lambda o: (o * v).sum())
    layer.explanation_mode = True
    branch.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    torch.testing.assert_close(out, x * gate, **TOL)
    (out * v).sum().backward()
    torch.testing.assert_close(xg.grad, v * gate, **TOL)
    assert all(p.grad is None for p in branch.parameters())  # the gate branch is off the gradient path
    assert (g_normal - xg.grad).abs().max() > 1e-3


# --- 9: encoding, logit bias, argument checks ------------------------------------------------------

def test_input_encoder():
    x = torch.rand(2, 3, 4, 5, generator=_gen(80), dtype=DT)
    out = InputEncoder()(x)
    assert out.shape == (2, 6, 4, 5)
    torch.testing.assert_close(out[:, :3], x, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 3:], 1 - x, rtol=0, atol=0)


@pytest.mark.parametrize("value", (0.0, -math.log(999), 2.5))
def test_logit_bias(value):
    logits = _randn(3, 10, seed=81)
    torch.testing.assert_close(LogitBias(value)(logits), logits + value, rtol=0, atol=0)


@pytest.mark.parametrize("b", (0.5, 0.0, -1.0, float("nan"), float("inf")))
def test_invalid_b_raises(b):
    with pytest.raises(ValueError):
        BcosConv2d(2, 3, 3, b=b)
    with pytest.raises(ValueError):
        BcosLinear(2, 3, b=b)
    with pytest.raises(ValueError):
        BcosConv2d.from_module(nn.Conv2d(2, 3, 3), b=b)
    with pytest.raises(ValueError):
        BcosLinear.from_module(nn.Linear(2, 3), b=b)


def test_b_one_accepted():
    assert BcosConv2d(2, 3, 3, b=1).b == 1.0
    assert BcosLinear(2, 3, b=1).b == 1.0


# --- 10: set_explanation_mode ----------------------------------------------------------------------

def test_set_explanation_mode():
    model = nn.Sequential(
        BcosConv2d(3, 4, 3, padding=1),
        UncenteredBatchNorm2d(4),
        gated(nn.GELU(), gelu_gate),
        nn.Sequential(DetachedGate(nn.Sigmoid(), lambda m, x: m(x)), DetachableGroupNorm(2, 4), nn.ReLU()),
        nn.Flatten(),
        DetachableLayerNorm(4 * 5 * 5),
        BcosLinear(4 * 5 * 5, 2),
    )
    detachable = [m for m in model.modules() if isinstance(m, DetachableModule)]
    assert len(detachable) == 7
    assert not any(m.explanation_mode for m in detachable)
    set_explanation_mode(model, True)
    assert all(m.explanation_mode for m in detachable)
    assert DetachableModule.explanation_mode is False  # set per instance, not on the class
    assert BcosConv2d(1, 1, 1).explanation_mode is False
    assert not hasattr(model[4], "explanation_mode")
    set_explanation_mode(model, False)
    assert not any(m.explanation_mode for m in detachable)
    set_explanation_mode(model[3], True)
    assert [m.explanation_mode for m in detachable] == [False, False, False, True, True, False, False]
