"""Shared helpers: the eval-mode context and atomic writes."""

from __future__ import annotations

import pytest
from torch import nn

from bcosify.utils import atomic_write, eval_mode


def test_eval_mode_restores_every_submodule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model[1].eval()  # a mixed state, as timm leaves some modules
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("inside")
    assert model.training and not model[1].training


def test_atomic_write_replaces_whole_files_and_a_crash_leaves_none(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    assert atomic_write(path, lambda tmp: tmp.write_bytes(b"one")) == path
    assert path.read_bytes() == b"one"

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"one" and sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]


def test_copy_module_copies_cached_non_leaf_tensors():
    import torch

    from bcosify.utils import copy_module

    class Cached(nn.Module):  # as timm's EfficientFormer caches its attention biases in eval mode
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(3))
            self.cache = {"k": self.bias * 2}

    model = Cached()
    with pytest.raises(RuntimeError):
        import copy

        copy.deepcopy(model)
    twin = copy_module(model)
    assert twin.cache["k"].grad_fn is None and torch.equal(twin.cache["k"], model.cache["k"])
    assert twin.bias is not model.bias and torch.equal(twin.bias, model.bias)
