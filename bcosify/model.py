"""``BcosModel``: a converted network with its input encoding, logit bias, config and report."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from . import __version__
from .config import BcosConfig
from .nn import BcosConv2d, BcosLinear, InputEncoder, LogitBias, set_explanation_mode
from .nn.base import DetachableModule
from .surgery.report import ConversionReport

FORMAT_VERSION = 1
RANGE_TOLERANCE = 1e-4


def check_images(x: Any, in_chans: int) -> None:
    """Raise a ``ValueError``/``TypeError`` unless ``x`` is a finite float batch ``(N, in_chans, H, W)`` in [0, 1].

    Value checks are skipped while ``torch.compile`` traces (they would break the graph).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {x.dtype} "
                         "(for uint8 images divide by 255)")
    if x.numel() == 0:
        raise ValueError(f"expected a non-empty batch, got shape {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf values")
    low, high = torch.aminmax(x.detach())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(f"expected un-normalised images in [0, 1], got values in [{low.item():.4g}, "
                         f"{high.item():.4g}]; the model folds the normalisation in itself")


class BcosModel(nn.Module):
    """A B-cos network made from a pretrained model by :func:`bcosify.convert`.

    ``forward(x)`` takes images in ``[0, 1]`` with the original channel count and returns logits,
    the fixed ``logit_bias`` included. It is dynamic linear: in :meth:`explanation_mode`,
    ``logits - logit_bias == W(z) . z + sum_p (dlogit/dp) . p`` with ``z = encode(x)`` and ``p`` the
    :attr:`constants` (positional embeddings and class/register tokens of transformers; none for CNNs).
    """

    def __init__(self, network: nn.Module, options: BcosConfig, report: ConversionReport, *, in_chans: int,
                 num_classes: int, logit_bias: float, source: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = InputEncoder()
        self.network = network
        self.bias = LogitBias(logit_bias)
        self.options = options
        self.report = report
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.source = dict(source or {})
        self.class_names: list[str] | None = None

    @property
    def logit_bias(self) -> float:
        return self.bias.value

    @property
    def constants(self) -> list[str]:
        """Paths (in :attr:`network`) of the parameters the network adds as constants, from the report."""
        return self.report.constants

    @property
    def b(self) -> float:
        return self.options.b

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model, as a JSON-serialisable dict."""
        return {
            "format_version": FORMAT_VERSION,
            "bcosify_version": __version__,
            "source": self.source,
            "options": self.options.to_dict(),
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "logit_bias": self.logit_bias,
            "class_names": self.class_names,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` (images in [0, 1]) and return its ``[x, 1 - x]`` encoding."""
        check_images(x, self.in_chans)
        return self.encoder(x)

    def forward_encoded(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (with the logit bias) from an already encoded input ``z``."""
        return self.bias(self.network(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encoded(self.encode(x))

    def set_b(self, value: float) -> None:
        """Set the alignment exponent of every B-cos layer."""
        self.options.b = BcosConfig(b=value).b
        for module in self.modules():
            if isinstance(module, (BcosConv2d, BcosLinear)):
                module.b = self.options.b

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
