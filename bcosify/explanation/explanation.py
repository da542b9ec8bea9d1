"""``bcosify.explain``: the dynamic linear weights ``W(x)`` and per-pixel contributions of a prediction."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..model import BcosModel
from ..nn.head import ClassifierBeforePooling
from ..utils import eval_mode


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
        constant_contribution: ``(N,)`` contribution ``sum_p p * dlogit/dp`` of the constants added inside the
            network (positional embeddings, class/register tokens; 0 for CNNs).
        logit_bias: the fixed logit bias (not explained by any pixel).
        completeness_error: ``(N,)`` relative error of ``sum(contributions) + constant == logit - logit_bias``.
        logit_maps: ``(N, classes, h, w)`` per-location logits (without the logit bias) when the model
            applies its classifier before global average pooling (``convert(..., gap_reorder=True)``),
            else ``None``. Their spatial mean is ``logits - logit_bias``.
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
    logit_maps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, index: int | slice | torch.Tensor) -> "Explanation":
        """The explanations of a subset of the batch (an int keeps the batch dimension)."""
        if isinstance(index, int) and not isinstance(index, bool):
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is out of range for {len(self)} explanations")
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, (slice, torch.Tensor)):
            raise TypeError(f"index must be an int, a slice or a tensor, got {type(index).__name__}")
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = value[index] if isinstance(value, torch.Tensor) else value
        return Explanation(**values)

    @property
    def completeness_gap(self) -> torch.Tensor:
        """``(N,)`` signed gap ``sum(contributions) + constant_contribution - explained_logit`` (0 up to rounding);
        ``completeness_error`` is its size relative to the explained logit."""
        return _completeness_gap(self.contributions, self.constant_contribution, self.explained_logit)

    @property
    def target_logits(self) -> torch.Tensor:
        """``(N,)`` logit of the explained class, the logit bias included."""
        return self.logits.gather(1, self.target[:, None])[:, 0]

    @property
    def target_logit_maps(self) -> torch.Tensor | None:
        """``(N, h, w)`` per-location logit of the explained class, or ``None`` without logit maps."""
        if self.logit_maps is None:
            return None
        index = self.target.view(-1, 1, 1, 1).expand(-1, 1, *self.logit_maps.shape[2:])
        return self.logit_maps.gather(1, index)[:, 0]


def _completeness_gap(contributions: torch.Tensor, constant: torch.Tensor, explained: torch.Tensor) -> torch.Tensor:
    return contributions.flatten(1).sum(1) + constant - explained


def _resolve_target(target, logits: torch.Tensor) -> torch.Tensor:
    n, num_classes = logits.shape
    if target is None:
        return logits.argmax(1)
    if isinstance(target, int) and not isinstance(target, bool):
        target = torch.full((n,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or target.dim() > 1 \
                or (target.dim() == 1 and target.numel() != n):
            raise ValueError(f"target must be None, an int, or an integer tensor of shape ({n},); got "
                             f"{target.dtype} of shape {tuple(target.shape)}")
        target = target.to(device=logits.device, dtype=torch.long).expand(n).clone()
    else:
        raise TypeError(f"target must be None, an int or an integer tensor, got {type(target).__name__}")
    if bool(((target < 0) | (target >= num_classes)).any()):
        raise ValueError(f"target classes must lie in [0, {num_classes}), got {target.tolist()}")
    return target


def _logit_map_modules(model: BcosModel) -> list[nn.Module]:
    """The classifiers that ``ClassifierBeforePooling`` heads apply at every location."""
    return [m.classifier for m in model.network.modules() if isinstance(m, ClassifierBeforePooling)]


@contextlib.contextmanager
def per_sample_constants(network: nn.Module, paths: list[str], batch: int) -> Iterator[list[torch.Tensor]]:
    """Within this context the constant parameters at ``paths`` are replaced by per-sample copies (leaf
    tensors of batch size ``batch`` requiring grad), so that one backward pass gives every sample's gradient.
    A path that names a module (one that computes a constant from the input's shape alone: XCiT's Fourier
    positional encoding) has its output replaced the same way each time it runs; the yielded list then grows
    during the forward."""
    saved: dict[nn.Module, dict] = {}  # each owner's parameters before the swap (their order included)
    copies = []
    hooks = []

    def output_as_leaf(_module, _inputs, out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a constant module must return one tensor, got {type(out).__name__}")
        leaf = out.detach()
        if leaf.dim() and leaf.shape[0] == 1 and batch > 1:
            leaf = leaf.expand(batch, *leaf.shape[1:])
        leaf = leaf.clone().requires_grad_(True)
        copies.append(leaf)
        return leaf

    try:
        for path in paths:
            module = _submodule_or_none(network, path)
            if module is not None:
                hooks.append(module.register_forward_hook(output_as_leaf))
                continue
            owner_path, _, name = path.rpartition(".")
            owner = network.get_submodule(owner_path)
            saved.setdefault(owner, dict(owner._parameters))
            param = owner._parameters.pop(name)
            copy = param.detach().expand(batch, *param.shape[1:]).clone().requires_grad_(True)
            object.__setattr__(owner, name, copy)  # a plain attribute, found before nn.Module.__getattr__
            copies.append(copy)
        yield copies
    finally:
        for hook in hooks:
            hook.remove()
        for owner, parameters in saved.items():
            for name in parameters.keys() - owner._parameters.keys():
                owner.__dict__.pop(name, None)
            owner._parameters.clear()
            owner._parameters.update(parameters)


def _submodule_or_none(network: nn.Module, path: str) -> nn.Module | None:
    try:
        return network.get_submodule(path)
    except AttributeError:
        return None


def _explain_batch(model: BcosModel, x: torch.Tensor, target) -> Explanation:
    """Explain one batch with one forward and one backward pass (``model`` already in eval mode)."""
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
               for m in _logit_map_modules(model)]
    try:
        with torch.enable_grad(), model.explanation_mode():
            z = model.encode(x).detach().requires_grad_(True)
            with per_sample_constants(model.network, model.constants, len(z)) as constants:
                try:
                    # without the logit bias, which would swamp tiny logits' precision (the temperature is explained)
                    raw_logits = model.bias.scale(model.network(z))
                except RuntimeError as error:
                    if constants and len(z) > 1:
                        raise _BatchedConstantsFailed from error
                    raise
            target = _resolve_target(target, raw_logits.detach())
            selected = raw_logits.gather(1, target[:, None])[:, 0]
            weights, *constant_grads = torch.autograd.grad(selected.sum(), [z, *constants], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    z = z.detach()
    contributions = (z * weights).sum(1)
    explained = selected.detach()
    constant = torch.zeros_like(explained)
    for value, grad in zip(constants, constant_grads):
        if grad is not None:
            constant = constant + (value.detach() * grad).flatten(1).sum(1)
    gap = _completeness_gap(contributions, constant, explained)
    error = gap.abs() / explained.abs().clamp_min(torch.finfo(explained.dtype).tiny)
    logits = model.bias.shift(raw_logits.detach())
    logit_maps = captured[-1] if captured else None
    return Explanation(logits, target, explained, weights, z, contributions, constant, model.logit_bias, error,
                       logit_maps)


def _concatenate(parts: list[Explanation]) -> Explanation:
    if len(parts) == 1:
        return parts[0]
    values = {}
    for field in dataclasses.fields(Explanation):
        items = [getattr(p, field.name) for p in parts]
        if isinstance(items[0], torch.Tensor):
            values[field.name] = torch.cat(items)
        else:
            values[field.name] = items[0]
    return Explanation(**values)


def explain(model: BcosModel, x: torch.Tensor, target: int | torch.Tensor | None = None, *,
            batch_size: int | None = None) -> Explanation:
    """Explain the logits of ``model`` for the images ``x`` (``(N, C, H, W)`` in [0, 1]).

    ``target`` is the class to explain: ``None`` (the predicted class), an int, or one class per image.
    The whole batch takes one forward and one backward pass; ``batch_size`` splits a large batch into
    chunks of at most that many images (same results, less memory).
    When the model applies its classifier before pooling (``gap_reorder=True``), the result also holds the
    per-location ``logit_maps``.
    """
    if not isinstance(model, BcosModel):
        raise TypeError(f"explain needs a BcosModel (from bcosify.convert), got {type(model).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and batch_size is not None and len(x) > batch_size:
        if isinstance(target, torch.Tensor) and target.dim() == 1 and target.numel() != len(x):
            raise ValueError(f"target must be None, an int, or an integer tensor of shape ({len(x)},); got "
                             f"{target.dtype} of shape {tuple(target.shape)}")
        chunks = []
        for start in range(0, len(x), batch_size):
            part = target
            if isinstance(target, torch.Tensor) and target.dim() == 1:
                part = target[start:start + batch_size]
            chunks.append(explain(model, x[start:start + batch_size], part))
        return _concatenate(chunks)
    with eval_mode(model):
        try:
            return _explain_batch(model, x, target)
        except _BatchedConstantsFailed:
            # a forward that reshapes a constant as having batch size 1 (timm's resample_abs_pos_embed at another
            # image size): one image at a time, where the per-sample copies have the constant's own shape
            return explain(model, x, target, batch_size=1)


class _BatchedConstantsFailed(Exception):
    """The network's forward could not run with per-sample copies of its constants."""
