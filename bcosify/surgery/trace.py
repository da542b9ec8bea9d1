"""One forward pass on a dummy image: which modules run, in what order, which layers take the image, the
input channels and the classifier."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConversionError
from ..utils import eval_mode
from .rules import CLASSIFIER_TYPES

TRACE_SIZES = (64, 224, 32)


@dataclass
class Trace:
    """What one forward pass on a dummy input revealed about a model."""

    executed: set[int]
    order: list[str]  # paths of the executed modules, in call order
    first_layer_paths: tuple[str, ...]  # the leaf modules that receive the input image (padded, resized, ...)
    in_chans: int
    classifier_path: str | None
    num_classes: int
    size: int  # the square input size the model ran on
    given: dict[int, dict] = field(default_factory=dict)  # id(module) -> {argument position/name: given as None}
    #: id(module) -> {argument position/name: ("tensor", shape, dtype) or ("value", a size or flag)}: what its first
    #: call was given
    shapes: dict[int, dict] = field(default_factory=dict)

    #: first-layer path -> block size, for a first layer that takes the image rearranged by a space-to-depth
    first_layer_blocks: dict[str, int] = field(default_factory=dict)

    @property
    def first_layer_path(self) -> str:
        return self.first_layer_paths[0]


#: operations that keep the image an image (channel c still colour c, every pixel an input pixel, a zero pad or
#: an average of input pixels with weights summing to 1): the normalization folds into what they feed
_IMAGE_FUNCTIONS = {F.interpolate, F.dropout, F.dropout2d, torch.Tensor.contiguous, torch.Tensor.clone,
                    torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.type_as}
#: modules the image passes through unchanged in eval mode (their inner operations are followed)
_IMAGE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample)
_TORCH_DIR = os.path.dirname(torch.__file__)


def _spatial_index(index) -> bool:
    """Whether ``image[index]`` only crops or strides the spatial dimensions of an ``(N, C, H, W)`` image."""
    index = index if isinstance(index, tuple) else (index,)
    if index[:1] == (Ellipsis,):
        return len(index) <= 3 and all(isinstance(i, slice) for i in index[1:])
    full = slice(None)
    return len(index) >= 2 and index[1] == full and all(isinstance(i, slice) for i in index) and \
        Ellipsis not in index[2:]


def _space_to_depth_block(module: nn.Module) -> int | None:
    """The block size of timm's ``SpaceToDepth`` (channels ordered block-major: ``(block row, block column,
    colour)``), which moves pixels without mixing them: the normalization folds through it."""
    if type(module).__name__ == "SpaceToDepth" and type(module).__module__.startswith("timm.") and \
            isinstance(getattr(module, "bs", None), int):
        return module.bs
    return None


def _keeps_image(func, args, kwargs) -> bool:
    if func is torch.Tensor.__getitem__:
        return len(args) == 2 and args[0].dim() == 4 and _spatial_index(args[1])
    if func is F.pad:
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        return mode == "constant" and value in (None, 0, 0.0)
    return func in _IMAGE_FUNCTIONS


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and bcosify."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH_DIR) and f"{os.sep}bcosify{os.sep}" not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "unknown line"


class _FollowImage(TorchFunctionMode):
    """Follows the image through the operations that keep it an image, and what other operations make of it."""

    def __init__(self, images: dict[int, torch.Tensor], transformed: dict[int, tuple[torch.Tensor, str]],
                 inside: list[nn.Module]) -> None:
        super().__init__()
        # inside: the layers taking the image, whose own operations are theirs
        self.images, self.transformed, self.inside = images, transformed, inside

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or self.inside:  # (shapes and sizes are not tensors)
            return out
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.images and \
                _keeps_image(func, args, kwargs):
            self.images[id(out)] = out
        elif any(id(t) in self.images for t in tensors):
            self.transformed[id(out)] = (out, f"{getattr(func, '__name__', func)} at {_caller()}")
        else:
            origin = next((self.transformed[id(t)][1] for t in tensors if id(t) in self.transformed), None)
            if origin is not None:
                self.transformed[id(out)] = (out, origin)
        return out


def _describe(value) -> tuple | None:
    """A tensor argument's shape and dtype, or a plain value (a number, a flag, a size), else ``None``."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    plain = (int, float, bool)
    if isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value)):
        return ("value", value)
    return None


def _in_chans(model: nn.Module) -> list[int]:
    """Input channels to try: the model's own ``in_chans`` or its pretrained configuration's (timm), else the
    input channels of its first ``Conv2d`` in module order, then 3 and 1 (the forward pass decides)."""
    cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    for declared in (getattr(model, "in_chans", None), cfg_size[0] if isinstance(cfg_size, (tuple, list)) else None):
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            return [declared]
    first = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConversionError(f"{type(model).__name__} has no Conv2d layer: only image models can be converted")
    return list(dict.fromkeys((first, 3, 1)))


def _square(size) -> int | None:
    """``size`` as one side length, if it describes a square image (``224``, ``(224, 224)``, ``(3, 224, 224)``)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, (tuple, list)) and len(size) in (2, 3) and size[-1] == size[-2] and isinstance(size[-1], int):
        return int(size[-1])
    return None


def _input_sizes(model: nn.Module) -> list[int]:
    """Square input sizes to try: the size the model was built for (timm ``img_size`` or
    ``patch_embed.img_size``, torchvision ``image_size``), a small size, its pretrained configuration's input size
    (timm ``pretrained_cfg``), then the other sizes of :data:`TRACE_SIZES`."""
    built = [getattr(model, "img_size", None), getattr(getattr(model, "patch_embed", None), "img_size", None),
             getattr(model, "image_size", None)]
    configured = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    sizes = []
    for size in [_square(s) for s in built] + [TRACE_SIZES[0], _square(configured)] + list(TRACE_SIZES[1:]):
        if size is not None and size not in sizes:
            sizes.append(size)
    return sizes


def trace(model: nn.Module) -> Trace:
    """Run ``model`` once on a dummy image to find its executed modules, first layer and classifier."""
    param = next(iter(model.parameters()))
    names = {id(m): p for p, m in model.named_modules()}
    executed: list[nn.Module] = []
    consumers: list[str] = []
    images: dict[int, torch.Tensor] = {}  # the dummy image and what it became through image-keeping operations
    transformed: dict[int, tuple[torch.Tensor, str]] = {}  # what other operations made of it, and the first one
    transforms: list[str] = []  # those first operations, for what reached a layer

    def pre_hook(module, args, kwargs):
        executed.append(module)
        kwargs = kwargs or {}
        given.setdefault(id(module), {}).update({**{i: a is None for i, a in enumerate(args)},
                                                 **{k: v is None for k, v in kwargs.items()}})
        if id(module) not in shapes:
            shapes[id(module)] = {k: d for k, d in ((k, _describe(v)) for k, v in [*enumerate(args), *kwargs.items()])
                                  if d is not None}
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in images and \
                next(iter(module.children()), None) is None and type(module) not in _IMAGE_MODULES:
            inside.append(module)  # (its own operations are its own)
            if _space_to_depth_block(module) and id(args[0]) not in blocks:
                return
            consumers.append(names[id(module)])
            if id(args[0]) in blocks:
                first_blocks[names[id(module)]] = blocks[id(args[0])]
        elif args and isinstance(args[0], torch.Tensor) and id(args[0]) in transformed and not inside:
            transforms.append(transformed[id(args[0])][1])

    def post_hook(module, args, out):
        if inside and inside[-1] is module:
            inside.pop()
            block = _space_to_depth_block(module)
            if block and isinstance(out, torch.Tensor) and not inside:
                images[id(out)], blocks[id(out)] = out, block

    inside: list[nn.Module] = []
    blocks: dict[int, int] = {}  # the image rearranged by a space-to-depth -> its block size
    first_blocks: dict[str, int] = {}
    given: dict[int, dict] = {}  # per module: argument position or name -> whether it was given as None
    shapes: dict[int, dict] = {}
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(post_hook) for m in model.modules()]
    from .adapters import input_transform_off  # (adapters import this module)

    try:
        with eval_mode(model), torch.no_grad(), input_transform_off(model):  # folded into the normalization
            error, first_error = None, None
            for in_chans, size in [(c, s) for c in _in_chans(model) for s in _input_sizes(model)]:
                for store in (executed, consumers, images, transformed, transforms, given, shapes, inside, blocks,
                              first_blocks):
                    store.clear()
                dummy = torch.rand(1, in_chans, size, size, dtype=param.dtype, device=param.device)
                images[id(dummy)] = dummy
                try:
                    with _FollowImage(images, transformed, inside):
                        out = model(dummy)
                    error = None
                    break
                except Exception as e:  # a size the model cannot take: try the next one
                    error = e
                    first_error = first_error or (in_chans, e)
        if error is not None:
            in_chans, error = first_error
            raise ConversionError(f"cannot run {type(model).__name__} on a {in_chans}-channel image of any of the "
                                  f"sizes {_input_sizes(model)} ({type(error).__name__}: {error})")
    finally:
        for h in handles:
            h.remove()
        images.clear(), transformed.clear()

    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConversionError(f"the model must return logits of shape (N, classes); got "
                              f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    first_paths = tuple(dict.fromkeys(consumers))
    if not first_paths or transforms:
        where = f"; the forward first transforms it by {transforms[0]}" if transforms else ""
        raise ConversionError(
            "the input image (zero-padded, resized or as it is) must go only into layers that can take the folded "
            f"input normalization; it went into {list(first_paths) or 'no layer'}{where}")

    classifier_path = None
    for module in reversed(executed):
        if type(module) in CLASSIFIER_TYPES:
            classifier_path = names[id(module)]
            break
    return Trace({id(m) for m in executed}, [names[id(m)] for m in executed], first_paths, in_chans,
                 classifier_path, out.shape[1], size, given, shapes, dict(first_blocks))
