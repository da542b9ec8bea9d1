"""DAU layers against a direct reference that materialises every dynamic weight ``w_j(p)`` (float64, tiny shapes).

The reference never calls into ``bcosify``: patches come from ``F.unfold``, ``w_j(p) = B_j A p + b_j`` is built
explicitly for every patch and unit, squashed, and dotted with the patch.
"""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from bcosify.nn import DauConv2d, DauLinear, set_explanation_mode
from bcosify.config import check_rank, check_squash

DT = torch.float64
EPS = 1e-6  # the layers' default eps
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Every test here uses tiny tensors."""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --- the materialising reference --------------------------------------------------------------------

def ref_squash(u: torch.Tensor, squash: str, eps: float = EPS) -> torch.Tensor:
    """``g(u)`` over the last dimension, with ``||u|| = sqrt(||u||^2 + eps)`` as in the layers."""
    sq = u.pow(2).sum(-1, keepdim=True)
    norm = (sq + eps).sqrt()
    return u * norm / (1 + sq) if squash == "squash" else u / norm


def ref_dau(patches: torch.Tensor, a: torch.Tensor, bmat: torch.Tensor, static: torch.Tensor, gain: torch.Tensor,
            squash: str, detach: bool = False) -> torch.Tensor:
    """Outputs ``gain_j g(w_j(p))^T p`` for patches ``(N, G, d, L)``, ``a`` ``(G, r, d)``, ``bmat`` ``(K, d, r)``,
    ``static`` ``(K, d)``: ``(N, K, L)``. With ``detach``, ``W_j(p) = gain_j g(w_j(p))`` is a constant."""
    n, groups, d, length = patches.shape
    units = static.shape[0]
    per_group = units // groups
    p = patches.permute(0, 3, 1, 2)  # (N, L, G, d)
    h = torch.einsum("nlgd,grd->nlgr", p, a)
    g_of_unit = torch.arange(units) // per_group
    w = torch.einsum("kdr,nlkr->nlkd", bmat, h[:, :, g_of_unit]) + static  # (N, L, K, d): materialised
    weights = gain.view(1, 1, units, 1) * ref_squash(w, squash)
    if detach:
        weights = weights.detach()
    return torch.einsum("nlkd,nlkd->nkl", weights, p[:, :, g_of_unit])


def ref_conv(layer: DauConv2d, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
    kh, kw = layer.kernel_size
    if layer.same_padding:
        x = timm.layers.pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    n, groups = x.shape[0], layer.groups
    patches = cols.view(n, groups, -1, cols.shape[-1])
    d = patches.shape[2]
    a = layer.weight_a.reshape(groups, layer.rank, d)
    bmat = layer.weight_b.reshape(layer.out_channels, layer.rank, d).transpose(1, 2)
    out = ref_dau(patches, a, bmat, layer.weight.reshape(layer.out_channels, d), layer.gain, layer.squash, detach)
    size = [(s + 2 * p - dl * (k - 1) - 1) // st + 1 for s, k, st, p, dl in
            zip(x.shape[-2:], (kh, kw), layer.stride, layer.padding, layer.dilation)]
    out = out.view(n, layer.out_channels, *size)
    return out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1)


def ref_linear(layer: DauLinear, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
    flat = x.reshape(-1, 1, x.shape[-1], 1)  # every vector one patch
    bmat = layer.weight_b.transpose(1, 2)
    out = ref_dau(flat, layer.weight_a.unsqueeze(0), bmat, layer.weight, layer.gain, layer.squash, detach)
    out = out.reshape(*x.shape[:-1], -1)
    return out if layer.bias is None else out + layer.bias


def _randomise(layer: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Non-zero ``B`` (and a gain away from 1), so that every term of the layer is exercised."""
    with torch.no_grad():
        layer.weight_b.copy_(scale * _randn(*layer.weight_b.shape, seed=seed))
        layer.gain.copy_(1 + _randn(*layer.gain.shape, seed=seed + 1).abs())
    return layer


CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), groups=2),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4),  # depthwise, multiplier 2
    dict(in_channels=4, out_channels=4, kernel_size=5, stride=2, padding=2, groups=4),  # depthwise
    dict(in_channels=6, out_channels=3, kernel_size=1),
    dict(in_channels=5, out_channels=3, kernel_size=2, stride=3, bias=True),
]


def _conv(case: dict, rank: int, squash: str, seed: int = 0, **extra) -> DauConv2d:
    return _randomise(DauConv2d(**case, rank=rank, squash=squash, generator=_gen(seed), dtype=DT, **extra),
                      seed=seed)


@pytest.mark.parametrize("squash", ["squash", "l2"])
@pytest.mark.parametrize("rank", [1, 3, 11])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_dau_conv2d_matches_materialising_reference(case, rank, squash, monkeypatch):
    monkeypatch.setattr("bcosify.nn.dau.RANK_CHUNK", 2)  # several chunks, the last one short
    layer = _conv(case, rank, squash)
    if case.get("bias"):
        torch.nn.init.normal_(layer.bias)
    x = _randn(2, case["in_channels"], 9, 8, seed=3)
    torch.testing.assert_close(layer(x), ref_conv(layer, x), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref_conv(layer, x), **TOL)


@pytest.mark.parametrize("kernel,stride,dilation,size", [(3, 2, 1, 9), (4, 2, 1, 8), (3, 1, 2, 7), (5, 3, 1, 10)])
def test_dau_conv2d_same_padding(kernel, stride, dilation, size):
    layer = _conv(dict(in_channels=3, out_channels=4, kernel_size=kernel, stride=stride, dilation=dilation), 5,
                  "squash", same_padding=True)
    x = _randn(2, 3, size, size + 1, seed=4)
    torch.testing.assert_close(layer(x), ref_conv(layer, x), **TOL)


@pytest.mark.parametrize("squash", ["squash", "l2"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)])
def test_dau_linear_matches_materialising_reference(shape, squash):
    layer = _randomise(DauLinear(7, 4, bias=True, rank=3, squash=squash, generator=_gen(0), dtype=DT))
    x = _randn(*shape, seed=2)
    torch.testing.assert_close(layer(x), ref_linear(layer, x), **TOL)


def test_rank_is_capped_at_the_patch_size():
    assert DauConv2d(4, 4, 3, groups=4, rank=32).rank == 9
    assert DauConv2d(4, 4, 3, rank=32).rank == 32
    assert DauLinear(5, 3, rank=32).rank == 5


@pytest.mark.parametrize("squash", ["squash", "l2"])
@pytest.mark.parametrize("case", CONV_CASES[:6], ids=str)
def test_gradcheck_dau_conv2d(case, squash, monkeypatch):
    monkeypatch.setattr("bcosify.nn.dau.RANK_CHUNK", 2)
    layer = _conv({**case, "bias": False}, 3, squash)
    x = _randn(1, case["in_channels"], 6, 5, seed=5).requires_grad_(True)

    def fn(x, static, a, b):
        return torch.func.functional_call(layer, {"weight": static, "weight_a": a, "weight_b": b}, (x,))

    params = [p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.weight_a, layer.weight_b)]
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("squash", ["squash", "l2"])
def test_gradcheck_dau_linear(squash):
    layer = _randomise(DauLinear(5, 3, rank=2, squash=squash, generator=_gen(0), dtype=DT))

    def fn(x, static, a, b):
        return torch.func.functional_call(layer, {"weight": static, "weight_a": a, "weight_b": b}, (x,))

    x = _randn(4, 5, seed=1).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.weight_a, layer.weight_b)]
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_match_reference_gradients():
    """Parameter and input gradients of the chunked, recomputed contraction equal the materialised ones."""
    case = dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2)
    layer = _conv(case, 3, "squash")
    x = _randn(2, 4, 7, 7, seed=6).requires_grad_(True)
    cot = _randn(2, 6, 4, 4, seed=7)
    params = [x, layer.weight, layer.weight_a, layer.weight_b]
    got = torch.autograd.grad((layer(x) * cot).sum(), params)
    expected = torch.autograd.grad((ref_conv(layer, x) * cot).sum(), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("squash", ["squash", "l2"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_dau_conv2d_explanation_mode(case, squash):
    """Explanation mode: the same output, input gradients equal the detached dynamic weights ``W(p)``, and (without
    bias) ``x * grad`` sums to the output."""
    layer = _conv(case, 3, squash)
    layer.bias = None
    x = _randn(2, case["in_channels"], 8, 7, seed=8).requires_grad_(True)
    set_explanation_mode(layer, True)
    out = layer(x)
    cot = _randn(*out.shape, seed=9)
    (grad,) = torch.autograd.grad((out * cot).sum(), x)
    ref = ref_conv(layer, x, detach=True)
    (ref_grad,) = torch.autograd.grad((ref * cot).sum(), x)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    torch.testing.assert_close((x * grad).sum(), (out * cot).sum(), rtol=1e-10, atol=0)
    set_explanation_mode(layer, False)
    (plain,) = torch.autograd.grad((layer(x) * cot).sum(), x)
    assert not torch.allclose(plain, grad), "the dynamic weight must matter outside explanation mode"


@pytest.mark.parametrize("squash", ["squash", "l2"])
def test_dau_linear_explanation_mode(squash):
    layer = _randomise(DauLinear(6, 3, rank=4, squash=squash, generator=_gen(0), dtype=DT))
    x = _randn(2, 5, 6, seed=10).requires_grad_(True)
    set_explanation_mode(layer, True)
    out = layer(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (ref_grad,) = torch.autograd.grad(ref_linear(layer, x, detach=True).sum(), x)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    torch.testing.assert_close((x * grad).sum(), out.sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("squash", ["squash", "l2"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_dau_conv2d_from_module_is_the_original_conv(case, squash):
    torch.manual_seed(0)
    conv = nn.Conv2d(**case, dtype=DT)
    with torch.no_grad():
        conv.weight[0].zero_()  # an all-zero unit stays exact
    x = _randn(2, case["in_channels"], 9, 8, seed=11)
    for keep_bias in (True, False):
        layer = DauConv2d.from_module(conv, rank=4, squash=squash, keep_bias=keep_bias)
        expected = F.conv2d(x, conv.weight, conv.bias if keep_bias else None, conv.stride, conv.padding,
                            conv.dilation, conv.groups)
        torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-15)
        assert not layer.weight_b.any() and layer.weight_a.any()


def test_dau_conv2d_from_tf_same_and_string_padding():
    torch.manual_seed(0)
    same = timm.layers.Conv2dSame(3, 4, 3, stride=2).double()
    x = _randn(1, 3, 9, 10, seed=12)
    layer = DauConv2d.from_module(same, keep_bias=True, same_padding=True)
    torch.testing.assert_close(layer(x), same(x), rtol=1e-13, atol=1e-15)
    conv = nn.Conv2d(3, 4, 3, padding="same", dilation=2).double()
    torch.testing.assert_close(DauConv2d.from_module(conv, keep_bias=True)(x), conv(x), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="only zero padding"):
        DauConv2d.from_module(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


def test_dau_linear_from_module_is_the_original_linear():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, dtype=DT)
    x = _randn(3, 2, 6, seed=13)
    for squash in ("squash", "l2"):
        layer = DauLinear.from_module(linear, rank=2, squash=squash, keep_bias=True)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-13, atol=1e-15)


def test_from_module_is_deterministic():
    conv = nn.Conv2d(3, 4, 3)
    a, b = DauConv2d.from_module(conv, seed=1), DauConv2d.from_module(conv, seed=1)
    assert torch.equal(a.weight_a, b.weight_a)
    assert not torch.equal(a.weight_a, DauConv2d.from_module(conv, seed=2).weight_a)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "4", None])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        check_rank(rank)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        DauLinear(3, 2, rank=rank)


def test_bad_squash_raises():
    with pytest.raises(ValueError, match=r"squash must be one of \('squash', 'l2'\), got 'tanh'"):
        check_squash("tanh")
    with pytest.raises(ValueError, match="squash must be one of"):
        DauConv2d(3, 2, 1, squash="L2")


def test_no_grad_forward_keeps_no_graph_and_no_full_rank_maps(monkeypatch):
    """The contraction never forms all ``K * rank`` products at once."""
    monkeypatch.setattr("bcosify.nn.dau.RANK_CHUNK", 2)
    layer = _conv(dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), 6, "squash")
    widths = []
    original = F.conv2d

    def spy(x, w, *args, **kwargs):
        widths.append(w.shape[0])
        return original(x, w, *args, **kwargs)

    monkeypatch.setattr("bcosify.nn.dau.F.conv2d", spy)
    with torch.no_grad():
        layer(_randn(1, 3, 6, 6, seed=14))
    assert max(widths) <= 5 * 2 and widths.count(5 * 2) >= 2
