"""One forward pass on a dummy image: which modules run, in what order, which layer takes the image, the
input channels and the classifier."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConversionError
from ..utils import eval_mode
from .rules import CLASSIFIER_TYPES

TRACE_SIZES = (64, 224)


@dataclass
class Trace:
    """What one forward pass on a dummy input revealed about a model."""

    executed: set[int]
    order: list[str]  # paths of the executed modules, in call order
    first_layer_path: str  # the leaf module that receives the input image
    in_chans: int
    classifier_path: str | None
    num_classes: int
    size: int  # the square input size the model ran on
    given: dict[int, dict] = field(default_factory=dict)  # id(module) -> {argument position/name: given as None}


def _in_chans(model: nn.Module) -> int:
    """Input channels: the model's own ``in_chans`` (timm), else the first ``Conv2d`` in module order."""
    declared = getattr(model, "in_chans", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
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
    in_chans = _in_chans(model)
    param = next(iter(model.parameters()))
    names = {id(m): p for p, m in model.named_modules()}
    executed: list[nn.Module] = []
    consumers: list[str] = []
    dummy_holder: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):
        executed.append(module)
        kwargs = kwargs or {}
        given.setdefault(id(module), {}).update({**{i: a is None for i, a in enumerate(args)},
                                                 **{k: v is None for k, v in kwargs.items()}})
        if args and dummy_holder and args[0] is dummy_holder[0] and next(iter(module.children()), None) is None:
            consumers.append(names[id(module)])

    given: dict[int, dict] = {}  # per module: argument position or name -> whether it was given as None
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            error = None
            for size in _input_sizes(model):
                executed.clear(), consumers.clear(), dummy_holder.clear()
                dummy = torch.rand(1, in_chans, size, size, dtype=param.dtype, device=param.device)
                dummy_holder.append(dummy)
                try:
                    out = model(dummy)
                    error = None
                    break
                except Exception as e:  # a size the model cannot take: try the next one
                    error = e
        if error is not None:
            raise ConversionError(f"cannot run {type(model).__name__} on a {in_chans}-channel image "
                                  f"({type(error).__name__}: {error})")
    finally:
        for h in handles:
            h.remove()

    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConversionError(f"the model must return logits of shape (N, classes); got "
                              f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    unique = sorted(set(consumers))
    if len(unique) != 1:
        raise ConversionError(
            "the input image must go straight into exactly one convolution (the layer the input "
            f"normalization is folded into); it went into {unique or 'no layer (the forward transforms it first)'}")
    first_path = unique[0]

    classifier_path = None
    for module in reversed(executed):
        if type(module) in CLASSIFIER_TYPES:
            classifier_path = names[id(module)]
            break
    return Trace({id(m) for m in executed}, [names[id(m)] for m in executed], first_path, in_chans, classifier_path,
                 out.shape[1], size, given)
