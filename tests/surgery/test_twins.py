"""timm's Twins: the model read by hand, its locally grouped attention (fused qkv) and its global sub-sampled
attention (q on the input; k, v from one kv linear on a strided convolution of the input)."""

from __future__ import annotations

import pytest
import timm
import timm.models.twins as timm_twins
import torch
from torch import nn

import bcosify
from bcosify.errors import ConversionError
from bcosify.explanation.checks import equivalence_error
from bcosify.nn import BcosConv2d, BcosLinear, DetachableLayerNorm, GatePath, SplitQKV
from bcosify.surgery.support import randomised
from helpers import assert_batch_matches_single

SIZE = 32


def _twins(**kwargs) -> nn.Module:
    """Two blocks per stage: locally grouped attention (windows of 3 over 8x8 tokens: zero-padded) then global
    sub-sampled attention (``sr`` strides 8, 4, 2; none in the last stage)."""
    torch.manual_seed(0)
    args = dict(img_size=SIZE, depths=(2, 2, 2, 2), embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 1, 2),
                wss=(3, 2, 2, 2), mlp_ratios=(2, 2, 2, 2), num_classes=10)
    return randomised(timm.create_model("twins_svt_small", **{**args, **kwargs}).double().eval())


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_split_kv_equals_the_fused_linear_and_needs_two_equal_parts():
    torch.manual_seed(0)
    kv = nn.Linear(4, 6).double()
    split = SplitQKV.from_weights(kv.weight.detach(), kv.bias.detach(), lambda v: v, parts=2)
    assert split.parts == 2 and split.qk.module.out_features == 3 and split.v.out_features == 3
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(split(x), kv(x), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="2 equal parts"):
        SplitQKV.from_weights(torch.randn(5, 4), None, lambda v: v, parts=2)


def test_attentions_are_split_into_gates_and_value_path():
    bmodel = bcosify.convert(_twins())
    net = bmodel.network
    local, glob, last = net.blocks[0][0].attn, net.blocks[0][1].attn, net.blocks[3][1].attn
    assert type(local) is timm_twins.LocallyGroupedAttn and type(glob) is timm_twins.GlobalSubSampleAttn
    assert isinstance(local.qkv, SplitQKV) and local.qkv.parts == 3 and isinstance(local.qkv.v, BcosLinear)
    assert isinstance(glob.q, GatePath)  # queries: a gate
    assert isinstance(glob.kv, SplitQKV) and glob.kv.parts == 2 and isinstance(glob.kv.qk, GatePath)
    assert isinstance(glob.kv.v, BcosLinear) and glob.kv.v.bias is None
    assert isinstance(glob.sr, BcosConv2d) and isinstance(glob.norm, DetachableLayerNorm)  # v's path
    assert last.sr is None and isinstance(last.kv, SplitQKV)
    entries = {e.path: e for e in bmodel.report.entries}
    assert entries["blocks.0.1.attn.kv"].action == "replaced" and entries["blocks.0.1.attn.q"].action == "gated"


def test_b1_with_biases_equals_the_original_also_at_another_size():
    model = _twins()
    other = torch.rand(2, 3, 48, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for x in (_images(3), other):  # (another grid: other window paddings, other sub-sampled key counts)
        assert equivalence_error(model, x) < 1e-10


@pytest.mark.parametrize("b", [1.0, 2.0])
def test_explanations_are_complete_per_sample(b, one_thread):
    bmodel = bcosify.convert(_twins(), b=b)
    bmodel = bcosify.calibrate(bmodel, _images(4, seed=7), progress=False)  # (finds v in the split kv too)
    x = _images(3)
    e = bcosify.explain(bmodel, x)
    assert e.completeness_error.max() < 1e-6
    assert bool((e.explained_logit.abs() > 1e-6).all())
    assert_batch_matches_single(bmodel, x, e.target, ("contributions",), rtol=1e-9)


def test_subsample_attention_with_an_unknown_child_is_refused_by_name():
    model = _twins()
    model.blocks[0][1].attn.extra = nn.Identity()
    with pytest.raises(ConversionError, match=r"blocks\.0\.1\.attn\.extra \(Identity\)"):
        bcosify.convert(model)
