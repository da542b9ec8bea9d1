"""Small helpers shared by every stage."""

from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import tempfile
from typing import Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode within the context; restore every submodule's own mode after."""
    saved = {m: m.training for module in modules for m in module.modules()}
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in saved.items():
            m.training = flag


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Write ``path`` through ``write(tmp_path)`` to a temporary file beside it, flush it to disk, then rename it
    into place: readers see the old file or the new one, never a part."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that also works when its forward cached non-leaf tensors in plain attributes
    (attention-bias caches of timm's EfficientFormer, LeViT, ...), which ``copy.deepcopy`` refuses: those are
    copied detached."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        for value in vars(sub).values():
            items = list(value.values()) if isinstance(value, dict) else value
            for item in items if isinstance(items, (list, tuple)) else (value,):
                if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                    memo[id(item)] = item.detach().clone()
    return copy.deepcopy(module, memo)
