"""``nn.Conv1d`` on the value path: the alignment convolution of its ``1 x k`` 2-d form (:class:`Conv1dAs2d`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bcosify
from bcosify.nn import BcosConv2d, Conv1dAs2d, DauConv2d


def _conv1d(**kwargs) -> nn.Conv1d:
    torch.manual_seed(0)
    return nn.Conv1d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 2, "dilation": 2,
                        "groups": 2, **kwargs}).double()


def test_b1_with_bias_computes_the_conv1d():
    conv = _conv1d()
    new = Conv1dAs2d(BcosConv2d.from_module(Conv1dAs2d.conv2d_of(conv), b=1.0, keep_bias=True))
    x = torch.randn(2, 4, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), conv(x), rtol=1e-12, atol=1e-12)


def test_strided_or_string_padded_conv1d_is_refused():
    with pytest.raises(ValueError, match="stride-1"):
        Conv1dAs2d.conv2d_of(_conv1d(stride=2))
    with pytest.raises(ValueError, match="stride-1"):
        Conv1dAs2d.conv2d_of(_conv1d(padding="same", dilation=1))


class _TokenMixer(nn.Module):
    """A Conv1d over tokens on the value path (CoaT's aggregation of class tokens is one)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Conv1d(4, 2, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2)[:, :, :4].transpose(1, 2)  # 4 tokens of 8 channels
        return self.head(self.mix(t).mean(1))


@pytest.mark.parametrize("unit, layer", [({}, BcosConv2d), ({"unit": "dau", "rank": 1}, DauConv2d)])
def test_a_conv1d_on_the_value_path_converts_exactly(unit, layer):
    torch.manual_seed(0)
    original = _TokenMixer().double().eval()
    bmodel = bcosify.convert(original, mean=0.5, std=0.25, verify=True, **unit)
    assert isinstance(bmodel.network.mix, Conv1dAs2d) and isinstance(bmodel.network.mix.conv, layer)
    (entry,) = bmodel.report.by_action("verified")
    assert "equivalence" in entry.note
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    e = bcosify.explain(bmodel.eval(), x)
    assert bool((e.explained_logit.abs() > 0).all()) and e.completeness_error.max().item() < 1e-10
