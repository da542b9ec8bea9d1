"""The conversion options, as one dataclass that round-trips through JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence


TOKEN_POOLS = (None, "mean")


@dataclass
class BcosConfig:
    """Every option of :func:`bcosify.convert`.

    Attributes:
        b: alignment exponent of every B-cos layer (1 = the plain layer).
        keep_bias: keep biases on the value path (and fold BatchNorm centring into them);
            with ``b=1`` the converted model computes the original function.
        normalize_weights: unit-norm weight rows (B-cos v2) instead of the pretrained ``w``.
        mean, std: per-channel input normalisation of the original model, folded into the first layer.
        num_classes: replace the classifier with a fresh one of this many classes.
        logit_bias: fixed value added to every logit; ``None`` means ``-log(C - 1)``, or 0 with ``keep_bias``.
        maxpool_to_avgpool: replace max pooling by average pooling (paper recipe option).
        gap_reorder: apply the classifier as a 1x1 conv before global average pooling.
        token_pool: ``"mean"`` classifies the mean of the patch tokens instead of the class token (vision
            transformers, as B-cos ViTs do; changes the function, so fine-tune after); ``None`` keeps the
            model's own pooling.
        strict: refuse unknown modules on the value path (``False`` leaves them and reports them).
    """

    b: float = 2.0
    keep_bias: bool = False
    normalize_weights: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    logit_bias: float | None = None
    maxpool_to_avgpool: bool = False
    gap_reorder: bool = False
    token_pool: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        self.b = float(self.b)
        if not math.isfinite(self.b) or self.b < 1:
            raise ValueError(f"b must be a finite number >= 1, got {self.b}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _float_tuple(name, value))
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.token_pool not in TOKEN_POOLS:
            raise ValueError(f"token_pool must be one of {TOKEN_POOLS}, got {self.token_pool!r}")
        if self.num_classes is not None and (int(self.num_classes) != self.num_classes or self.num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("mean", "std"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BcosConfig":
        unknown = sorted(set(data) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"unknown conversion options {unknown}; known: {cls.option_names()}")
        return cls(**data)


def _float_tuple(name: str, value: Sequence[float] | float) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = (value,)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {value!r}")
    return out
