"""ONNX export parity with onnxruntime, and torch.compile parity."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import bcosify
from helpers import randomise_dau_layers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    bmodel = bcosify.convert("timm:test_efficientnet", weights=None, model_kwargs={"num_classes": 4}).eval()
    return bcosify.calibrate(bmodel, torch.rand(4, 3, 32, 32), progress=False)


def test_onnx_matches_pytorch(model, tmp_path):
    path = bcosify.export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 32, 32))
    session = onnxruntime.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = torch.rand(3, 3, 32, 32)  # another batch size than the example: the batch is dynamic
    (out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        reference = model(x).double()
        exact = copy.deepcopy(model).double()(x.double())
    # a random-init EfficientNet at b=2 is ill-conditioned: PyTorch's own float32 logits differ from float64 by
    # up to 1e-3 relative (tests/nn/test_precision.py); ONNX Runtime's must be as close as that
    own = (reference - exact).abs().max().item()
    assert 0 < np.abs(out - exact.numpy()).max() <= max(4 * own, 1e-6 * exact.abs().max().item())
    assert own < 1e-3 * exact.abs().max().item()
    assert not list(tmp_path.glob(".*.onnx"))  # no temporary file left


def test_onnx_of_a_dau_model_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4))
    bmodel = bcosify.convert(original.eval(), mean=0.5, std=0.25, unit="dau", rank=3, temperature=10).eval()
    randomise_dau_layers(bmodel, torch.rand(2, 3, 32, 32))
    path = bcosify.export_onnx(bmodel, tmp_path / "dau.onnx", torch.rand(1, 3, 32, 32))
    x = torch.rand(3, 3, 32, 32)
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    with torch.no_grad():
        reference = bmodel(x).numpy()
    assert np.abs(out - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_onnx_of_constant_padding_and_a_shifted_grid_matches_pytorch(tmp_path):
    """The padding colour (a constant parameter) and the grid shift (a negative padding: a crop) export."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    bmodel = bcosify.convert(original.eval(), mean=0.5, std=0.25, padding_mode="constant", padding_value=0.2,
                             center_grid=True).eval()
    assert [e.path for e in bmodel.report.by_action("shifted")] == ["2"]
    path = bcosify.export_onnx(bmodel, tmp_path / "m.onnx", torch.rand(1, 3, 32, 32))
    x = torch.rand(3, 3, 32, 32)
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    with torch.no_grad():
        reference = bmodel(x).numpy()
    assert np.abs(out - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())


def test_onnx_export_checks_its_example(model, tmp_path):
    with pytest.raises(ValueError, match="channels"):
        bcosify.export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 1, 32, 32))
    with pytest.raises(TypeError, match="BcosModel"):
        bcosify.export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "m.onnx", torch.rand(1, 3, 32, 32))


def _compiled_matches_eager(bmodel, x: torch.Tensor, parameters: bool = False):
    """``torch.compile(bmodel)``: the eager logits (eval), and training through it the eager gradients of ``x`` (and
    of every parameter); returns the compiled model and ``x`` (now requiring gradients)."""
    compiled = torch.compile(bmodel)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), bmodel(x), rtol=1e-5, atol=1e-6)
    bmodel.train()
    x.requires_grad_(True)
    inputs = [x, *bmodel.parameters()] if parameters else [x]
    for a, b in zip(torch.autograd.grad(compiled(x).sum(), inputs), torch.autograd.grad(bmodel(x).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return compiled, x


@pytest.mark.slow
def test_torch_compile_gives_same_logits():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, groups=2),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    bmodel = bcosify.calibrate(bcosify.convert(original.eval(), mean=0.5, std=0.25), torch.rand(4, 3, 16, 16),
                               progress=False)
    _compiled_matches_eager(bmodel, torch.rand(2, 3, 16, 16))


@pytest.mark.slow
def test_torch_compile_of_a_dau_model_gives_same_logits_and_gradients():
    """A tiny DAU model (grouped, strided, a linear layer; random dynamic part) compiled: the eager logits, the
    training gradients (the rank-chunked contraction is not checkpointed while compiling), and in explanation mode
    the same dynamic-linear input gradients. Slow: 254 s on a loaded 2-core machine (three compilations)."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    bmodel = bcosify.convert(original.eval(), mean=0.5, std=0.25, unit="dau", rank=2, temperature=5).eval()
    randomise_dau_layers(bmodel, torch.rand(2, 3, 12, 12))
    compiled, x = _compiled_matches_eager(bmodel, torch.rand(2, 3, 12, 12), parameters=True)
    bmodel.eval()
    with bmodel.explanation_mode():
        (w_eager,) = torch.autograd.grad(bmodel(x)[:, 1].sum(), x)
        (w_compiled,) = torch.autograd.grad(compiled(x)[:, 1].sum(), x)
    torch.testing.assert_close(w_compiled, w_eager, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(w_eager, torch.autograd.grad(bmodel(x)[:, 1].sum(), x)[0]), \
        "explanation mode detaches the dynamic weights"
