"""The two properties every conversion must have, as functions anyone can run on their own model."""

from __future__ import annotations

import torch
from torch import nn

from ..conversion import convert
from ..data import normalize
from ..model import BcosModel
from ..utils import eval_mode
from .explanation import explain


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()


@torch.no_grad()
def equivalence_error(original: nn.Module, x: torch.Tensor, **convert_options) -> float:
    """Relative error between ``original`` on normalized ``x`` and ``convert(original, b=1, keep_bias=True)`` on ``x``
    (with ``unit="dau"`` among ``convert_options``: the DAU model as converted, whose layers start plain).

    ``x`` holds images in [0, 1]; both models run in eval mode. Near 0 (about 1e-15 in float64) when the
    surgery is faithful.
    """
    plain = {} if convert_options.get("unit") == "dau" else {"b": 1}
    bmodel = convert(original, keep_bias=True, **plain, **convert_options).eval()
    with eval_mode(original):
        reference = original(normalize(x, bmodel.config.mean, bmodel.config.std))
    return _relative_error(bmodel(x), reference)


def completeness_error(model: BcosModel, x: torch.Tensor, target=None) -> float:
    """Largest per-image relative error of ``sum(contributions) + constant == logit - logit_bias``."""
    return explain(model, x, target).completeness_error.max().item()
