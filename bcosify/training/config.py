"""The fine-tuning options, as one dataclass (``FinetuneConfig``), and the per-epoch record (``History``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import BcosConfig, Options

LOSSES = ("bce", "bce_uniform", "ce", "distill", "align")
#: the losses that use no labels: they match the original (the teacher) on the same images
LABEL_FREE_LOSSES = ("distill", "align")
B_SCHEDULES = ("fixed", "linear")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "adamw")
AMP_MODES = ("auto", "off", "bf16")


@dataclass
class FinetuneConfig(Options):
    """Every option of :func:`finetune` (the paper's CNN recipe by default).

    Attributes:
        epochs: passes over the training data.
        lr, optimizer, weight_decay: Adam(W) settings (timm's optimizer factory).
        schedule, warmup_steps: cosine (or constant) learning rate per update, with linear warm-up.
        loss: ``bce`` (one-hot targets with the model's logit bias), ``bce_uniform`` (off-labels 1/C),
            ``ce`` (cross-entropy), ``distill`` (match the original model's softmax; needs no labels), or
            ``align`` (feature alignment, needs no labels: the cosine distance between the converted model's
            penultimate features, pooled, and the original's on the same augmented images; see
            :func:`bcosify.training.loop.compute_loss`).
        distill_temperature: softmax temperature of ``distill`` (and of ``align``'s logit term).
        align_logits: ``align`` only: weight of a ``distill`` term on the logits added to the feature term
            (0: features only; needs the same classes as the original).
        mixup_alpha, cutmix_alpha, label_smoothing: mixup / CutMix of each batch with its mirror (timm's
            ``Mixup``; the Beta distribution's alpha, 0 = off) and label smoothing, giving soft targets (``bce``,
            ``bce_uniform``, ``ce``); mixup and CutMix together: one of them per batch. They need an even batch per
            process.
        b: target alignment exponent (default: the model's current ``b``).
        b_schedule, b_ramp_steps: ``fixed`` (paper) or ``linear`` from 1 to ``b`` over the given updates
            (0 = one epoch). B-cos models only: a model of Dynamic Alignment Units has no ``b``.
        temperature: set the model's logit temperature (every logit is divided by it) before training; the model
            keeps it (saved in its config). CoDA-Nets train with large values (1000): a DAU's output is bounded by
            its input's norm, so a large temperature asks for large, hence aligned, contributions. ``None`` keeps
            the model's.
        agc_clip: adaptive gradient clipping factor (timm's ``adaptive_clip_grad``); ``None`` disables it.
        grad_accum: micro-batches per update.
        amp: ``auto`` (bf16 autocast on CUDA when supported), ``bf16`` or ``off``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ...
        sync_bn: in a distributed run, the uncentred BatchNorm layers use the statistics of the global batch
            (:class:`bcosify.nn.SyncUncenteredBatchNorm2d`) instead of each process's share (the default, as in
            the papers).
        checkpoint_dir, checkpoint_every: checkpoint folder, and updates between checkpoints (0: epoch ends only).
        resume: continue from the last checkpoint in ``checkpoint_dir``.
        metrics_file: a JSON lines file that holds one record per finished epoch (rewritten atomically).
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
    align_logits: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    b: float | None = None
    b_schedule: str = "fixed"
    b_ramp_steps: int = 0
    temperature: float | None = None
    agc_clip: float | None = 0.01
    grad_accum: int = 1
    amp: str = "auto"
    device: str = "auto"
    sync_bn: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    metrics_file: str | None = None
    seed: int | None = 0
    progress: bool = True

    KIND = "finetune"

    def __post_init__(self) -> None:
        for name, allowed in (("loss", LOSSES), ("b_schedule", B_SCHEDULES), ("schedule", SCHEDULES),
                              ("optimizer", OPTIMIZERS), ("amp", AMP_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("epochs and grad_accum must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.align_logits >= 0 and math.isfinite(self.align_logits)):
            raise ValueError(f"align_logits must be a number >= 0, got {self.align_logits}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0 and label_smoothing in [0, 1), got "
                             f"{self.mixup_alpha}, {self.cutmix_alpha}, {self.label_smoothing}")
        if self.loss in ("distill", "align") and (self.mixup_alpha or self.cutmix_alpha or self.label_smoothing):
            raise ValueError(f"mixup, CutMix and label smoothing mix labels; loss={self.loss!r} uses none")
        if self.b is not None:
            self.b = BcosConfig(b=self.b).b
        if self.temperature is not None:
            self.temperature = BcosConfig(temperature=self.temperature).temperature
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")


@dataclass
class History:
    """Per-epoch record of a fine-tuning run."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def last(self, key: str) -> Any:
        return self.epochs[-1][key] if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}
