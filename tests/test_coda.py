"""The 9-layer CoDA-Net reference model (DAU or B-cos layers), and per-layer DAU ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bcosify
from bcosify import BcosConfig, ConversionError
from bcosify.coda import CHANNELS, STRIDES, CodaNet9, coda_net9
from bcosify.nn import BcosConv2d, DauConv2d
from helpers import randomise_dau_layers


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Small networks."""


def test_architecture_of_the_paper():
    torch.manual_seed(0)
    model = coda_net9(10)
    layers = list(model.network.features)
    assert all(type(m) is DauConv2d for m in layers) and len(layers) == 9
    assert [m.out_channels for m in layers] == [*CHANNELS, 10]
    assert [m.stride[0] for m in layers] == list(STRIDES)
    assert [m.kernel_size[0] for m in layers] == [3] * 8 + [1]
    assert [m.rank for m in layers] == [32, 32] + [64] * 7
    assert layers[0].in_channels == 6 and bool(layers[0].weight[:, 3:].any()), "both halves of [x, 1-x] random"
    assert model.config.temperature == 1000.0 and model.unit == "dau"
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    bcos = coda_net9(10, unit="bcos")
    assert all(type(m) is BcosConv2d for m in bcos.network.features) and bcos.b == 2.0


@pytest.mark.parametrize("unit", ["dau", "bcos"])
def test_completeness_float64(unit):
    torch.manual_seed(0)
    model = coda_net9(10, unit=unit).double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    if unit == "dau":
        randomise_dau_layers(model, x)
    e = bcosify.explain(model, x)
    assert bool((e.explained_logit.abs() > 0).all())
    assert e.completeness_error.max().item() < 1e-10


def test_gradients_reach_every_parameter():
    """One BCE step (logits / T, one-hot targets) gives finite, non-zero gradients to every parameter: from scratch
    ``B`` starts random (the reference code's initialisation), so ``A`` learns from the first step."""
    torch.manual_seed(0)
    model = coda_net9(4).train()
    assert all(bool((m.gain == 1).all()) for m in model.network.features), "the paper's units: no gain"
    assert all(bool(m.weight_b.any()) for m in model.network.features), "B starts random"
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    F.binary_cross_entropy_with_logits(model(x), F.one_hot(y, 4).float()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert bool(p.grad.any()), name


@pytest.mark.parametrize("unit", ["dau", "bcos"])
def test_a_few_adam_steps_reduce_the_loss(unit):
    """From scratch the network trains: logits / 1000 after nine layers must keep gradients well above Adam's
    epsilon (the converted-layer start, ``B = 0`` with gains, left them about 1e-10 and the loss flat)."""
    torch.manual_seed(0)
    model = coda_net9(4, unit=unit, in_chans=1).train()
    x, y = torch.rand(8, 1, 16, 16), torch.arange(8) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.binary_cross_entropy_with_logits(model(x), F.one_hot(y, 4).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01 and losses == sorted(losses, reverse=True), losses


def test_save_and_load_with_the_skeleton(tmp_path):
    torch.manual_seed(0)
    model = coda_net9(5, squash="l2").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    bcosify.save(model, tmp_path / "coda")
    loaded = bcosify.load(tmp_path / "coda", model=CodaNet9(5))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config == model.config and loaded.config.rank == {"features.0": 32, "features.1": 32, "*": 64}


@pytest.mark.parametrize("rank, message", [
    ({}, "a rank mapping needs module path patterns"),
    ({3: 4}, "a rank mapping needs module path patterns"),
    ({"*": 0}, "rank must be an integer >= 1, got 0"),
])
def test_bad_rank_mappings(rank, message):
    with pytest.raises(ValueError, match=message):
        BcosConfig(unit="dau", rank=rank)


def test_a_rank_mapping_must_cover_every_layer():
    assert BcosConfig(unit="dau", rank={"a.*": 2, "*": 3}).rank_at("a.b") == 2
    assert BcosConfig(unit="dau", rank={"a.*": 2, "*": 3}).rank_at("b") == 3
    with pytest.raises(ConversionError, match="features.2 \\(Conv2d\\): no rank for the layer 'features.2'"):
        bcosify.convert(CodaNet9(3), unit="dau", rank={"features.[01]": 2}, mean=0, std=1)
