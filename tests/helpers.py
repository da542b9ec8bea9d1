"""Small helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from bcosify.nn import DauConv2d, DauLinear, DetachedGate, GatePath
from bcosify.nn.bcos import _pad_same
from bcosify.utils import eval_mode


@torch.no_grad()
def randomise_dau_layers(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, seed: int = 0) -> nn.Module:
    """Give every DAU layer a random dynamic part ``B`` (in one forward pass on ``x``), scaled so that the dynamic
    weight ``B_j A p`` is about ``ratio`` times the static weight ``b_j`` in norm: the layers are then truly
    dynamic, far from their converted (static) start, without changing the scale of the activations much.
    """
    generator = torch.Generator().manual_seed(seed)

    def hook(layer, inputs):
        (x,) = inputs
        if isinstance(layer, DauConv2d):
            if layer.same_padding:
                x = _pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
            h = layer.basis(x).unflatten(1, (layer.groups, layer.rank)).norm(dim=2)
        else:
            h = layer.basis(x).norm(dim=-1)
        static = layer.weight.flatten(1).norm(dim=1).mean()
        patch = layer.weight[0].numel()
        std = ratio * static / (h.mean().clamp_min(1e-30) * patch ** 0.5)
        layer.weight_b.normal_(generator=generator).mul_(std)  # (in place: B is rank x the weight)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (DauConv2d, DauLinear))]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return model


def value_path_modules(module: nn.Module, prefix: str = ""):
    """``(path, module)`` for every module outside gate branches (squeeze-excite, attention logits)."""
    yield prefix, module
    if isinstance(module, (DetachedGate, GatePath)):
        return
    for name, child in module.named_children():
        yield from value_path_modules(child, f"{prefix}.{name}" if prefix else name)


@torch.no_grad()
def randomise_zero_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Give normal random values to weight tensors (2-d or more) that are initialised to all zeros.

    torchvision's ViT starts with a zero classifier and a zero class token: every logit would be 0 and the
    class token's contribution vacuous.
    """
    for param in model.parameters():
        if param.dim() >= 2 and not bool(param.any()):
            param.normal_(std=std)
    return model


def assert_batch_matches_single(model, x: torch.Tensor, target: torch.Tensor, fields: tuple[str, ...],
                                rtol: float = 1e-12, atol: float = 1e-14) -> None:
    """``explain`` on the batch gives, for every image and each of ``fields``, what it gives on that image alone."""
    import bcosify

    batched = bcosify.explain(model, x, target)
    for i in range(len(x)):
        single = bcosify.explain(model, x[i:i + 1], int(target[i]))
        for name in fields:
            torch.testing.assert_close(getattr(batched, name)[i], getattr(single, name)[0], rtol=rtol, atol=atol)
