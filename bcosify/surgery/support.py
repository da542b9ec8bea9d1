"""The support matrix: the architecture families bcosify claims, as package data (``supported.yaml``)."""

from __future__ import annotations

import fnmatch
import importlib.resources
from dataclasses import dataclass, field
from typing import Any

import yaml

SUPPORT_FILE = importlib.resources.files(__package__) / "supported.yaml"


@dataclass(frozen=True)
class SupportedModel:
    """One claimed family, with the (small) model that tests it.

    Attributes:
        family: architecture family, e.g. ``"ResNet"``.
        spec: ``timm:NAME`` or ``torchvision:NAME``.
        size: test image size in pixels.
        kwargs: constructor arguments that make the test model small.
    """

    family: str
    spec: str
    size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)

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
        entry = SupportedModel(row["family"], row["spec"], row.get("size", 32), kwargs)
        if fnmatch.fnmatch(entry.spec.lower(), pattern.lower()) or fnmatch.fnmatch(entry.family.lower(),
                                                                                   pattern.lower()):
            out.append(entry)
    return out
