"""``bcosify.finetune``: the short fine-tuning that recovers accuracy after conversion; ``evaluate``; and the
plain training of an original model (the demo's "existing checkpoint")."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import random
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import normalize
from ..errors import BcosifyError
from ..model import BcosModel
from ..nn import sync_batchnorm
from ..utils import atomic_write, eval_mode
from .config import FinetuneConfig, History
from .data import set_epoch
from .distributed import all_sum, each_process, from_main, gather, is_distributed, is_main
from .state import (latest_checkpoint, read_checkpoint, restore_checkpoint, restore_host_rng, rng_state,
                    save_checkpoint)


class TrainingDivergedError(BcosifyError, FloatingPointError):
    """The loss became NaN or infinite."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise TypeError(f"a batch must be images or (images, labels) tensors, got {type(batch).__name__}")


def compute_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor | None,
                 teacher_logits: torch.Tensor | None = None, temperature: float = 1.0, *,
                 features: torch.Tensor | None = None, teacher_features: torch.Tensor | None = None,
                 align_logits: float = 0.0) -> torch.Tensor:
    """The training loss ``kind`` (one of ``LOSSES``) of a batch of logits; ``labels`` are class indices or soft
    targets (an ``(N, classes)`` float tensor).

    ``align`` is the mean over images of the cosine distance ``1 - cos(features, teacher_features)`` between
    the converted model's penultimate features and the original's, both ``(N, D)`` (pooled), plus
    ``align_logits`` times the ``distill`` loss. A distance of directions, not of magnitudes: a B-cos network
    scales its activations by ``|cos|^(b-1)`` by design and has no biases, so its features cannot take the
    original's scale and offsets, and need not (the classifier reads their direction, its own scale is free);
    matching magnitudes as well (a mean squared error) would fight that. Labels are not used.
    """
    if kind == "align":
        if features is None or teacher_features is None:
            raise ValueError("loss='align' needs the features of the model and of a teacher (the original model)")
        if features.shape != teacher_features.shape:
            raise ValueError(f"loss='align': the model's features {tuple(features.shape)} and the original's "
                             f"{tuple(teacher_features.shape)} differ in shape")
        loss = (1 - F.cosine_similarity(features.float(), teacher_features.float(), dim=1)).mean()
        if align_logits:
            if teacher_logits is None or teacher_logits.shape != logits.shape:
                raise ValueError("align_logits > 0 needs the original's logits, with the model's classes")
            return loss + align_logits * compute_loss("distill", logits, None, teacher_logits, temperature)
        # the classifier gets zero gradients rather than none: DistributedDataParallel waits for a gradient of
        # every parameter the output depends on
        return loss + 0 * logits.float().sum()
    if kind == "distill":
        if teacher_logits is None:
            raise ValueError("loss='distill' needs a teacher (the original model)")
        t = temperature
        return F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                        reduction="batchmean", log_target=True) * t * t
    if labels is None:
        raise ValueError(f"loss={kind!r} needs labels; use loss='distill' or 'align' for unlabelled data")
    if kind == "ce":
        return F.cross_entropy(logits.float(), labels.float() if labels.is_floating_point() else labels)
    # class indices, or soft targets (one row of class probabilities per image: mixup, label smoothing)
    targets = labels.float() if labels.is_floating_point() else F.one_hot(labels, logits.shape[1]).float()
    if kind == "bce_uniform":
        targets = targets.clamp_min(1.0 / logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


class FeatureTap:
    """The input of a model's classifier (the last module of ``types`` that runs), captured while
    :meth:`capture` is active and pooled to ``(N, D)``: the penultimate features."""

    def __init__(self, model: nn.Module, types: tuple[type, ...]) -> None:
        self.model, self.types = model, types
        self.module: nn.Module | None = None
        self.value: torch.Tensor | None = None

    @torch.no_grad()
    def locate(self, forward) -> "FeatureTap":
        """Find the classifier by running ``forward()`` once (without gradients, in eval mode)."""
        order: list[nn.Module] = []
        handles = [m.register_forward_pre_hook(lambda m, i: order.append(m)) for m in self.model.modules()
                   if isinstance(m, self.types)]
        try:
            with eval_mode(self.model):
                forward()
        finally:
            for h in handles:
                h.remove()
        if not order:
            raise ValueError(f"loss='align': no {' or '.join(t.__name__ for t in self.types)} runs in "
                             f"{type(self.model).__name__}, so its penultimate features cannot be found")
        self.module = order[-1]
        return self

    @contextlib.contextmanager
    def capture(self):
        """Keep the classifier's input of the forwards run inside the block."""
        handle = self.module.register_forward_pre_hook(lambda m, inputs: setattr(self, "value", inputs[0]))
        try:
            yield self
        finally:
            handle.remove()

    def pooled(self) -> torch.Tensor:
        """The last captured features, averaged over positions or tokens: ``(N, D)``."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("no features were captured (the classifier did not run)")
        if value.dim() == 4:  # (N, C, H, W): a 1x1 conv classifier before pooling
            return value.mean((2, 3))
        return value.flatten(1, -2).mean(1) if value.dim() > 2 else value


@contextlib.contextmanager
def _capturing(taps: Sequence[FeatureTap] | None):
    with contextlib.ExitStack() as stack:
        for tap in taps or ():
            stack.enter_context(tap.capture())
        yield


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, *, mean=None, std=None, device: str = "auto",
             progress: bool = False, desc: str = "evaluate", distributed: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (batches of images in [0, 1] with labels).

    A plain (unconverted) model gets its images normalized with ``mean``/``std`` first. With ``distributed``
    every process of the group holds its own share of the data and all of them get the accuracy of the whole.
    """
    device = resolve_device(device)
    plain = not isinstance(model, BcosModel)
    if plain and (mean is None or std is None):
        raise ValueError("an unconverted model needs the mean and std of its input normalization")
    correct = total = 0
    with eval_mode(model.to(device)):
        for batch in tqdm(data, desc=desc, leave=False, disable=not progress):
            x, y = _split_batch(batch)
            if y is None:
                raise ValueError("evaluate needs labelled batches")
            x, y = x.to(device), y.to(device)
            correct += int((model(normalize(x, mean, std) if plain else x).argmax(1) == y).sum())
            total += len(y)
    if distributed:
        correct, total = all_sum(correct, total)
    if total == 0:
        raise ValueError("evaluate got no data")
    return correct / total


# --- the loop ------------------------------------------------------------------------------------------

def _waiting(batches: Iterable, waited: list[float]) -> Iterator:
    """The items of ``batches``, adding the seconds spent waiting for each one to ``waited[0]``."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield item


def _label_mixer(cfg: FinetuneConfig, num_classes: int, batch_size: int | None):
    """``mix(x, labels) -> (mixed x, soft targets)`` for mixup/CutMix/label smoothing, or ``None`` without them."""
    if not (cfg.mixup_alpha or cfg.cutmix_alpha or cfg.label_smoothing):
        return None
    from timm.data.mixup import Mixup, mixup_target

    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return lambda x, labels: (x, mixup_target(labels, num_classes, smoothing=cfg.label_smoothing))
    if batch_size is not None and batch_size % 2:
        raise ValueError(f"mixup and CutMix pair each image with another: the batch per process must be even, "
                         f"got {batch_size}")
    mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, label_smoothing=cfg.label_smoothing,
                  num_classes=num_classes)
    return lambda x, labels: mixup(x.clone(), labels)  # timm mixes in place; the caller's batch stays


def finetune(model: BcosModel, train: Iterable, config: FinetuneConfig | None = None, *,
             val: Iterable | None = None, teacher: nn.Module | None = None, **options: Any) -> History:
    """Fine-tune a converted model on ``train`` (a DataLoader of images in [0, 1], with labels unless distilling).

    ``config`` is a :class:`FinetuneConfig`; ``**options`` (its field names) override its values. ``teacher`` is
    the original (unconverted) model, needed for ``loss="distill"`` and ``loss="align"`` (which use no labels:
    ``train`` may yield images alone, and labels it yields are ignored). Returns the per-epoch
    :class:`History`; the model ends in eval mode.

    In a distributed run (every process calls ``finetune`` inside :func:`bcosify.training.distributed.process_group`,
    with its share of the data, e.g. from :func:`bcosify.training.data.build_loaders`) the model is wrapped in
    ``DistributedDataParallel``; losses and accuracies are summed over the processes, and only rank 0 shows
    progress and writes checkpoints and the metrics file.
    """
    cfg = (config if config is not None else FinetuneConfig()).replace(**options)
    if not isinstance(model, BcosModel):
        raise TypeError(f"finetune needs a BcosModel (from bcosify.convert), got {type(model).__name__}")
    if model.unit != "bcos" and (cfg.b_schedule != "fixed" or cfg.b not in (None, model.b)):
        raise ValueError(f"b and b_schedule set the exponent of B-cos layers; this model's layers are "
                         f"unit={model.unit!r} (use temperature to change the alignment pressure)")
    if cfg.temperature is not None:
        model.set_temperature(cfg.temperature)
    if cfg.loss in ("distill", "align") and teacher is None:
        raise ValueError(f"loss={cfg.loss!r} needs teacher=<the original, unconverted model>")
    try:
        batches_per_epoch = len(train)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("train must have a length (a DataLoader over a map-style dataset)") from None
    if batches_per_epoch == 0:
        raise ValueError("train is empty")
    if cfg.sync_bn and is_distributed():  # the same run, its BatchNorm layers synchronised
        with sync_batchnorm(model):
            return finetune(model, train, cfg.replace(sync_bn=False), val=val, teacher=teacher)
    import timm.optim
    import timm.scheduler
    import timm.utils

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    distributed, main = is_distributed(), is_main()
    progress = cfg.progress and main
    step_batch = getattr(train, "batch_size", None)  # images of one micro-batch over all processes
    if distributed and step_batch:
        step_batch *= torch.distributed.get_world_size()
    global_batch = step_batch * cfg.grad_accum if step_batch else None  # images of one update
    rank = torch.distributed.get_rank() if distributed else 0
    if cfg.seed is not None:  # each process its own streams: augmentations, dropout, mixup differ between them
        torch.manual_seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)  # timm's Mixup draws from numpy
        random.seed(cfg.seed + rank)  # timm's crops and RandAugment from Python's
    model.to(device)
    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    taps: tuple[FeatureTap, FeatureTap] | None = None
    target_b = cfg.b if cfg.b is not None else model.b
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_updates = cfg.epochs * updates_per_epoch
    ramp = cfg.b_ramp_steps or updates_per_epoch

    def b_at(update: int) -> float:
        if cfg.b_schedule == "fixed":
            return target_b
        return 1 + (target_b - 1) * min(1.0, update / ramp)

    optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               foreach=False)
    scheduler = None
    if cfg.schedule == "cosine":
        scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=max(total_updates - cfg.warmup_steps, 1),
                                                     warmup_t=cfg.warmup_steps, warmup_lr_init=cfg.lr * 1e-3,
                                                     warmup_prefix=True, t_in_epochs=False, lr_min=cfg.lr * 1e-2)
    elif cfg.warmup_steps:
        scheduler = timm.scheduler.StepLRScheduler(optimizer, decay_t=10 ** 9, warmup_t=cfg.warmup_steps,
                                                   warmup_lr_init=cfg.lr * 1e-3, t_in_epochs=False)
    mix = _label_mixer(cfg, model.num_classes, getattr(train, "batch_size", None))
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"

    history = History()
    start_epoch, skip_batches, update = 0, 0, 0
    resume_meta = None
    checkpoint_root = pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    last_checkpoint: pathlib.Path | None = None
    if cfg.resume:
        def read_latest():
            path = latest_checkpoint(checkpoint_root)
            return read_checkpoint(path) if path is not None else None

        found = from_main(read_latest)  # rank 0's checkpoint, for every process
        if found is not None:
            last_checkpoint = found[0]
            resume_meta = restore_checkpoint(found, model, optimizer, scheduler, rank)
            if None not in (resume_meta.get("global_batch"), global_batch) and \
                    resume_meta["global_batch"] != global_batch:
                raise BcosifyError(f"checkpoint {str(last_checkpoint)!r} was written with a global batch of "
                                   f"{resume_meta['global_batch']}, this run has {global_batch}: resume with the "
                                   "same global batch (processes x batch per process x grad_accum; any split)")
            start_epoch, skip_batches = resume_meta["epoch"], resume_meta["batch_in_epoch"]
            if step_batch and resume_meta.get("images_in_epoch") is not None:  # any split of the global batch
                skip_batches = resume_meta["images_in_epoch"] // step_batch
            update = resume_meta["global_step"]
            history = History(resume_meta["history"])
            if skip_batches >= batches_per_epoch:
                start_epoch, skip_batches = start_epoch + 1, 0

    for epoch in range(start_epoch, cfg.epochs):
        resuming = resume_meta is not None and epoch == resume_meta["epoch"]
        if resuming:
            torch.set_rng_state(resume_meta["epoch_start_rng"])
        epoch_start_rng = torch.get_rng_state()
        set_epoch(train, epoch)
        batches = iter(train)
        if resuming and skip_batches:
            for _ in range(skip_batches):
                next(batches)
            torch.set_rng_state(resume_meta["rng_after"])
        if resuming:
            restore_host_rng(resume_meta)  # after the skipped batches' augmentations drew from it
        running = resume_meta.get("running", {}) if resuming and main else {}  # saved summed over processes
        loss_sum, correct, seen = running.get("loss_sum", 0.0), running.get("correct", 0), running.get("seen", 0)
        start = time.perf_counter() - running.get("seconds", 0.0)
        model.train()
        # one step of the bar is one micro-batch of every process: it counts (and rates) the images of all of them
        bar = tqdm(total=batches_per_epoch, initial=skip_batches if resuming else 0, disable=not progress,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   unit="img" if step_batch else "batch", unit_scale=step_batch or False)
        first = skip_batches if resuming else 0
        optimizer.zero_grad(set_to_none=True)
        waited, session_start = [0.0], time.perf_counter()
        for index, batch in enumerate(_waiting(batches, waited), start=first):
            x, labels = _split_batch(batch)
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            if cfg.loss == "align" and taps is None:
                taps = _feature_taps(model, teacher, x[:1])
            targets = labels
            if mix is not None and labels is not None:
                x, targets = mix(x, labels)
            model.set_b(b_at(update))
            end_of_update = (index + 1) % cfg.grad_accum == 0 or index + 1 == batches_per_epoch
            # DDP averages gradients on the last micro-batch of an update only
            with contextlib.nullcontext() if end_of_update or not distributed else net.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"), _capturing(taps):
                    logits = net(x)
                    teacher_logits = None
                    if teacher is not None and cfg.loss in ("distill", "align"):
                        with torch.no_grad():
                            teacher_logits = teacher(normalize(x, model.config.mean, model.config.std))
                features = (taps[0].pooled(), taps[1].pooled()) if taps is not None else (None, None)
                loss = compute_loss(cfg.loss, logits, targets, teacher_logits, cfg.distill_temperature,
                                    features=features[0], teacher_features=features[1],
                                    align_logits=cfg.align_logits)
                losses = each_process(loss.item())  # every process stops when one diverges, none hangs
                if not all(math.isfinite(v) for v in losses):
                    where = (str(last_checkpoint) if last_checkpoint else "none yet" if checkpoint_root
                             else "none (pass checkpoint_dir to keep some)")
                    bad = [(r, v) for r, v in enumerate(losses) if not math.isfinite(v)]
                    on = f" on rank {', '.join(str(r) for r, _ in bad)}" if distributed else ""
                    raise TrainingDivergedError(
                        f"loss became {bad[0][1]}{on} at update {update + 1} (epoch {epoch + 1}, batch {index + 1}); "
                        f"last good checkpoint: {where}")
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() * len(x)
            seen += len(x)
            if labels is not None:
                correct += int((logits.detach().argmax(1) == labels).sum())
            if end_of_update:
                if cfg.agc_clip is not None:
                    timm.utils.adaptive_clip_grad(model.parameters(), clip_factor=cfg.agc_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update += 1
                if scheduler is not None:
                    scheduler.step_update(update)
                if checkpoint_root and cfg.checkpoint_every and update % cfg.checkpoint_every == 0 \
                        and index + 1 < batches_per_epoch:
                    totals = all_sum(loss_sum, correct, seen)  # every process takes part
                    rngs = gather(rng_state(epoch_start_rng))
                    if main:
                        last_checkpoint = save_checkpoint(checkpoint_root, model, optimizer, scheduler, {
                            "epoch": epoch, "batch_in_epoch": index + 1, "global_step": update,
                            "images_in_epoch": (index + 1) * step_batch if step_batch else None,
                            "global_batch": global_batch, "history": history.epochs,
                            "rng": rngs,
                            "running": {"loss_sum": totals[0], "correct": int(totals[1]), "seen": int(totals[2]),
                                        "seconds": time.perf_counter() - start}})
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}",
                                acc=f"{correct / seen:.3f}" if labels is not None else "-",
                                lr=f"{optimizer.param_groups[0]['lr']:.1e}", b=f"{model.b:.2f}")
        bar.close()
        loss_sum, correct, seen = all_sum(loss_sum, correct, seen)
        record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
                  "accuracy": correct / seen if seen and labels is not None else None,
                  "lr": optimizer.param_groups[0]["lr"], "b": model.b, "temperature": model.config.temperature,
                  "updates": update,
                  "seconds": time.perf_counter() - start}
        record["images_per_second"] = seen / record["seconds"]  # of all processes together
        record["data_share"] = waited[0] / (time.perf_counter() - session_start)  # rank 0's wait for the loader
        if val is not None:
            record["val_accuracy"] = evaluate(model, val, device=str(device), progress=progress, desc="validate",
                                              distributed=distributed)
            model.train()
        history.epochs.append(record)
        if cfg.metrics_file and main:
            lines = "".join(json.dumps(r) + "\n" for r in history.epochs)
            atomic_write(cfg.metrics_file, lambda tmp: tmp.write_text(lines))
        if progress:
            acc = f"  acc {record['accuracy']:.2%}" if record["accuracy"] is not None else ""
            val_text = f"  val {record['val_accuracy']:.2%}" if "val_accuracy" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}{acc}{val_text}  "
                       f"lr {record['lr']:.1e}  b {record['b']:.2f}  {record['seconds']:.0f}s  "
                       f"{record['images_per_second']:.0f} img/s  data {record['data_share']:.0%}")
        rngs = gather(rng_state(torch.get_rng_state())) if checkpoint_root else []  # every process takes part
        if checkpoint_root and main:
            last_checkpoint = save_checkpoint(checkpoint_root, model, optimizer, scheduler, {
                "epoch": epoch + 1, "batch_in_epoch": 0, "global_step": update, "global_batch": global_batch,
                "history": history.epochs, "rng": rngs})
        resume_meta = None
    model.eval()
    return history


def _feature_taps(model: BcosModel, teacher: nn.Module, x: torch.Tensor) -> tuple[FeatureTap, FeatureTap]:
    """Taps on the penultimate features of the converted model and of the original, located on ``x``."""
    from ..nn import BcosConv2d, BcosLinear

    student = FeatureTap(model.network, (BcosLinear, BcosConv2d)).locate(lambda: model(x))
    original = FeatureTap(teacher, (nn.Linear, nn.Conv2d)).locate(
        lambda: teacher(normalize(x, model.config.mean, model.config.std)))
    return student, original


def train_original(model: nn.Module, train: Iterable, *, mean: Sequence[float], std: Sequence[float],
                   epochs: int = 1, lr: float = 1e-3, schedule: str = "constant", device: str = "auto",
                   val: Iterable | None = None, progress: bool = True) -> list[float]:
    """Train a plain (unconverted) classifier with Adam and cross-entropy on images in [0, 1] (normalized with
    ``mean``/``std``): the "existing checkpoint" of the demo and the benchmarks.

    ``schedule``: ``constant`` or ``cosine`` (per update). Returns the accuracy on ``val`` after each epoch (empty
    without ``val``); the model ends in eval mode.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    device = resolve_device(device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train))
                 if schedule == "cosine" else None)
    accuracies = []
    for epoch in range(epochs):
        model.train()
        set_epoch(train, epoch)
        bar = tqdm(train, desc=f"original {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for batch in bar:
            x, y = _split_batch(batch)
            loss = F.cross_entropy(model(normalize(x.to(device), mean, std)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if val is not None:
            accuracies.append(evaluate(model, val, mean=mean, std=std, device=str(device)))
    model.eval()
    return accuracies
