"""Attribution methods in captum's shape: B-cos contributions (:class:`Attribution`) and captum's post-hoc
methods on the original model (:func:`posthoc_attribution`).

Every method here is an object with ``attribute(inputs, target=None)``: ``inputs`` are images ``(N, C, H, W)``
in [0, 1], ``target`` the class to explain, and the result has one value per input element (or per pixel,
``(N, 1, H, W)``, for Grad-CAM). The metrics (:mod:`~bcosify.explanation.gridpg`) take any such object, so
a captum algorithm built on a model that takes images in [0, 1] (e.g. ``InputXGradient(Normalized(...))``)
fits as well.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

from ..data import normalize
from ..model import BcosModel
from ..utils import eval_mode
from .explanation import Explanation, explain

__all__ = ["LRP_METHOD", "POSTHOC_METHODS", "Attribution", "AttributionMethod", "LRPAttribution",
           "PosthocAttribution", "attribution_maps", "last_conv_stage", "method_name", "posthoc_attribution",
           "quantus_explain"]

POSTHOC_METHODS = ("ixg", "gradcam", "ig")
#: layer-wise relevance propagation (zennit's EpsilonPlusFlat composite); optional, as it needs zennit
LRP_METHOD = "lrp"
_METHOD_NAMES = {"bcos": "B-cos contributions", "ixg": "input x gradient", "gradcam": "Grad-CAM",
                 "ig": "integrated gradients", "lrp": "LRP (EpsilonPlusFlat)"}


@runtime_checkable
class AttributionMethod(Protocol):
    """What the metrics accept: ``attribute(images (N, C, H, W) in [0, 1], target=...)`` returning
    attributions ``(N, C, H, W)``, ``(N, 1, h, w)`` or maps ``(N, h, w)`` (captum's attribution classes)."""

    def attribute(self, inputs: torch.Tensor, target: Any = None) -> torch.Tensor: ...


Method = Union[AttributionMethod, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
"""An :class:`AttributionMethod`, or a function ``(images, targets) -> attributions`` of the same shapes."""


def method_name(method: str) -> str:
    """Readable name of a method key (``bcos``, ``ixg``, ``gradcam``, ``ig``)."""
    return _METHOD_NAMES.get(method, method)


def attribution_maps(method: Method, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel maps ``(N, h, w)`` of ``method`` for ``images`` and one target class per image: attributions
    with a channel dimension are summed over it."""
    if isinstance(method, AttributionMethod):
        out = method.attribute(images, target=targets)
    elif callable(method):
        out = method(images, targets)
    else:
        raise TypeError(f"expected an attribution method (an object with .attribute(inputs, target) or a function "
                        f"(images, targets) -> attributions), got {type(method).__name__}")
    if isinstance(out, tuple) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4) or len(out) != len(images):
        raise ValueError(f"an attribution of {len(images)} images must have shape ({len(images)}, C, H, W) or "
                         f"({len(images)}, H, W), got {getattr(out, 'shape', type(out).__name__)}")
    out = out.detach()
    return out.sum(1) if out.dim() == 4 else out


# --------------------------------------------------------------------------- B-cos


def _captum_target(target: Any, n: int) -> int | torch.Tensor | None:
    """A captum-style target (None, int, list of ints, tensor) as :func:`explain` takes it."""
    if isinstance(target, tuple):
        raise TypeError("tuple targets index models with multi-dimensional outputs; a classifier's target is None, "
                        "an int, a list of ints or an integer tensor")
    if isinstance(target, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError(f"a list target must hold one int class per image, got {target!r}")
        if len(target) != n:
            raise ValueError(f"a list target must hold one class per image ({n}), got {len(target)}")
        return torch.tensor(target, dtype=torch.long)
    if isinstance(target, torch.Tensor) and target.numel() == 1 and target.dim() <= 1 and n != 1:
        return target.reshape(())  # captum: a one-element tensor is the class of every image
    return target


class Attribution:
    """B-cos contributions of ``model`` as a captum-style attribution method.

    ``attribute(inputs, target)`` returns one contribution per colour channel and pixel, the shape of
    ``inputs``: channel ``c`` of a pixel contributes ``x_c * W(x)_{x_c} + (1 - x_c) * W(x)_{1 - x_c}``
    (both halves of the ``[x, 1 - x]`` encoding of that value), so the sum over channels is
    :attr:`Explanation.contributions` and the sum over everything, plus the constants' contribution, is the
    explained logit (without the logit bias).
    """

    multiplies_by_inputs = True

    def __init__(self, model: BcosModel, *, batch_size: int | None = None) -> None:
        if not isinstance(model, BcosModel):
            raise TypeError(f"Attribution needs a BcosModel (from bcosify.convert), got {type(model).__name__}; "
                            "for the original model use posthoc_attribution or a captum method")
        self.forward_func = model
        self.batch_size = batch_size

    @property
    def model(self) -> BcosModel:
        return self.forward_func

    def has_convergence_delta(self) -> bool:
        return True

    def explain(self, inputs: torch.Tensor, target: Any = None, *, batch_size: int | None = None) -> Explanation:
        """The full :class:`Explanation` behind :meth:`attribute` (same inputs and targets)."""
        if isinstance(inputs, tuple):
            raise TypeError("explain takes one tensor of images, not a tuple")
        n = len(inputs) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1 else 0
        return explain(self.model, inputs, _captum_target(target, n),
                       batch_size=batch_size if batch_size is not None else self.batch_size)

    def attribute(self, inputs: torch.Tensor | tuple[torch.Tensor], target: Any = None, *,
                  return_convergence_delta: bool = False, batch_size: int | None = None):
        """Contributions ``(N, C, H, W)`` of every input value to the ``target`` logit.

        ``target``: ``None`` (the predicted class), an int, a list of ints or an integer tensor (one class, or
        one per image). A 1-tuple of inputs gives a 1-tuple of attributions, as in captum. With
        ``return_convergence_delta`` also returns ``delta`` ``(N,)``, the signed completeness gap
        ``sum(attributions) + constant_contribution - (logit - logit_bias)`` (zero up to rounding;
        :attr:`Explanation.completeness_gap`, whose size relative to the logit is ``completeness_error``).
        """
        as_tuple = isinstance(inputs, tuple)
        if as_tuple:
            if len(inputs) != 1:
                raise ValueError(f"a B-cos model takes one input tensor, got a tuple of {len(inputs)}")
            inputs = inputs[0]
        e = self.explain(inputs, target, batch_size=batch_size)
        c = self.model.in_chans
        per_value = e.encoded * e.weights
        attributions = per_value[:, :c] + per_value[:, c:]
        result = (attributions,) if as_tuple else attributions
        if not return_convergence_delta:
            return result
        return result, e.completeness_gap


def quantus_explain(model: BcosModel, inputs, targets, *, device: str | torch.device | None = None,
                    batch_size: int | None = None):
    """:class:`Attribution` as a quantus ``explain_func``: numpy images and targets in, numpy contributions
    ``(N, C, H, W)`` out, on the model quantus passes (a randomised copy in the randomisation tests)."""
    import numpy as np

    param = next(model.parameters())
    x = torch.as_tensor(np.asarray(inputs), dtype=param.dtype, device=param.device)
    target = torch.as_tensor(np.asarray(targets), device=param.device).long().reshape(-1)
    return Attribution(model, batch_size=batch_size).attribute(x, target).cpu().numpy()


# --------------------------------------------------------------------------- post-hoc (captum)


_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


@torch.no_grad()
def last_conv_stage(model: nn.Module, in_chans: int = 3, size: int = 64) -> str:
    """Path of the module whose output is the last spatial feature map (``H, W > 1``) before pooling.

    Found by one forward pass on a random ``size`` px image; the usual Grad-CAM layer (``layer4`` of a ResNet).
    """
    names = {id(m): p for p, m in model.named_modules()}
    finished: list[str] = []

    def hook(module, _inputs, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1 \
                and not isinstance(module, _POOLING) and module is not model:
            finished.append(names[id(module)])

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        param = next(model.parameters(), None)
        with eval_mode(model):
            model(torch.rand(1, in_chans, size, size, dtype=param.dtype if param is not None else torch.float32,
                             device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise ValueError(f"{type(model).__name__} produces no spatial feature map: no Grad-CAM layer found")
    return finished[-1]


class PosthocAttribution:
    """A captum method on the original model, taking images in [0, 1] (see :func:`posthoc_attribution`)."""

    def __init__(self, model: nn.Module, method: str, algorithm, mean: Sequence[float], std: Sequence[float],
                 extra: dict[str, Any]) -> None:
        self.forward_func = model
        self.method = method
        self.algorithm = algorithm
        self.mean, self.std = tuple(mean), tuple(std)
        self.extra = extra

    def attribute(self, inputs: torch.Tensor, target: Any = None) -> torch.Tensor:
        """Attributions ``(N, C, H, W)`` on the normalized input (``(N, 1, H, W)`` for Grad-CAM) of ``target``
        (captum's targets; ``None`` is the predicted class)."""
        model = self.forward_func
        with eval_mode(model):
            normalized = normalize(inputs.detach(), self.mean, self.std).requires_grad_(True)
            if target is None:
                with torch.no_grad():
                    target = model(normalized).argmax(1)
            out = self.algorithm.attribute(normalized, target=target, **self.extra).detach()
        if self.method == "gradcam":
            from captum.attr import LayerAttribution

            out = LayerAttribution.interpolate(out, tuple(inputs.shape[2:]), interpolate_mode="bilinear")
        return out


class LRPAttribution:
    """Layer-wise relevance propagation of the original model with zennit's ``EpsilonPlusFlat`` composite
    (flat rule on the first layer, z+ on the other convolutions, epsilon on linear layers; BatchNorm merged into
    the convolution before it), taking images in [0, 1] (see :func:`posthoc_attribution`). The relevance
    starts as 1 on the target logit (zennit's convention), so where the rules conserve it the relevance sums to
    1 whatever the logit's sign."""

    method = LRP_METHOD

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        import importlib.util

        if importlib.util.find_spec("zennit") is None:
            raise ImportError("LRP needs zennit: pip install zennit")
        self.forward_func = model
        self.mean, self.std = tuple(mean), tuple(std)

    def attribute(self, inputs: torch.Tensor, target: Any = None) -> torch.Tensor:
        """Relevance ``(N, C, H, W)`` of the normalized input for ``target`` (``None``: the predicted class)."""
        from zennit.attribution import Gradient
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat

        model = self.forward_func
        with eval_mode(model):
            normalized = normalize(inputs.detach(), self.mean, self.std)
            with torch.no_grad():
                logits = model(normalized)
            if target is None:
                target = logits.argmax(1)
            target = torch.as_tensor(target, device=logits.device).long().expand(len(normalized))
            start = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
            composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
            with Gradient(model, composite) as attributor:
                _, relevance = attributor(normalized.requires_grad_(True), start)
        return relevance.detach()


def posthoc_attribution(model: nn.Module, method: str, *, mean: Sequence[float], std: Sequence[float],
                        layer: str | None = None, steps: int = 20,
                        internal_batch_size: int | None = None) -> PosthocAttribution | LRPAttribution:
    """A captum attribution of the original (unconverted) ``model`` that takes images in [0, 1].

    ``model`` takes images normalized with ``mean``/``std``. ``method``: ``"ixg"`` (input x gradient on the
    normalized input), ``"ig"`` (integrated gradients with ``steps`` steps from the zero normalized input,
    i.e. the mean color) or ``"gradcam"`` (Grad-CAM at ``layer``, default :func:`last_conv_stage`, upsampled
    to the image, one channel). Needs captum (``pip install 'bcosify[eval]'``). ``"lrp"`` is
    :class:`LRPAttribution` (needs zennit).
    """
    if method == LRP_METHOD:
        if isinstance(model, BcosModel):
            raise TypeError("post-hoc methods run on the original model; pass the unconverted nn.Module")
        return LRPAttribution(model, mean, std)
    if method not in POSTHOC_METHODS:
        raise ValueError(f"unknown post-hoc method {method!r}; expected one of {list(POSTHOC_METHODS)} or "
                         f"{LRP_METHOD!r}")
    if isinstance(model, BcosModel):
        raise TypeError("post-hoc methods run on the original model; pass the unconverted nn.Module")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    try:
        import captum.attr as ca
    except ImportError:
        raise ImportError("post-hoc attributions need captum: pip install 'bcosify[eval]' (or captum)") from None
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}")
    if method == "gradcam":
        path = layer if layer is not None else last_conv_stage(model, len(mean))
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the model has no module {path!r} for Grad-CAM") from None
        return PosthocAttribution(model, method, ca.LayerGradCam(model, module), mean, std,
                                  {"relu_attributions": False})
    if method == "ixg":
        return PosthocAttribution(model, method, ca.InputXGradient(model), mean, std, {})
    return PosthocAttribution(model, method, ca.IntegratedGradients(model), mean, std,
                              {"n_steps": steps, "internal_batch_size": internal_batch_size,
                               "method": "riemann_trapezoid"})
