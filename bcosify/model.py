"""``BcosModel``: a converted network with its input encoding, logit bias, resolved config and report."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn

from .config import BcosConfig
from .nn import BcosConv2d, BcosLinear, InputEncoder, LogitBias, check_images, set_explanation_mode
from .nn.base import DetachableModule
from .surgery.report import ConversionReport


class BcosModel(nn.Module):
    """A B-cos network made from a pretrained model by :func:`bcosify.convert`.

    ``forward(x)`` takes images in ``[0, 1]`` with the original channel count and returns logits,
    the fixed ``logit_bias`` included. It is dynamic linear: in :meth:`explanation_mode`,
    ``logits - logit_bias == W(z) . z + sum_p (dlogit/dp) . p`` with ``z = encode(x)`` and ``p`` the
    :attr:`constants` (positional embeddings and class/register tokens of transformers; none for CNNs).

    ``config`` is the resolved :class:`BcosConfig` (every value derived from the original model filled in):
    with the weights, it is all :func:`bcosify.load` needs.
    """

    def __init__(self, network: nn.Module, config: BcosConfig, report: ConversionReport) -> None:
        super().__init__()
        missing = [name for name in ("in_chans", "num_classes", "logit_bias", "mean", "std")
                   if getattr(config, name) is None]
        if missing:
            raise ValueError(f"BcosModel needs a resolved config (from bcosify.convert); unset: {missing}")
        self.encoder = InputEncoder()
        self.network = network
        self.bias = LogitBias(config.logit_bias, config.temperature)
        self.config = config
        self.report = report

    @property
    def logit_bias(self) -> float:
        return self.config.logit_bias

    @property
    def in_chans(self) -> int:
        return self.config.in_chans

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.config.class_names

    @property
    def b(self) -> float:
        return self.config.b

    @property
    def options(self) -> BcosConfig:
        """Deprecated name of :attr:`config`."""
        warnings.warn("BcosModel.options is deprecated; use BcosModel.config", DeprecationWarning, stacklevel=2)
        return self.config

    @property
    def constants(self) -> list[str]:
        """Paths (in :attr:`network`) of the parameters the network adds as constants, and of the modules whose
        outputs it adds as constants, from the report."""
        return self.report.constants

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` (images in [0, 1]) and return its ``[x, 1 - x]`` encoding."""
        check_images(x, self.in_chans)
        return self.encoder(x)

    def forward_encoded(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (with the logit bias) from an already encoded input ``z``."""
        return self.bias(self.network(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encoded(self.encode(x))

    @property
    def unit(self) -> str:
        """The alignment unit of the model's layers: ``"bcos"`` or ``"dau"``."""
        return self.config.unit

    def set_b(self, value: float) -> None:
        """Set the alignment exponent of every B-cos layer (a DAU model has none: only its default is accepted)."""
        if self.unit != "bcos" and float(value) != self.config.b:
            raise ValueError(f"b is the exponent of B-cos layers; this model's layers are unit={self.unit!r} "
                             f"(got b={value:g})")
        self.config.b = BcosConfig(b=value).b
        for module in self.modules():
            if isinstance(module, (BcosConv2d, BcosLinear)):
                module.b = self.config.b

    def set_temperature(self, value: float) -> None:
        """Set the logit temperature: every logit is divided by it (before the logit bias is added)."""
        self.config.temperature = BcosConfig(temperature=value).temperature
        self.bias.temperature = self.config.temperature

    @contextlib.contextmanager
    def explanation_mode(self) -> Iterator["BcosModel"]:
        """Within this context, dynamic weights are detached so that input gradients are ``W(x)``."""
        previous = {m: m.explanation_mode for m in self.modules() if isinstance(m, DetachableModule)}
        set_explanation_mode(self, True)
        try:
            yield self
        finally:
            for module, flag in previous.items():
                module.explanation_mode = flag
