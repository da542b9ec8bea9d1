"""Recipes: conversion and fine-tuning settings as data (YAML files shipped in ``bcosify/training/recipes/``),
one loader."""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import BcosConfig
from .config import FinetuneConfig
from .data import DataConfig

RECIPES = importlib.resources.files(__package__) / "recipes"  # package data: found in wheels and zip imports
_ORIGINAL_KEYS = {"epochs", "lr"}
_CALIBRATE_KEYS = {"images"}


@dataclass(frozen=True)
class Recipe:
    """A named set of settings: which model, which data, how to convert and how to fine-tune.

    ``calibrate: {images: N}``: after conversion, :func:`bcosify.calibrate` the model against the original on the
    first N training images (labels unused) before fine-tuning; absent, no calibration.
    """

    name: str
    description: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    original: dict[str, Any] = field(default_factory=dict)
    convert: dict[str, Any] = field(default_factory=dict)
    calibrate: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrate_images(self) -> int:
        """How many training images calibrate the converted model (0: no calibration)."""
        return int(self.calibrate.get("images", 0))


def list_recipes() -> list[str]:
    """Names of the recipes shipped with bcosify."""
    return sorted(p.name[:-len(".yaml")] for p in RECIPES.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a shipped recipe by name (``fashion-mnist``) or one from a YAML file, checking every option name."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {str(name_or_path)!r}; shipped recipes: {', '.join(list_recipes())}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping")
    known = {f for f in Recipe.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown or "name" not in raw or "model" not in raw:
        raise ValueError(f"recipe {str(path)!r}: unknown keys {unknown} or missing name/model; keys: {sorted(known)}")
    for section, allowed in (("data", set(DataConfig.option_names())), ("original", _ORIGINAL_KEYS),
                             ("calibrate", _CALIBRATE_KEYS),
                             ("convert", set(BcosConfig.option_names())),
                             ("finetune", set(FinetuneConfig.option_names()))):
        bad = sorted(set(raw.get(section) or {}) - allowed)
        if bad:
            raise ValueError(f"recipe {str(path)!r}: unknown {section} options {bad}; known: {sorted(allowed)}")
    BcosConfig(**(raw.get("convert") or {}))  # validate values now, not after an hour of training
    images = (raw.get("calibrate") or {}).get("images", 0)
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise ValueError(f"recipe {str(path)!r}: calibrate images must be a non-negative integer, got {images!r}")
    DataConfig(**(raw.get("data") or {}))
    FinetuneConfig(**(raw.get("finetune") or {}))
    return Recipe(name=raw["name"], description=raw.get("description", ""), model=raw["model"],
                  model_kwargs=raw.get("model_kwargs") or {}, data=raw.get("data") or {},
                  original=raw.get("original") or {}, convert=raw.get("convert") or {},
                  calibrate=raw.get("calibrate") or {}, finetune=raw.get("finetune") or {})
