"""``bcosify.convert``: one call from a pretrained model (or a model spec) to a ``BcosModel``."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from torch import nn

from .config import BcosConfig
from .errors import ConversionError
from .model import BcosModel
from .nn import BcosConv2d, fold_input_normalization, resolve_normalization
from .surgery.engine import convert_modules, replace_classifier
from .surgery.report import CONSTANT, FOLDED, KEPT, SHIFTED, ConversionReport, type_name
from .surgery.rules import DESCEND, FIRST_LAYER_TYPES, PLAIN_CONVS, RULES, Rule
from .surgery.trace import trace
from .training.calibration import calibrate as calibrate_model
from .utils import copy_module, eval_mode
from .weights import HUB, build_model


def convert(model: nn.Module | str, config: BcosConfig | None = None, *, weights: str | os.PathLike | None = HUB,
            model_kwargs: dict[str, Any] | None = None, key_map: str | None = None,
            rules: Mapping[type, Rule] | None = None, verify: bool | None = None, calibrate: Any = None,
            **options: Any) -> BcosModel:
    """Convert a pretrained image classifier into a B-cos network.

    Args:
        model: an ``nn.Module`` (never modified) or a spec: ``"timm:NAME"``, ``"hf-hub:ORG/NAME"`` or
            ``"torchvision:NAME"``.
        config: a :class:`BcosConfig`; ``**options`` (its field names: ``b``, ``keep_bias``, ``mean``, ``std``,
            ``num_classes``, ``strict``, ``normalize_weights``, ``logit_bias``, ``maxpool_to_avgpool``,
            ``gap_reorder``, ``token_pool``, ``padding_mode``, ``padding_layers``, ``class_names``) override its values.
        weights, model_kwargs, key_map: for a spec only; see :func:`bcosify.weights.build_model`.
        rules: extra ``{exact module type: Rule}`` entries for this call only (they take precedence over the
            built-in table; see :mod:`bcosify.surgery.rules`).
        verify: check the conversion on a float64 copy and a small random input: equivalence at b=1 with biases
            and completeness at b=2, recorded in the report; a failure raises ``ConversionError`` naming the first
            module whose output diverges. Default: whenever a container was read from its graph or ``rules``
            were given.
        calibrate: unlabelled images in [0, 1] (a batch, or an iterable of batches): calibrate the converted
            model on them against the original (see :func:`bcosify.calibrate`), so that it is usable at once.

    Returns:
        a :class:`BcosModel` whose ``config`` holds every resolved value; ``.report`` says what happened to every
        module.
    """
    config = (config if config is not None else BcosConfig()).replace(**options)
    if isinstance(model, BcosModel):
        raise ConversionError("this model is already a BcosModel; convert the original model instead")
    if isinstance(model, str):
        network = build_model(model, weights, model_kwargs, key_map)
        config = config.replace(spec=model, model_kwargs=dict(model_kwargs or {}))
    elif isinstance(model, nn.Module):
        if model_kwargs or key_map or (weights is not None and weights != HUB):
            raise TypeError("weights, model_kwargs and key_map apply to model specs only; load weights into "
                            "the module yourself")
        network = copy_module(model)
    else:
        raise TypeError(f"model must be an nn.Module or a spec string, got {type(model).__name__}")
    if any(type(m) is BcosModel or type(m).__module__.startswith("bcosify.nn") for m in network.modules()):
        raise ConversionError("this model already contains bcosify layers; convert the original model instead")

    original = model if isinstance(model, nn.Module) else copy_module(network) if calibrate is not None else None
    info = trace(network)
    if config.in_chans is not None and config.in_chans != info.in_chans:
        raise ConversionError(f"the config is for {config.in_chans} input channels but the model takes {info.in_chans}")
    if config.spec is None:
        config = config.replace(**_timm_spec(network, info.in_chans, info.num_classes))
    mean, std, norm_from = resolve_normalization(network, config.mean, config.std, info.in_chans)
    if config.mean is not None and config.normalization_from:
        norm_from = config.normalization_from  # a saved config: keep where the values first came from
    num_classes = config.num_classes if config.num_classes is not None else info.num_classes
    if num_classes != info.num_classes:
        if info.classifier_path is None:
            raise ConversionError("num_classes was given but the model has no Linear classifier to replace")
        replace_classifier(network, info.classifier_path, num_classes)
        info = trace(network)
    if config.token_pool == "mean":
        from .surgery.adapters import pool_patch_tokens

        pool_patch_tokens(network)
        info = trace(network)
    if config.gap_reorder:
        from .surgery.adapters import reorder_classifier_before_pooling

        reorder_classifier_before_pooling(network, info)
        info = trace(network)
    if config.padding_mode == "constant":  # the padding colour: the normalization mean unless given
        value = config.padding_value or mean
        if len(value) == 1 and len(mean) > 1:
            value = value * len(mean)
        if len(value) != len(mean):
            raise ConversionError(f"padding_value has {len(value)} values but the model takes {len(mean)} channels")
        config = config.replace(padding_value=value)
    config = config.replace(mean=mean, std=std, normalization_from=norm_from, num_classes=num_classes,
                            in_chans=info.in_chans, logit_bias=_logit_bias(config, num_classes),
                            model_class=config.model_class or type_name(model if isinstance(model, nn.Module)
                                                                        else network))
    if verify is None:  # by default, whenever a forward will be read from its graph or a user rule applies
        verify = bool(rules) or _has_unruled_container(network, {**RULES, **(rules or {})})
    prepared = copy_module(network) if verify else None
    bmodel = _convert_prepared(network, config, info, rules)
    if verify:
        from .surgery.verify import verify_conversion

        bmodel.report.entries.append(verify_conversion(prepared, config, info.size,
                                                       lambda net, cfg: _convert_prepared(net, cfg, trace(net), rules)))
    if calibrate is not None:
        calibrate_model(bmodel, calibrate, original=original)
    return bmodel.train(model.training if isinstance(model, nn.Module) else False)


def _has_unruled_container(module: nn.Module, table: Mapping[type, Rule]) -> bool:
    """Whether the engine's walk meets a module no rule names (whose forward it will read)."""
    rule = table.get(type(module))
    if rule is None:
        return True
    return rule.action == DESCEND and any(_has_unruled_container(c, table) for c in module.children())


def _convert_prepared(network: nn.Module, config: BcosConfig, info, rules: Mapping[type, Rule] | None) -> BcosModel:
    """The conversion proper, of a network whose classifier and pooling are final and config resolved."""
    from .surgery.adapters import fold_input_transform

    mean, std = fold_input_transform(network, config.mean, config.std)  # (the normalization as given, usually)
    for path in info.first_layer_paths:
        _encode_first_layer(network, path, mean, std, info.first_layer_blocks.get(path, 1))
    folded = (mean, std) != (tuple(config.mean), tuple(config.std))
    network, report = convert_modules(network, config, info, rules)
    if folded:
        report.add("", network, FOLDED, note=f"its transform_input (a fixed per-channel map of the normalized input) "
                   f"folded into the input normalization: mean {_rounded(mean)}, std {_rounded(std)}; switched off")
    if config.padding_mode != "zeros":
        _set_padding(network, info.first_layer_paths, config, report)
    if config.center_grid:
        _center_grid(network, config, info.size, report)
    return BcosModel(network, config, report)


#: modules that downsample by a stride (the grid shift handles convolutions only)
_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _center_grid(network: nn.Module, config: BcosConfig, size: int, report: ConversionReport) -> None:
    """Shift the last stride-2 layers by one position (``config.center_grid``); refuse what it cannot shift."""
    seen: list[tuple[str, nn.Module, int]] = []  # (path, module, input height)
    handles = [m.register_forward_pre_hook(lambda m, args, path=path: seen.append((path, m, args[0].shape[-2])))
               for path, m in network.named_modules() if isinstance(m, _STRIDED)]
    weight = next(network.parameters())
    try:
        with torch.no_grad(), eval_mode(network):  # (training mode would update BatchNorm statistics)
            network(torch.zeros(1, 2 * config.in_chans, size, size, dtype=weight.dtype, device=weight.device))
    finally:
        for handle in handles:
            handle.remove()

    def stride(m: nn.Module) -> int:
        s = m.stride if isinstance(m.stride, (tuple, list)) else (m.stride, m.stride)
        return max(s)

    strided = [(path, m, h) for path, m, h in seen if stride(m) > 1]
    if not strided:
        if config.center_grid == "auto":
            report.add("", network, KEPT, note="center_grid='auto': no strided layer, no grid to shift")
            return
        raise ConversionError("center_grid=True needs a network that downsamples with strided convolutions; "
                              "this one has none")
    smallest = min(h for _, _, h in strided)
    last = [(path, m) for path, m, h in strided if h == smallest]
    for path, m in last:
        if not isinstance(m, BcosConv2d) or m.same_padding or stride(m) != 2:
            blocker = (f"{path} ({type_name(m)}, stride {stride(m)}) is part of it: only stride-2 B-cos "
                       "convolutions with explicit padding can be shifted")
            if config.center_grid == "auto":
                report.add(path, m, KEPT, note=f"center_grid='auto': grid left as is; the last downsampling "
                                               f"cannot be shifted: {blocker}")
                return
            raise ConversionError(f"center_grid=True shifts the last downsampling, and {blocker}")
    for path, m in last:
        m.set_grid_shift(1)
        report.add(path, m, SHIFTED, note="center_grid: samples one position later (output grid centred)")


def _set_padding(network: nn.Module, first_layer_paths: tuple[str, ...], config: BcosConfig,
                 report: ConversionReport) -> None:
    """Give the first (or every) B-cos convolution ``config.padding_mode``."""
    if config.padding_layers == "first":
        convs = [network.get_submodule(path) for path in first_layer_paths]
        for path, first in zip(first_layer_paths, convs):
            if not isinstance(first, BcosConv2d):
                raise ConversionError(f"padding_mode={config.padding_mode!r} needs a convolution as the first layer; "
                                      f"{path} is a {type(first).__name__}")
    else:
        convs = [m for m in network.modules() if isinstance(m, BcosConv2d)]
    if config.padding_mode != "constant":
        for conv in convs:
            conv.set_padding(config.padding_mode)
        return
    colour = torch.tensor(config.padding_value, dtype=torch.float64)
    for path, conv in zip(first_layer_paths, convs):
        if conv.in_channels != 2 * len(colour):
            raise ConversionError(f"padding_mode='constant' needs a first layer over the [x, 1 - x] image; {path} "
                                  f"takes {conv.in_channels} channels (a space-to-depth stem is not supported)")
        conv.set_padding("constant", torch.cat([colour, 1 - colour]))
        report.add(f"{path}.padding_value", conv.padding_value, CONSTANT,
                   note="padding colour [v, 1 - v] of the encoded image, explained as constant_contribution")


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _encode_first_layer(network: nn.Module, path: str, mean, std, space_to_depth: int = 1) -> None:
    """Replace a layer that takes the image (rearranged by a ``space_to_depth`` block size) by one over
    ``[x, 1 - x]`` with the normalization folded in; refuse one that cannot take it."""
    first = network.get_submodule(path)
    if type(first) in PLAIN_CONVS:
        first = PLAIN_CONVS[type(first)](first)
    if type(first) not in FIRST_LAYER_TYPES:
        raise ConversionError(f"the image goes into {path} ({type_name(first)}), which is not a convolution the input "
                              "normalization can be folded into (the image may only be zero-padded or resized before "
                              "its first convolutions)")
    network.set_submodule(path, fold_input_normalization(first, mean, std, space_to_depth))


def _logit_bias(config: BcosConfig, num_classes: int) -> float:
    if config.logit_bias is not None:
        return float(config.logit_bias)
    if config.keep_bias or num_classes < 2:
        return 0.0
    return -math.log(num_classes - 1)


def _timm_spec(model: nn.Module, in_chans: int, num_classes: int) -> dict[str, Any]:
    """The spec that rebuilds a timm model instance (so ``bcosify.load`` needs no skeleton), if it is one."""
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture or not type(model).__module__.startswith("timm."):
        return {}
    spec = {"spec": f"timm:{architecture}", "model_kwargs": {"in_chans": in_chans, "num_classes": num_classes}}
    return spec if _rebuilds(model, spec["spec"], spec["model_kwargs"]) else {}


def _rebuilds(model: nn.Module, spec: str, model_kwargs: dict[str, Any]) -> bool:
    """Whether ``spec`` with ``model_kwargs`` builds ``model``'s architecture (same state-dict names and shapes).

    A timm instance built with other constructor arguments (``img_size``, ``depths``, ...) records no spec, so
    ``load`` asks for its skeleton instead of building the wrong network. Built on the meta device (no memory);
    an architecture that cannot be built there is trusted.
    """
    try:
        with torch.device("meta"):
            rebuilt = build_model(spec, weights=None, model_kwargs=model_kwargs)
    except Exception:  # noqa: BLE001 - any failure to build on the meta device leaves the spec as it is
        return True
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return ours == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
