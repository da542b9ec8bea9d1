"""Architecture-level rewrites that the per-module table cannot express."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import skip_init

from ..errors import ConversionError
from ..nn.head import ClassifierBeforePooling, MeanPatchTokens
from .rules import INPUT_TRANSFORMS
from .trace import Trace

try:
    import timm.layers
    import timm.models.vision_transformer as timm_vit
except ImportError:  # pragma: no cover - timm is optional for the engine
    timm = timm_vit = None
try:
    import torchvision.models.vision_transformer as tv_vit
except ImportError:  # pragma: no cover
    tv_vit = None

_BETWEEN_POOL_AND_CLASSIFIER = (nn.Flatten, nn.Identity, nn.Dropout)


def _is_global_average_pool(module: nn.Module) -> bool:
    if type(module) is nn.AdaptiveAvgPool2d:
        return module.output_size in (1, (1, 1))
    if timm is not None and type(module) is timm.layers.SelectAdaptivePool2d:
        return module.pool_type in ("avg", "fast", "fastavg")
    return False


def reorder_classifier_before_pooling(model: nn.Module, info: Trace) -> None:
    """Move the classifier in front of the global average pooling ("GAP reorder"), in place.

    Needs the pattern ``global average pool -> [flatten / dropout] -> Linear classifier``.
    """
    if info.classifier_path is None:
        raise ConversionError("gap_reorder: the model has no Linear classifier")
    order = info.order
    k = len(order) - 1 - order[::-1].index(info.classifier_path)
    dropouts: list[str] = []
    pool_path = None
    for path in reversed(order[:k]):
        module = model.get_submodule(path)
        if _is_global_average_pool(module):
            pool_path = path
            break
        parent = path.rpartition(".")[0]
        if parent and _is_global_average_pool(model.get_submodule(parent)):
            pool_path = parent
            break
        if next(iter(module.children()), None) is not None:  # a container: look at its leaves
            continue
        if type(module) not in _BETWEEN_POOL_AND_CLASSIFIER:
            raise ConversionError(
                f"gap_reorder needs global average pooling right before the classifier {info.classifier_path}; "
                f"found {path} ({type(module).__name__}) in between")
        if type(module) is nn.Dropout:
            dropouts.append(path)
    if pool_path is None:
        raise ConversionError("gap_reorder: no global average pooling found before the classifier")
    linear = model.get_submodule(info.classifier_path)
    conv = skip_init(nn.Conv2d, linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    dropout = model.get_submodule(dropouts[0]) if dropouts else nn.Identity()
    for path in dropouts:
        model.set_submodule(path, nn.Identity())
    model.set_submodule(info.classifier_path, nn.Identity())
    model.set_submodule(pool_path, ClassifierBeforePooling(dropout, conv, model.get_submodule(pool_path)))


def pool_patch_tokens(model: nn.Module) -> None:
    """Classify the mean of the patch tokens instead of the class token (as B-cos ViTs do), in place.

    timm ``VisionTransformer`` (average pooling over the non-prefix tokens) and torchvision
    ``VisionTransformer`` (the encoder's output token 0 becomes the mean of the patch tokens).
    """
    if timm_vit is not None and type(model) is timm_vit.VisionTransformer:
        if model.attn_pool is not None:
            raise ConversionError("token_pool='mean': the model pools with attention (global_pool='map')")
        model.global_pool = "avg"
        model.pool_include_prefix = False
    elif tv_vit is not None and type(model) is tv_vit.VisionTransformer:
        model.encoder.ln = nn.Sequential(OrderedDict(norm=model.encoder.ln, pool=MeanPatchTokens(1)))
    else:
        raise ConversionError(f"token_pool='mean' applies to timm and torchvision VisionTransformer models, not "
                              f"{type(model).__name__}")


def _input_transforms(model: nn.Module) -> list[tuple[str, nn.Module, tuple, tuple]]:
    """The modules of ``model`` that re-map their input (:data:`INPUT_TRANSFORMS`) with their flag on."""
    found = []
    for path, module in model.named_modules():
        entry = INPUT_TRANSFORMS.get(type(module))
        if entry is not None and getattr(module, entry[0]):
            found.append((path, module, *entry))
    return found


def fold_input_transform(model: nn.Module, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Switch off ``model``'s fixed per-channel input map (torchvision GoogLeNet/Inception v3 ``transform_input``),
    in place, and return the normalization ``(mean', std')`` its first layers then see: ``(x - mean) / std`` mapped
    by ``* scale + shift`` is ``(x - mean') / std'``. Without such a map, ``(mean, std)`` as given."""
    found = _input_transforms(model)
    if not found:
        return tuple(mean), tuple(std)
    if len(found) > 1 or found[0][0] != "":
        path = found[0][0] or "<model>"
        raise ConversionError(f"{path} ({type(found[0][1]).__name__}): an input map ({found[0][2]}) that is not the "
                              "model's own first operation cannot be folded into the input normalization")
    _, module, flag, scale, shift = found[0]
    if len(scale) != len(mean):
        raise ConversionError(f"<model> ({type(module).__name__}): its {flag} maps {len(scale)} channels but the "
                              f"input normalization has {len(mean)}")
    setattr(module, flag, False)
    return (tuple(m - c * s / a for m, s, a, c in zip(mean, std, scale, shift)),
            tuple(s / a for s, a in zip(std, scale)))


class input_transform_off:
    """Within the block, ``model``'s input map (:func:`fold_input_transform`) is off; it is restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.found = _input_transforms(model)

    def __enter__(self) -> None:
        for _, module, flag, _, _ in self.found:
            setattr(module, flag, False)

    def __exit__(self, *exc) -> None:
        for _, module, flag, _, _ in self.found:
            setattr(module, flag, True)
