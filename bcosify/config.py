"""The conversion config: the options of :func:`bcosify.convert` and, once converted, every value derived from
the model, as one dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

TOKEN_POOLS = (None, "mean")
PADDING_MODES = ("zeros", "replicate", "reflect", "constant")  # as bcosify.nn.bcos.PADDING_MODES
PADDING_LAYERS = ("first", "all")
CENTER_GRID = (False, True, "auto")
#: the alignment units a model can be converted to: B-cos layers, or Dynamic Alignment Units (CoDA-Nets)
UNITS = ("bcos", "dau")
#: the options only one unit has (the other unit refuses them when set)
UNIT_OPTIONS = {"bcos": ("b", "normalize_weights", "padding_mode", "padding_layers", "padding_value", "center_grid"),
                "dau": ("rank", "squash")}
DEFAULT_B = 2.0
#: the squashing functions of DAU layers, and their default rank
SQUASHES = ("squash", "l2")
DEFAULT_RANK = 32
#: fields filled in by :func:`bcosify.convert` (a user may leave them unset)
RESOLVED_FIELDS = ("mean", "std", "logit_bias", "num_classes", "in_chans", "spec", "model_kwargs", "model_class",
                   "normalization_from")


class Options:
    """What every config dataclass offers: its option names, checked copies, and a JSON round trip."""

    KIND = "config"  # how error messages name the options ("conversion", "finetune")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def _check_names(cls, names, error: type[Exception]) -> None:
        unknown = sorted(set(names) - set(cls.option_names()))
        if unknown:
            raise error(f"unknown {cls.KIND} options {unknown}; known: {cls.option_names()}")

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        self._check_names(changes, TypeError)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-serialisable values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check_json(self) -> None:
        """Raise ``ValueError`` naming the first option JSON cannot hold so that :meth:`from_dict` gets it back
        (a dict key that is not a string, which JSON turns into one; an object JSON cannot write)."""
        def check(value: Any, where: str) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise ValueError(f"{where} has the key {key!r}, which JSON would turn into the string "
                                         f"{str(key)!r}: a config that cannot be written as it is")
                    check(item, f"{where}[{key!r}]")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    check(item, f"{where}[{i}]")
            elif value is not None and not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"{where} is a {type(value).__name__}, which JSON cannot hold: a config that "
                                 "cannot be written as it is")

        for name, value in self.to_dict().items():
            check(value, name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config from :meth:`to_dict`'s output (unknown names raise ``ValueError``)."""
        cls._check_names(data, ValueError)
        return cls(**data)


@dataclass
class BcosConfig(Options):
    """Every option of :func:`bcosify.convert`, and what conversion derives from the model.

    Build one and pass it (``convert(model, config=BcosConfig(b=2))``), or pass the same names as keywords.
    After conversion ``bmodel.config`` holds the resolved config: ``load`` rebuilds a model from it alone.

    Attributes:
        unit: the alignment layer every convolution and linear layer on the value path becomes: ``"bcos"``
            (B-cos layers) or ``"dau"`` (Dynamic Alignment Units of CoDA-Nets, initialised to compute the
            original layer).
        b: alignment exponent of every B-cos layer (1 = the plain layer); B-cos only.
        keep_bias: keep biases on the value path (and fold BatchNorm centring into them);
            with ``b=1`` the converted model computes the original function.
        normalize_weights: unit-norm weight rows (B-cos v2) instead of the pretrained ``w``; B-cos only.
        rank: rank of the dynamic part of every DAU layer (capped at each layer's patch size), or a mapping
            from module path patterns (shell-style, first match wins) to ranks, e.g. ``{"0": 32, "*": 64}``;
            DAU only, default 32.
        squash: the DAU squashing, ``"squash"`` (``u ||u|| / (1 + ||u||^2)``) or ``"l2"`` (``u / ||u||``); DAU only,
            default ``"squash"``.
        temperature: every logit is divided by it (before the logit bias is added); CoDA-Nets train with large
            values, e.g. 1000.
        mean, std: per-channel input normalization of the original model, folded into the first layer
            (default: from the model's metadata).
        num_classes: number of output classes; a value other than the model's replaces its classifier with a
            fresh one of this size.
        logit_bias: fixed value added to every logit; ``None`` means ``-log(C - 1)``, or 0 with ``keep_bias``.
        maxpool_to_avgpool: replace max pooling by average pooling (paper recipe option).
        gap_reorder: apply the classifier as a 1x1 conv before global average pooling.
        token_pool: ``"mean"`` classifies the mean of the patch tokens instead of the class token (vision
            transformers, as B-cos ViTs do; changes the function, so fine-tune after); ``None`` keeps the
            model's own pooling.
        padding_mode: how the converted convolutions (see ``padding_layers``) pad: ``"zeros"`` as the original;
            ``"replicate"`` or ``"reflect"`` pad with copies of the input pixels, so a uniform background stays
            uniform up to the border and the zero-padded border of the ``[x, 1 - x]`` encoding is no constant
            feature the bias-free model can use. Still dynamic linear with exact completeness (the padding is a
            linear map of the input: padded taps' contributions go to the pixels they copy), but the function
            changes at the border (fine-tune after). ``"reflect"`` needs feature maps larger than the padding.
            Measured on the Fashion-MNIST demo it does not remove the border signal: the network draws on the
            edge pixels the padding copies instead (README, "The border signal"). ``"constant"`` (first layer
            only) pads the image with the colour ``padding_value``: encoded as ``[v, 1 - v]`` like every pixel, and
            explained as a constant (its share is in ``constant_contribution``, not in any pixel).
        padding_layers: ``"first"`` (the layer that takes the image) or ``"all"`` B-cos convolutions take
            ``padding_mode``.
        center_grid: shift the last stride-2 downsampling of a convolutional network by one position, so that
            its output grid is centred on the image. An odd kernel with symmetric padding and stride 2 centres
            output ``i`` on input ``2 i``: on even sizes each such layer leaves the grid half a step towards the
            top-left, and a ResNet with total stride 32 puts its last grid 15.5 pixels off centre (at 32 px its one
            output position sits on the top-left pixel, and explanations pile up there). Shifting the last
            stride-2 layers (every branch of that stage) by one moves the grid by half the total stride: 0.5 px off
            centre. B-cos only; changes the function (fine-tune after); input sizes divisible by the total stride.
            ``True`` refuses a network whose last downsampling cannot be shifted (pooling, larger strides, "same"
            padding); ``"auto"`` shifts it where it can and otherwise leaves the grid as it is (said in the report):
            what a recipe uses, so that it also runs with another ``--model``.
        padding_value: with ``padding_mode="constant"``, the padding colour in ``[0, 1]`` per input channel
            (one value is repeated). Default (resolved at conversion): the normalization mean, the colour the
            original model's zero padding of normalized images stands for, so ``b=1`` with biases still computes
            the original exactly. The background colour (e.g. ``0`` for black) makes the padding look like the
            background, so the border is no edge the network can detect in the first layer.
        strict: refuse unknown modules on the value path (``False`` leaves them and reports them).
        class_names: optional names of the output classes.
        in_chans: input color channels (resolved from the model).
        spec, model_kwargs: the ``timm:NAME`` / ``hf-hub:ORG/NAME`` / ``torchvision:NAME`` spec and constructor
            arguments that rebuild the original architecture (resolved for specs and timm instances; ``None``
            for custom models).
        model_class: ``module.QualName`` of the original model (resolved).
        normalization_from: where ``mean``/``std`` came from (resolved).
    """

    unit: str = "bcos"
    b: float = DEFAULT_B
    keep_bias: bool = False
    normalize_weights: bool = False
    rank: int | dict[str, int] | None = None
    squash: str | None = None
    temperature: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    logit_bias: float | None = None
    maxpool_to_avgpool: bool = False
    gap_reorder: bool = False
    token_pool: str | None = None
    padding_mode: str = "zeros"
    padding_layers: str = "first"
    padding_value: tuple[float, ...] | None = None
    center_grid: bool | str = False
    strict: bool = True
    class_names: tuple[str, ...] | None = None
    in_chans: int | None = None
    spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_class: str | None = None
    normalization_from: str | None = None

    KIND = "conversion"

    def __post_init__(self) -> None:
        self.b = float(self.b)
        if not math.isfinite(self.b) or self.b < 1:
            raise ValueError(f"b must be a finite number >= 1, got {self.b}")
        self._check_unit()
        self.temperature = float(self.temperature)
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _float_tuple(name, value))
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.token_pool not in TOKEN_POOLS:
            raise ValueError(f"token_pool must be one of {TOKEN_POOLS}, got {self.token_pool!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if self.padding_layers not in PADDING_LAYERS:
            raise ValueError(f"padding_layers must be one of {PADDING_LAYERS}, got {self.padding_layers!r}")
        if self.padding_value is not None:
            if self.padding_mode != "constant":
                raise ValueError(f"padding_value applies to padding_mode='constant' only, got "
                                 f"padding_mode={self.padding_mode!r}")
            self.padding_value = _float_tuple("padding_value", self.padding_value)
            if not all(0 <= v <= 1 for v in self.padding_value):
                raise ValueError(f"padding_value is a colour in [0, 1] per channel, got {self.padding_value}")
        if self.center_grid not in CENTER_GRID:
            raise ValueError(f"center_grid must be one of {CENTER_GRID}, got {self.center_grid!r}")
        if self.padding_mode == "constant" and self.padding_layers != "first":
            raise ValueError("padding_mode='constant' pads the image (a colour), so it applies to "
                             "padding_layers='first' only")
        for name in ("num_classes", "in_chans"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.logit_bias is not None:
            self.logit_bias = float(self.logit_bias)
            if not math.isfinite(self.logit_bias):
                raise ValueError(f"logit_bias must be finite, got {self.logit_bias}")
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)
            if self.num_classes is not None and len(self.class_names) != self.num_classes:
                raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.model_kwargs = dict(self.model_kwargs or {})

    def _check_unit(self) -> None:
        """Check ``unit`` and that only its own options are set; resolve the DAU defaults."""
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.unit == "bcos":
            given = [name for name in ("rank", "squash") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to unit='dau' "
                                 "only (B-cos layers have no dynamic low-rank part)")
            return
        given = ([f"b={self.b:g}"] if self.b != DEFAULT_B else []) + \
            (["normalize_weights=True"] if self.normalize_weights else []) + \
            ([f"padding_mode={self.padding_mode!r}"] if self.padding_mode != "zeros" else []) + \
            ([f"center_grid={self.center_grid!r}"] if self.center_grid else [])
        if given:
            raise ValueError(f"{' and '.join(given)}: {'B-cos options' if len(given) > 1 else 'a B-cos option'} that "
                             "unit='dau' does not have (DAU layers have no alignment exponent and keep the pretrained "
                             "weights as their static part)")
        if isinstance(self.rank, dict):
            if not self.rank or not all(isinstance(k, str) for k in self.rank):
                raise ValueError(f"a rank mapping needs module path patterns (strings) as keys, got {self.rank!r}")
            self.rank = {k: check_rank(v) for k, v in self.rank.items()}
        else:
            self.rank = check_rank(DEFAULT_RANK if self.rank is None else self.rank)
        self.squash = check_squash("squash" if self.squash is None else self.squash)

    def rank_at(self, path: str) -> int:
        """The DAU rank of the layer at module ``path`` (a ``ValueError`` if a rank mapping names no pattern
        that matches it)."""
        if not isinstance(self.rank, dict):
            return self.rank
        for pattern, rank in self.rank.items():
            if fnmatch.fnmatchcase(path, pattern):
                return rank
        raise ValueError(f"no rank for the layer {path!r}: none of the patterns {list(self.rank)} matches it "
                         "(add a '*' entry)")


def check_rank(rank) -> int:
    """``rank`` as an int, or a ``ValueError`` unless it is an integer >= 1."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return int(rank)


def check_squash(squash) -> str:
    """``squash``, or a ``ValueError`` unless it names a squashing function."""
    if squash not in SQUASHES:
        raise ValueError(f"squash must be one of {SQUASHES}, got {squash!r}")
    return squash


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
