"""``bcosify.finetune``: the short fine-tuning that recovers accuracy after conversion."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import BcosConfig
from .errors import BcosifyError
from .model import BcosModel

LOSSES = ("bce", "bce_uniform", "ce", "distill")
B_SCHEDULES = ("fixed", "linear")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "adamw")
AMP_MODES = ("auto", "off", "bf16")
CHECKPOINT_FORMAT = 1


class TrainingDivergedError(BcosifyError, FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class FinetuneConfig:
    """Every option of :func:`finetune` (the paper's CNN recipe by default).

    Attributes:
        epochs: passes over the training data.
        lr, optimizer, weight_decay: Adam(W) settings (timm's optimizer factory).
        schedule, warmup_steps: cosine (or constant) learning rate per update, with linear warm-up.
        loss: ``bce`` (one-hot targets with the model's logit bias), ``bce_uniform`` (off-labels 1/C),
            ``ce`` (cross-entropy), or ``distill`` (match the original model's softmax; needs no labels).
        distill_temperature: softmax temperature of ``distill``.
        b: target alignment exponent (default: the model's current ``b``).
        b_schedule, b_ramp_steps: ``fixed`` (paper) or ``linear`` from 1 to ``b`` over the given updates
            (0 = one epoch).
        agc_clip: adaptive gradient clipping factor (timm's ``adaptive_clip_grad``); ``None`` disables it.
        grad_accum: micro-batches per update.
        amp: ``auto`` (bf16 autocast on CUDA when supported), ``bf16`` or ``off``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ...
        checkpoint_dir, checkpoint_every: checkpoint folder, and updates between checkpoints (0: epoch ends only).
        resume: continue from the last checkpoint in ``checkpoint_dir``.
        seed: seeds torch's generator at the start (``None``: leave it).
        progress: tqdm progress bars and a summary line per epoch.
    """

    epochs: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    loss: str = "bce"
    distill_temperature: float = 1.0
    b: float | None = None
    b_schedule: str = "fixed"
    b_ramp_steps: int = 0
    agc_clip: float | None = 0.01
    grad_accum: int = 1
    amp: str = "auto"
    device: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    seed: int | None = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("loss", LOSSES), ("b_schedule", B_SCHEDULES), ("schedule", SCHEDULES),
                              ("optimizer", OPTIMIZERS), ("amp", AMP_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("epochs and grad_accum must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.b is not None:
            self.b = BcosConfig(b=self.b).b
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class History:
    """Per-epoch record of a fine-tuning run."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def last(self, key: str) -> Any:
        return self.epochs[-1][key] if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}


# --- helpers -----------------------------------------------------------------------------------------

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


def _normalise(x: torch.Tensor, model: BcosModel) -> torch.Tensor:
    mean = torch.tensor(model.options.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(model.options.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def compute_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor | None,
                 teacher_logits: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The training loss ``kind`` (one of ``LOSSES``) of a batch of logits."""
    if kind == "distill":
        if teacher_logits is None:
            raise ValueError("loss='distill' needs a teacher (the original model)")
        t = temperature
        return F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                        reduction="batchmean", log_target=True) * t * t
    if labels is None:
        raise ValueError(f"loss={kind!r} needs labels; use loss='distill' for unlabelled data")
    if kind == "ce":
        return F.cross_entropy(logits.float(), labels)
    targets = F.one_hot(labels, logits.shape[1]).float()
    if kind == "bce_uniform":
        targets = targets.clamp_min(1.0 / logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, *, mean=None, std=None, device: str = "auto",
             progress: bool = False, desc: str = "evaluate") -> float:
    """Top-1 accuracy of ``model`` on ``data`` (batches of images in [0, 1] with labels).

    A plain (unconverted) model gets its images normalised with ``mean``/``std`` first.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval().to(device)
    norm = None
    if not isinstance(model, BcosModel):
        if mean is None or std is None:
            raise ValueError("an unconverted model needs the mean and std of its input normalisation")
        norm = (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))
    correct = total = 0
    try:
        for batch in tqdm(data, desc=desc, leave=False, disable=not progress):
            x, y = _split_batch(batch)
            if y is None:
                raise ValueError("evaluate needs labelled batches")
            x, y = x.to(device), y.to(device)
            if norm is not None:
                x = (x - norm[0]) / norm[1]
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got no data")
    return correct / total


# --- checkpoints (safetensors + JSON, no pickle) ---------------------------------------------------------

def _tensor_state(prefix: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}{key}"] = value.detach().cpu().contiguous().clone()
        else:
            plain[key] = value
    return tensors, plain


def save_checkpoint(folder: pathlib.Path, model: BcosModel, optimizer, scheduler, meta: dict) -> pathlib.Path:
    """Write a checkpoint folder ``step-N`` atomically and point ``latest`` at it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{meta['global_step']:08d}"
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_plain: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for index, state in opt["state"].items():
        t, plain = _tensor_state(f"optimizer.{index}.", state)
        tensors.update(t)
        opt_plain["state"][str(index)] = plain
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.epoch_start"] = meta.pop("epoch_start_rng")
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    save_file(tensors, str(tmp / "state.safetensors"))
    payload = {"format": CHECKPOINT_FORMAT, **meta, "optimizer": opt_plain,
               "optimizer_tensor_keys": sorted(k for k in tensors if k.startswith("optimizer.")),
               "scheduler": scheduler.state_dict() if scheduler is not None else None}
    (tmp / "state.json").write_text(json.dumps(payload, default=_json_default))
    final = folder / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = folder / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, folder / "latest")
    for old in sorted(p for p in folder.glob("step-*") if p.name != name)[:-1]:  # keep the previous one too
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def latest_checkpoint(folder: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint folder under ``folder``, if any."""
    pointer = pathlib.Path(folder) / "latest"
    if not pointer.is_file():
        return None
    path = pathlib.Path(folder) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() and (path / "state.safetensors").is_file() else None


def load_checkpoint(path: pathlib.Path, model: BcosModel, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder; return its metadata."""
    from safetensors.torch import load_file

    from .checkpoints import load_weights

    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:
        raise BcosifyError(f"checkpoint {str(path)!r} is unreadable: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BcosifyError(f"checkpoint {str(path)!r} has format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    load_weights(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_plain = meta["optimizer"]
    state: dict[int, dict] = {int(i): dict(plain) for i, plain in opt_plain["state"].items()}
    for key in meta["optimizer_tensor_keys"]:
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensors[key]
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt_plain["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    meta["rng_after"] = tensors["rng.torch"]
    meta["epoch_start_rng"] = tensors["rng.epoch_start"]
    return meta


# --- the loop ------------------------------------------------------------------------------------------

def finetune(model: BcosModel, train: Iterable, *, val: Iterable | None = None, teacher: nn.Module | None = None,
             **options: Any) -> History:
    """Fine-tune a converted model on ``train`` (a DataLoader of images in [0, 1], with labels unless distilling).

    Options are the fields of :class:`FinetuneConfig`. ``teacher`` is the original (unconverted) model, needed
    for ``loss="distill"``. Returns the per-epoch :class:`History`; the model ends in eval mode.
    """
    unknown = sorted(set(options) - set(FinetuneConfig.option_names()))
    if unknown:
        raise TypeError(f"unknown finetune options {unknown}; known: {FinetuneConfig.option_names()}")
    cfg = FinetuneConfig(**options)
    if not isinstance(model, BcosModel):
        raise TypeError(f"finetune needs a BcosModel (from bcosify.convert), got {type(model).__name__}")
    if cfg.loss == "distill" and teacher is None:
        raise ValueError("loss='distill' needs teacher=<the original, unconverted model>")
    try:
        batches_per_epoch = len(train)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("train must have a length (a DataLoader over a map-style dataset)") from None
    if batches_per_epoch == 0:
        raise ValueError("train is empty")
    import timm.optim
    import timm.scheduler
    import timm.utils

    device = resolve_device(cfg.device)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
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
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"

    history = History()
    start_epoch, skip_batches, update = 0, 0, 0
    resume_meta = None
    checkpoint_root = pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    last_checkpoint: pathlib.Path | None = None
    if cfg.resume:
        last_checkpoint = latest_checkpoint(checkpoint_root)
        if last_checkpoint is not None:
            resume_meta = load_checkpoint(last_checkpoint, model, optimizer, scheduler)
            start_epoch, skip_batches = resume_meta["epoch"], resume_meta["batch_in_epoch"]
            update = resume_meta["global_step"]
            history = History(resume_meta["history"])
            if skip_batches >= batches_per_epoch:
                start_epoch, skip_batches = start_epoch + 1, 0

    for epoch in range(start_epoch, cfg.epochs):
        resuming = resume_meta is not None and epoch == resume_meta["epoch"]
        if resuming:
            torch.set_rng_state(resume_meta["epoch_start_rng"])
        epoch_start_rng = torch.get_rng_state()
        batches = iter(train)
        if resuming and skip_batches:
            for _ in range(skip_batches):
                next(batches)
            torch.set_rng_state(resume_meta["rng_after"])
        running = resume_meta.get("running", {}) if resuming else {}
        loss_sum, correct, seen = running.get("loss_sum", 0.0), running.get("correct", 0), running.get("seen", 0)
        start = time.perf_counter() - running.get("seconds", 0.0)
        model.train()
        bar = tqdm(total=batches_per_epoch, initial=skip_batches if resuming else 0, disable=not cfg.progress,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        first = skip_batches if resuming else 0
        optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(batches, start=first):
            x, labels = _split_batch(batch)
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            model.set_b(b_at(update))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(x)
                teacher_logits = None
                if teacher is not None and cfg.loss == "distill":
                    with torch.no_grad():
                        teacher_logits = teacher(_normalise(x, model))
            loss = compute_loss(cfg.loss, logits, labels, teacher_logits, cfg.distill_temperature)
            if not torch.isfinite(loss):
                where = str(last_checkpoint) if last_checkpoint else "none (pass checkpoint_dir to keep some)"
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at update {update + 1} (epoch {epoch + 1}, batch {index + 1}); "
                    f"last good checkpoint: {where}")
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() * len(x)
            seen += len(x)
            if labels is not None:
                correct += int((logits.detach().argmax(1) == labels).sum())
            end_of_update = (index + 1) % cfg.grad_accum == 0 or index + 1 == batches_per_epoch
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
                    last_checkpoint = save_checkpoint(checkpoint_root, model, optimizer, scheduler, {
                        "epoch": epoch, "batch_in_epoch": index + 1, "global_step": update,
                        "history": history.epochs, "epoch_start_rng": epoch_start_rng,
                        "running": {"loss_sum": loss_sum, "correct": correct, "seen": seen,
                                    "seconds": time.perf_counter() - start}})
            bar.update(1)
            if cfg.progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}",
                                acc=f"{correct / seen:.3f}" if labels is not None else "-",
                                lr=f"{optimizer.param_groups[0]['lr']:.1e}", b=f"{model.b:.2f}")
        bar.close()
        record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
                  "accuracy": correct / seen if seen and labels is not None else None,
                  "lr": optimizer.param_groups[0]["lr"], "b": model.b, "updates": update,
                  "seconds": time.perf_counter() - start}
        if val is not None:
            record["val_accuracy"] = evaluate(model, val, device=str(device), progress=cfg.progress,
                                              desc="validate")
            model.train()
        history.epochs.append(record)
        if cfg.progress:
            acc = f"  acc {record['accuracy']:.2%}" if record["accuracy"] is not None else ""
            val_text = f"  val {record['val_accuracy']:.2%}" if "val_accuracy" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}{acc}{val_text}  "
                       f"lr {record['lr']:.1e}  b {record['b']:.2f}  {record['seconds']:.0f}s")
        if checkpoint_root:
            last_checkpoint = save_checkpoint(checkpoint_root, model, optimizer, scheduler, {
                "epoch": epoch + 1, "batch_in_epoch": 0, "global_step": update, "history": history.epochs,
                "epoch_start_rng": torch.get_rng_state()})
        resume_meta = None
    model.eval()
    return history
