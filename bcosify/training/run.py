"""One fine-tuning run into an output folder: the entry shared by ``bcosify finetune`` (one process or many under
``torchrun``) and the demo."""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from torch import nn
from torch.utils.data import Dataset

from ..model import BcosModel
from .config import FinetuneConfig, History
from .data import build_loaders, default_workers
from .distributed import is_main, process_group, world
from .loop import finetune, resolve_device

CHECKPOINTS, METRICS, MODEL = "checkpoints", "metrics.jsonl", "model"


def run_finetune(model: BcosModel, train: Dataset, val: Dataset, config: FinetuneConfig,
                 out: str | os.PathLike, *, batch_size: int, workers: int | None = None,
                 class_names: Sequence[str] | None = None, teacher: nn.Module | None = None) -> History:
    """Fine-tune ``model`` on ``train`` (validated on ``val`` after each epoch) and write to ``out``:
    ``checkpoints/`` (resume state), ``metrics.jsonl`` (one line per epoch) and ``model/`` (:func:`bcosify.save`).

    ``batch_size`` is per process; ``workers`` per process too (``None``: :func:`.data.default_workers`; pinned
    memory on GPUs). Under ``torchrun`` every process runs this with the same arguments; the data
    are sharded over the processes, and rank 0 alone writes.
    """
    from ..export import save

    out = pathlib.Path(out)
    config = config.replace(checkpoint_dir=str(out / CHECKPOINTS), metrics_file=str(out / METRICS))
    with process_group(config.device):
        rank, world_size, _ = world()
        cuda = resolve_device(config.device).type == "cuda"
        train_loader, val_loader = build_loaders(
            train, val, batch_size, workers=default_workers(cuda) if workers is None else workers,
            seed=config.seed or 0, rank=rank, world_size=world_size, pin_memory=cuda)
        history = finetune(model, train_loader, config, val=val_loader, teacher=teacher)
        if is_main():
            save(model, out / MODEL, class_names=class_names)
    return history
