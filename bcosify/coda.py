"""The 9-layer CoDA-Net of the CIFAR-10 experiments of CoDA-Nets (Boehle, Fritz and Schiele, CVPR 2021), as a
reference model to train from scratch, with Dynamic Alignment Units or, on equal footing, B-cos layers.

The network: nine alignment convolutions (3x3 with zero padding 1, then a 1x1 to the classes) with strides
``[1, 1, 2, 1, 1, 2, 1, 1, 1]`` and ``[16, 16, 32, 32, 32, 64, 64, 64, classes]`` channels, no normalisation, no
activation (the units are the non-linearity), the sum of the class maps over all locations, logits divided by
the temperature (1000). It sees ``[x, 1 - x]`` (6 channels) of images in [0, 1], like every converted model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import BcosConfig
from .conversion import convert
from .model import BcosModel
from .nn import BcosConv2d, DauConv2d

KERNELS = (3,) * 8 + (1,)
STRIDES = (1, 1, 2, 1, 1, 2, 1, 1, 1)
CHANNELS = (16, 16, 32, 32, 32, 64, 64, 64)
#: the DAU rank of each layer, by its path in :class:`CodaNet9`
RANKS = {"features.0": 32, "features.1": 32, "*": 64}
TEMPERATURE = 1000.0


class CodaNet9(nn.Module):
    """The plain skeleton of the 9-layer CoDA-Net (bias-free convolutions, then the sum over all locations);
    :func:`coda_net9` turns it into the trainable model. ``bcosify.load(folder, model=CodaNet9(num_classes))``
    reloads a saved one."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        widths = (in_chans, *CHANNELS, num_classes)
        self.features = nn.Sequential(*[nn.Conv2d(c_in, c_out, k, s, padding=k // 2, bias=False)
                                        for c_in, c_out, k, s in zip(widths, widths[1:], KERNELS, STRIDES)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).sum((2, 3))


def coda_net9(num_classes: int = 10, unit: str = "dau", *, in_chans: int = 3, temperature: float = TEMPERATURE,
              **options: Any) -> BcosModel:
    """A freshly initialised 9-layer CoDA-Net as a :class:`~bcosify.BcosModel` (explain, fine-tune, save as any).

    ``unit="dau"`` gives the paper's ranks ``[32, 32, 64 x 7]``; ``unit="bcos"`` the same network of B-cos layers.
    ``options`` are further :class:`~bcosify.BcosConfig` options (``squash``, ``rank``, ``b``, ``logit_bias``, ...).

    The layers start as the reference code's do (:func:`init_dau_from_scratch`; B-cos layers:
    :func:`init_bcos_from_scratch`). The paper trains on CIFAR-10 with Adam at lr 2.5e-4, batch 16, BCE on one-hot
    targets with the logit bias ``log(0.1 / 0.9)`` (the default ``-log(C - 1)``), 200 epochs, the lr divided by 1.5
    every 30 epochs: ``bcosify.finetune(model, loader, lr=2.5e-4, loss="bce", agc_clip=None)``.
    """
    if unit == "dau":
        options.setdefault("rank", dict(RANKS))
    config = BcosConfig(unit=unit, temperature=temperature, mean=(0.0,) * in_chans, std=(1.0,) * in_chans,
                        **options)
    model = convert(CodaNet9(num_classes, in_chans), config)
    with torch.no_grad():  # random weights on both halves of [x, 1 - x] (folding mean 0 zeroes the second)
        nn.init.kaiming_uniform_(model.network.features[0].weight, a=math.sqrt(5))
        for layer in model.network.features:
            if isinstance(layer, DauConv2d):
                init_dau_from_scratch(layer)
            elif isinstance(layer, BcosConv2d) and not config.normalize_weights:
                init_bcos_from_scratch(layer, config.b)
    return model


@torch.no_grad()
def init_dau_from_scratch(layer: DauConv2d) -> DauConv2d:
    """The initialisation of the CoDA-Nets reference code, for a layer trained from scratch.

    There ``A`` is a bias-free convolution and ``w(p) = B (A p) + b`` a 1x1 convolution over the ``r`` basis
    coordinates with a bias, both with PyTorch's default initialisation: ``A`` uniform in ``+-1/sqrt(d)`` (``d`` the
    patch size; ours already is), and the entries of ``B`` and ``b`` uniform in ``+-1/sqrt(r)``; no gain.
    A converted layer instead starts from the pretrained ``b`` with ``B = 0`` and a gain that makes it compute the
    original layer; from scratch that start does not train: each layer then shrinks its input about 4x (``||b||``
    about 0.6, and the squashing's ``||w|| / (1 + ||w||^2)`` on top), nine layers leave logits about 1e-7 and
    gradients below Adam's epsilon. With this initialisation ``||w||`` is of the order of 1 and a layer shrinks its
    input about 1.5x (measured on Fashion-MNIST; ``rank`` here is the layer's, capped at its patch size).
    """
    bound = 1 / math.sqrt(layer.rank)
    nn.init.uniform_(layer.weight_b, -bound, bound)
    nn.init.uniform_(layer.weight, -bound, bound)
    layer.gain.fill_(1)
    return layer


@torch.no_grad()
def init_bcos_from_scratch(layer: BcosConv2d, b: float) -> BcosConv2d:
    """Rows of norm ``d^((b - 1) / (2 b))`` (``d`` the patch size), random directions, for a B-cos layer trained from
    scratch without normalisation layers: with random alignment (``|cos|`` about ``1 / sqrt(d)``) the layer's
    output ``|w.p| |w.p / ||p|| |^(b-1)`` then keeps the input's size. The default initialisation (rows of norm
    about 0.6) shrinks it about ``sqrt(d)``-fold per layer at ``b = 2``; nine layers and ``T = 1000`` leave
    gradients below Adam's epsilon, and the network does not train."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    d = layer.weight[0].numel()
    layer.weight.mul_(d ** ((b - 1) / (2 * b)) / layer.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))
    return layer
