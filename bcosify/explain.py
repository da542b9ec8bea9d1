"""``bcosify.explain``: the dynamic linear weights ``W(x)`` and per-pixel contributions of a prediction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import BcosModel


@dataclass
class Explanation:
    """One explanation per image of a batch.

    Attributes:
        logits: ``(N, classes)`` logits, the logit bias included.
        target: ``(N,)`` explained class per image.
        explained_logit: ``(N,)`` target logit without the logit bias: what the contributions add up to.
        weights: ``W(x)``, shape of the encoded input ``(N, 2 * channels, H, W)``.
        encoded: the encoded input ``z = [x, 1 - x]``.
        contributions: ``(N, H, W)`` per-pixel contributions ``sum_c z * W`` to the target logit.
        constant_contribution: ``(N,)`` contribution of constants added inside the network (0 for CNNs).
        logit_bias: the fixed logit bias (not explained by any pixel).
        completeness_error: ``(N,)`` relative error of ``sum(contributions) + constant == logit - logit_bias``.
    """

    logits: torch.Tensor
    target: torch.Tensor
    explained_logit: torch.Tensor
    weights: torch.Tensor
    encoded: torch.Tensor
    contributions: torch.Tensor
    constant_contribution: torch.Tensor
    logit_bias: float
    completeness_error: torch.Tensor

    @property
    def target_logits(self) -> torch.Tensor:
        """``(N,)`` logit of the explained class, the logit bias included."""
        return self.logits.gather(1, self.target[:, None])[:, 0]


def _resolve_target(target, logits: torch.Tensor) -> torch.Tensor:
    n, num_classes = logits.shape
    if target is None:
        return logits.argmax(1)
    if isinstance(target, int) and not isinstance(target, bool):
        target = torch.full((n,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dim() > 1 or (target.dim() == 1 and target.numel() != n):
            raise ValueError(f"target must be None, an int, or an integer tensor of shape ({n},); got "
                             f"{target.dtype} of shape {tuple(target.shape)}")
        target = target.to(device=logits.device, dtype=torch.long).expand(n).clone()
    else:
        raise TypeError(f"target must be None, an int or an integer tensor, got {type(target).__name__}")
    if bool(((target < 0) | (target >= num_classes)).any()):
        raise ValueError(f"target classes must lie in [0, {num_classes}), got {target.tolist()}")
    return target


def explain(model: BcosModel, x: torch.Tensor, target: int | torch.Tensor | None = None) -> Explanation:
    """Explain the logits of ``model`` for the images ``x`` (``(N, C, H, W)`` in [0, 1]).

    ``target`` is the class to explain: ``None`` (the predicted class), an int, or one class per image.
    The whole batch takes one forward and one backward pass.
    """
    if not isinstance(model, BcosModel):
        raise TypeError(f"explain needs a BcosModel (from bcosify.convert), got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), model.explanation_mode():
            z = model.encode(x).detach().requires_grad_(True)
            raw_logits = model.network(z)  # without the logit bias, which would swamp tiny logits' precision
            target = _resolve_target(target, raw_logits.detach())
            selected = raw_logits.gather(1, target[:, None])[:, 0]
            (weights,) = torch.autograd.grad(selected.sum(), z)
    finally:
        model.train(was_training)
    z = z.detach()
    contributions = (z * weights).sum(1)
    explained = selected.detach()
    constant = torch.zeros_like(explained)
    total = contributions.flatten(1).sum(1) + constant
    error = (total - explained).abs() / explained.abs().clamp_min(torch.finfo(explained.dtype).tiny)
    logits = model.bias(raw_logits.detach())
    return Explanation(logits, target, explained, weights, z, contributions, constant, model.logit_bias, error)
