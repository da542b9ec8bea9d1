"""Small helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from bcosify.nn import DetachedGate, GatePath


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
