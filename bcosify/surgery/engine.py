"""The surgery engine: trace the model once, then replace modules through the rule table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm.layers
import torch
from torch import nn

from ..config import BcosConfig
from ..errors import ConversionError
from .report import CONSTANT, GATED, KEPT, LEFT, REFUSED, REPLACED, UNUSED, ConversionReport
from .rules import DESCEND, GATE, KEEP, REFUSE, RULES, Context, Rule

CLASSIFIER_TYPES = (nn.Linear, timm.layers.Linear)
FIRST_LAYER_TYPES = (nn.Conv2d, timm.layers.Conv2dSame)
TRACE_SIZES = (64, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Trace:
    """What one forward pass on a dummy input revealed about a model."""

    executed: set[int]
    order: list[str]  # paths of the executed modules, in call order
    first_layer_path: str  # the leaf module that receives the input image
    in_chans: int
    classifier_path: str | None
    num_classes: int


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if next(iter(m.children()), None) is None]


def _first_conv_in_chans(model: nn.Module) -> int:
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ConversionError(f"{type(model).__name__} has no Conv2d layer: only image models can be converted")


def _input_sizes(model: nn.Module) -> list[int]:
    """Square input sizes to try: the size a transformer was built for (timm ``patch_embed.img_size``,
    torchvision ``image_size``) first, then :data:`TRACE_SIZES`."""
    sizes = []
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and img_size[0] == img_size[1]:
        sizes.append(int(img_size[0]))
    if isinstance(getattr(model, "image_size", None), int):
        sizes.append(model.image_size)
    return sizes + [s for s in TRACE_SIZES if s not in sizes]


def trace(model: nn.Module) -> Trace:
    """Run ``model`` once on a dummy image to find its executed modules, first layer and classifier."""
    in_chans = _first_conv_in_chans(model)
    param = next(iter(model.parameters()))
    names = {id(m): p for p, m in model.named_modules()}
    executed: list[nn.Module] = []
    consumers: list[str] = []
    dummy_holder: list[torch.Tensor] = []

    def pre_hook(module, args):
        executed.append(module)
        if args and dummy_holder and args[0] is dummy_holder[0] and next(iter(module.children()), None) is None:
            consumers.append(names[id(module)])

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()]
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        error = None
        for size in _input_sizes(model):
            executed.clear(), consumers.clear(), dummy_holder.clear()
            dummy = torch.rand(1, in_chans, size, size, dtype=param.dtype, device=param.device)
            dummy_holder.append(dummy)
            try:
                with torch.no_grad():
                    out = model(dummy)
                error = None
                break
            except Exception as e:  # a size the model cannot take: try the next one
                error = e
        if error is not None:
            raise ConversionError(f"cannot run {type(model).__name__} on a {in_chans}-channel image: {error}")
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.train(flag)

    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConversionError(f"the model must return logits of shape (N, classes); got "
                              f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    unique = sorted(set(consumers))
    if len(unique) != 1:
        raise ConversionError(
            "the input image must go straight into exactly one convolution (the layer the input "
            f"normalisation is folded into); it went into {unique or 'no layer (the forward transforms it first)'}")
    first_path = unique[0]

    classifier_path = None
    for module in reversed(executed):
        if type(module) in CLASSIFIER_TYPES:
            classifier_path = names[id(module)]
            break
    return Trace({id(m) for m in executed}, [names[id(m)] for m in executed], first_path, in_chans, classifier_path, out.shape[1])


def resolve_normalisation(model: nn.Module, config: BcosConfig, in_chans: int) -> tuple[tuple, tuple, str]:
    """The input mean/std to fold: from the arguments, timm's ``pretrained_cfg``, or torchvision's default."""
    if (config.mean is None) != (config.std is None):
        raise ValueError("give both mean and std, or neither")
    if config.mean is not None:
        mean, std, source = config.mean, config.std, "arguments"
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            mean, std, source = tuple(cfg["mean"]), tuple(cfg["std"]), "timm pretrained_cfg"
        elif type(model).__module__.startswith("torchvision.models"):
            mean, std, source = IMAGENET_MEAN, IMAGENET_STD, "torchvision (ImageNet)"
        else:
            raise ConversionError(
                f"the input normalisation of {type(model).__name__} is unknown: pass mean=... and std=... "
                "(mean=0, std=1 for a model that takes images in [0, 1] as they are)")
    if len(mean) == 1 and in_chans > 1:
        mean, std = mean * in_chans, std * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConversionError(f"mean/std have {len(mean)}/{len(std)} values but the model takes {in_chans} channels")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std), source


def replace_classifier(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the classifier at ``path`` for a freshly initialised one with ``num_classes`` outputs."""
    old = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    model.set_submodule(path, new)


def default_logit_bias(config: BcosConfig, num_classes: int) -> float:
    if config.logit_bias is not None:
        return float(config.logit_bias)
    if config.keep_bias or num_classes < 2:
        return 0.0
    return -math.log(num_classes - 1)


def _check_own_parameters(module: nn.Module, path: str, rule: Rule, report: ConversionReport, strict: bool) -> None:
    """Report a container's declared constants; refuse its own parameters of unknown use."""
    for name, param in module.named_parameters(recurse=False):
        param_path = f"{path}.{name}" if path else name
        if name in rule.scales:
            continue
        if name in rule.constants:
            if param.dim() == 0 or param.shape[0] != 1:
                raise ConversionError(f"{param_path}: a constant must have a leading dimension of 1 (it is "
                                      f"broadcast over the batch), got shape {tuple(param.shape)}")
            report.add(param_path, param, CONSTANT, note="added constant, explained as constant_contribution")
        else:
            report.add(param_path, param, REFUSED if strict else LEFT,
                       note="a parameter the container's forward uses in an unknown way")


def convert_modules(model: nn.Module, config: BcosConfig, trace_info: Trace) -> ConversionReport:
    """Replace, in place, every module of ``model`` through the rule table; return the report.

    Raises ``ConversionError`` naming every refused module when ``config.strict``.
    """
    report = ConversionReport()
    first = model.get_submodule(trace_info.first_layer_path)
    if type(first) in RULES and type(first) not in FIRST_LAYER_TYPES:
        raise ConversionError(f"the first layer {trace_info.first_layer_path} is a {type(first).__name__}; only "
                              "Conv2d can take the folded input normalisation")
    ctx = Context(config=config, report=report, first_layer=first)
    done: dict[int, nn.Module] = {}

    def used(module: nn.Module) -> bool:
        return any(id(m) in trace_info.executed for m in module.modules())

    def convert(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        rule = RULES.get(type(module))
        if rule is None and not used(module):
            report.add(path, module, UNUSED, note="unknown type, not called in forward; left as is")
            new = module
        elif rule is None or rule.action == DESCEND:
            if rule is None:  # its own forward is unknown; its children are still converted (and listed)
                report.add(path, module, REFUSED if config.strict else LEFT,
                           note="unknown type on the value path" + ("" if config.strict else "; left as is"))
            else:
                _check_own_parameters(module, path, rule, report, config.strict)
            for name, child in list(module.named_children()):
                new_child = convert(child, f"{path}.{name}" if path else name)
                if new_child is not child:
                    setattr(module, name, new_child)
            new = module
        elif rule.action == KEEP:
            report.add(path, module, KEPT, note=rule.note)
            new = module
        elif rule.action == REFUSE:
            report.add(path, module, REFUSED if config.strict else LEFT,
                       note=rule.note + ("" if config.strict else "; left as is"))
            new = module
        else:
            ctx.path = path
            ctx.convert_child = lambda child, name, _path=path: convert(child, f"{_path}.{name}")
            new = rule.build(module, ctx)
            action = GATED if rule.action == GATE else (REPLACED if new is not module else KEPT)
            note = rule.note
            if module is ctx.first_layer:
                note = "first layer: [x, 1-x] input with the normalisation folded in"
            report.add(path, module, action, new if new is not module else None, note)
        done[id(module)] = new
        return new

    top = convert(model, "")
    if top is not model:
        raise ConversionError(f"the top-level model type {type(model).__name__} must be a container rule")
    refused = report.refused
    if refused:
        lines = "\n".join(f"  {e.path}: {e.old_type}" + (f" ({e.note})" if e.note else "") for e in refused)
        raise ConversionError(
            f"{len(refused)} module(s) on the value path have no exact conversion:\n{lines}\n"
            "Pass strict=False to leave them as they are (the model is then not guaranteed to be dynamic "
            "linear), or teach bcosify their type with bcosify.surgery.register_rule.")
    return report
