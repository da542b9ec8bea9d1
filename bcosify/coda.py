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
from .nn import DauConv2d

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
                layer.gain.fill_(1)  # the paper's units (a converted layer's gain only makes it start as the original)
    return model
