"""``bcosify.convert``: one call from a pretrained model (or a model spec) to a ``BcosModel``."""

from __future__ import annotations

import copy
import os
from typing import Any

from torch import nn

from .config import BcosConfig
from .errors import ConversionError
from .model import BcosModel
from .surgery.engine import convert_modules, default_logit_bias, replace_classifier, resolve_normalisation, trace

HUB = "hub"
SPEC_SOURCES = ("timm", "torchvision")


def build_model(spec: str, weights: str | os.PathLike | None = HUB, model_kwargs: dict[str, Any] | None = None,
                key_map: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` (``"timm:NAME"`` or ``"torchvision:NAME"``).

    ``weights="hub"`` downloads the pretrained weights, ``None`` leaves them random, and a path loads a local
    checkpoint (safetensors, or ``.pth`` read with ``weights_only=True``).
    """
    source, sep, name = spec.partition(":")
    if not sep or source not in SPEC_SOURCES or not name:
        raise ValueError(f"unknown model spec {spec!r}: expected 'timm:NAME' or 'torchvision:NAME'")
    kwargs = dict(model_kwargs or {})
    hub = isinstance(weights, str) and weights == HUB
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
        model = timm.create_model(name, pretrained=hub, **kwargs)
    else:
        import torchvision.models as tvm

        if name not in tvm.list_models():
            raise ValueError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
        model = tvm.get_model(name, weights="DEFAULT" if hub else None, **kwargs)
    if weights is not None and not hub:
        from .checkpoints import load_weights, read_state_dict

        load_weights(model, read_state_dict(weights), key_map=key_map)
    return model


def convert(model: nn.Module | str, *, b: float = 2.0, keep_bias: bool = False, mean=None, std=None,
            num_classes: int | None = None, strict: bool = True, weights: str | os.PathLike | None = HUB,
            model_kwargs: dict[str, Any] | None = None, key_map: str | None = None, **options: Any) -> BcosModel:
    """Convert a pretrained image classifier into a B-cos network.

    Args:
        model: an ``nn.Module`` (never modified) or a spec ``"timm:NAME"`` / ``"torchvision:NAME"``.
        b: alignment exponent (1 keeps the plain layers).
        keep_bias: keep the biases (with ``b=1`` the result computes the original logits).
        mean, std: the original input normalisation (default: from the model's metadata).
        num_classes: replace the classifier with a fresh one of this size.
        strict: refuse modules that cannot be converted exactly (else leave and report them).
        weights, model_kwargs, key_map: for a spec only; see :func:`build_model`.
        **options: the other fields of :class:`BcosConfig` (``normalize_weights``, ``logit_bias``,
            ``maxpool_to_avgpool``, ``gap_reorder``, ``token_pool``).

    Returns:
        a :class:`BcosModel`; ``.report`` says what happened to every module.
    """
    unknown = sorted(set(options) - set(BcosConfig.option_names()))
    if unknown:
        raise TypeError(f"unknown conversion options {unknown}; known: {BcosConfig.option_names()}")
    config = BcosConfig(b=b, keep_bias=keep_bias, mean=mean, std=std, num_classes=num_classes, strict=strict,
                        **options)
    if isinstance(model, BcosModel):
        raise ConversionError("this model is already a BcosModel; convert the original model instead")
    if isinstance(model, str):
        source = {"spec": model, "model_kwargs": dict(model_kwargs or {})}
        network = build_model(model, weights, model_kwargs, key_map)
    elif isinstance(model, nn.Module):
        if model_kwargs or key_map or (weights is not None and weights != HUB):
            raise TypeError("weights, model_kwargs and key_map apply to model specs only; load weights into "
                            "the module yourself")
        source = {"spec": None, "class": f"{type(model).__module__}.{type(model).__qualname__}"}
        network = copy.deepcopy(model)
    else:
        raise TypeError(f"model must be an nn.Module or a spec string, got {type(model).__name__}")
    if any(type(m) is BcosModel or type(m).__module__.startswith("bcosify.nn") for m in network.modules()):
        raise ConversionError("this model already contains bcosify layers; convert the original model instead")

    info = trace(network)
    if source.get("spec") is None:
        source.update(_timm_spec(network, info.in_chans, info.num_classes))
    mean, std, norm_source = resolve_normalisation(network, config, info.in_chans)
    config.mean, config.std = mean, std
    num_classes_out = info.num_classes
    if config.num_classes is not None and config.num_classes != info.num_classes:
        if info.classifier_path is None:
            raise ConversionError("num_classes was given but the model has no Linear classifier to replace")
        replace_classifier(network, info.classifier_path, config.num_classes)
        info = trace(network)
        num_classes_out = config.num_classes
    if config.token_pool == "mean":
        from .surgery.adapters import pool_patch_tokens

        pool_patch_tokens(network)
        info = trace(network)
    if config.gap_reorder:
        from .surgery.adapters import reorder_classifier_before_pooling

        reorder_classifier_before_pooling(network, info)
        info = trace(network)
    report = convert_modules(network, config, info)
    source["normalisation_from"] = norm_source
    bmodel = BcosModel(network, config, report, in_chans=info.in_chans, num_classes=num_classes_out,
                       logit_bias=default_logit_bias(config, num_classes_out), source=source)
    return bmodel.train(model.training if isinstance(model, nn.Module) else False)


def _timm_spec(model: nn.Module, in_chans: int, num_classes: int) -> dict[str, Any]:
    """The spec that rebuilds a timm model instance (so ``bcosify.load`` needs no skeleton), if it is one."""
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture or not type(model).__module__.startswith("timm."):
        return {}
    return {"spec": f"timm:{architecture}", "model_kwargs": {"in_chans": in_chans, "num_classes": num_classes},
            "spec_inferred": True}
