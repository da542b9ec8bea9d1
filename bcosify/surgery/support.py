"""The support matrix: the architecture families bcosify claims, as package data (``supported.yaml``)."""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml
from torch import nn

SUPPORT_FILE = importlib.resources.files(__package__) / "supported.yaml"


def _torchvision_swin(v2: bool, **kwargs: Any) -> nn.Module:
    """torchvision's ``SwinTransformer`` (its V2 blocks and patch merging when ``v2``) with the given sizes; the
    builders ``swin_t`` ... ``swin_v2_b`` fix them."""
    from torchvision.models import swin_transformer as tv_swin

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if v2:
        kwargs.update(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2)
    return tv_swin.SwinTransformer(**kwargs)


def _torchvision_maxvit(**kwargs: Any) -> nn.Module:
    """torchvision's ``MaxVit`` with the given sizes; the builder ``maxvit_t`` fixes them."""
    from torchvision.models import maxvit as tv_maxvit

    kwargs = {k: list(v) if isinstance(v, tuple) and k != "input_size" else v for k, v in kwargs.items()}
    return tv_maxvit.MaxVit(**kwargs)


def _torchvision_vgg(cfg: str = "A", batch_norm: bool = False, hidden: int = 4096, **kwargs: Any) -> nn.Module:
    """torchvision's ``VGG`` (configuration ``cfg``: "A" is VGG-11) with ``hidden`` units in its classifier's two
    hidden layers; the builders ``vgg11`` ... ``vgg19_bn`` fix 4096 (120M parameters)."""
    from torchvision.models import vgg as tv_vgg

    model = tv_vgg.VGG(tv_vgg.make_layers(tv_vgg.cfgs[cfg], batch_norm=batch_norm), **kwargs)
    classifier = model.classifier  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
    for i, (n_in, n_out) in {0: (classifier[0].in_features, hidden), 3: (hidden, hidden),
                             6: (hidden, classifier[6].out_features)}.items():
        classifier[i] = nn.Linear(n_in, n_out)
    return model


def _torchvision_alexnet(hidden: int = 4096, **kwargs: Any) -> nn.Module:
    """torchvision's ``AlexNet`` with ``hidden`` units in its classifier's two hidden layers; the builder ``alexnet``
    fixes 4096 (57M parameters)."""
    from torchvision.models.alexnet import AlexNet

    model = AlexNet(**kwargs)
    classifier = model.classifier  # Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
    for i, (n_in, n_out) in {1: (classifier[1].in_features, hidden), 4: (hidden, hidden),
                             6: (hidden, classifier[6].out_features)}.items():
        classifier[i] = nn.Linear(n_in, n_out)
    return model


def _timm_class(model: nn.Module, name: str) -> nn.Module:
    """``model`` (a timm class built directly) with the pretrained config (normalization, input size) of the
    registered model ``name``."""
    import timm.models

    model.pretrained_cfg = timm.models.get_pretrained_cfg(name).to_dict()
    return model


def _timm_gmlp(**kwargs: Any) -> nn.Module:
    """timm's gMLP (``MlpMixer`` with spatial gating blocks) of any size; its builders (``gmlp_ti16_224``, ...) fix
    the patch size, depth and width."""
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return _timm_class(MlpMixer(block_layer=SpatialGatingBlock, mlp_layer=GatedMlp, **kwargs), "gmlp_ti16_224")


def _timm_focalnet(**kwargs: Any) -> nn.Module:
    """timm's ``FocalNet`` of any size; its builders (``focalnet_tiny_srf``, ...) fix the depths and width."""
    from timm.models.focalnet import FocalNet

    return _timm_class(FocalNet(**kwargs), "focalnet_tiny_srf")


#: small builders of architectures whose library builders take no size arguments (``builder:`` in the YAML)
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "torchvision_alexnet": _torchvision_alexnet,
    "torchvision_vgg": _torchvision_vgg,
    "torchvision_swin": lambda **kwargs: _torchvision_swin(False, **kwargs),
    "torchvision_swin_v2": lambda **kwargs: _torchvision_swin(True, **kwargs),
    "torchvision_maxvit": _torchvision_maxvit,
    "timm_gmlp": _timm_gmlp,
    "timm_focalnet": _timm_focalnet,
}


@dataclass(frozen=True)
class SupportedModel:
    """One claimed family, with the (small) model that tests it.

    Attributes:
        family: architecture family, e.g. ``"ResNet"``.
        spec: ``timm:NAME`` or ``torchvision:NAME``.
        size: test image size in pixels.
        kwargs: constructor arguments that make the test model small.
        builder: for an architecture whose library builder fixes its sizes (torchvision's ``swin_t``), the name of
            the small builder in :data:`BUILDERS` that builds the same architecture from ``kwargs``; ``None``:
            ``spec`` is built with ``kwargs``.
    """

    family: str
    spec: str
    size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)
    builder: str | None = None

    def build(self, **kwargs: Any) -> nn.Module:
        """The test model, randomly initialised; ``kwargs`` (e.g. ``num_classes``) are added to the row's (a deep
        copy of them: builders that consume nested arguments, like timm's block definitions, leave the row intact)."""
        kwargs = {**copy.deepcopy(self.kwargs), **kwargs}
        if self.builder is not None:
            return BUILDERS[self.builder](**kwargs)
        from ..weights import build_model

        return build_model(self.spec, weights=None, model_kwargs=kwargs)

    @property
    def library(self) -> str:
        return self.spec.partition(":")[0]

    @property
    def name(self) -> str:
        return self.spec.partition(":")[2]

    @property
    def kwargs_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())

    @property
    def id(self) -> str:
        return self.spec + (f"[{self.kwargs_text}]" if self.kwargs else "")


def list_supported(pattern: str = "*") -> list[SupportedModel]:
    """The claimed families whose spec or family name matches ``pattern`` (shell-style, case-insensitive), in the
    order of the README's support table; e.g. ``list_supported("timm:*")`` or ``list_supported("ViT*")``."""
    rows = yaml.safe_load(SUPPORT_FILE.read_text())
    out = []
    for row in rows:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (row.get("kwargs") or {}).items()}
        entry = SupportedModel(row["family"], row["spec"], row.get("size", 32), kwargs, row.get("builder"))
        if fnmatch.fnmatch(entry.spec.lower(), pattern.lower()) or fnmatch.fnmatch(entry.family.lower(),
                                                                                   pattern.lower()):
            out.append(entry)
    return out


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with random BatchNorm statistics and random values in its all-zero weights (a zero classifier or
    class token), so that an equivalence test on a randomly initialised model is not vacuous; in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                mean, var = m.running_mean, m.running_var
                mean.copy_(torch.randn(mean.shape, generator=generator, dtype=torch.float64).to(mean) * .1)
                var.copy_((torch.rand(var.shape, generator=generator, dtype=torch.float64) + .5).to(var))
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) * 0.02)
    return model
