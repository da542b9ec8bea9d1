"""Export a converted model to ONNX."""

from __future__ import annotations

import os
import pathlib

import torch
from torch import nn

from ..model import BcosModel
from ..nn import check_images
from ..utils import atomic_write, eval_mode


class _ImagesToLogits(nn.Module):
    """``BcosModel`` without the run-time input checks, which cannot live in an exported graph."""

    def __init__(self, model: BcosModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_encoded(self.model.encoder(x))


def export_onnx(model: BcosModel, path: str | os.PathLike, example_input: torch.Tensor, *,
                dynamic_batch: bool = True) -> pathlib.Path:
    """Write ``model`` (images in [0, 1] -> logits with the logit bias) as an ONNX file, atomically.

    The graph takes input ``images`` and returns ``logits``; with ``dynamic_batch`` any batch size works.
    Input checks are not part of the graph: feed it images in [0, 1].
    """
    if not isinstance(model, BcosModel):
        raise TypeError(f"export_onnx needs a BcosModel, got {type(model).__name__}")
    check_images(example_input, model.in_chans)
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None

    def write(tmp: pathlib.Path) -> None:
        with eval_mode(model), torch.no_grad():
            torch.onnx.export(_ImagesToLogits(model).eval(), (example_input,), str(tmp), dynamo=True,
                              input_names=["images"], output_names=["logits"], dynamic_shapes=dynamic,
                              external_data=False, verbose=False)

    return atomic_write(path, write)
