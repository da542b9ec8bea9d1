"""``bcosify.save`` / ``bcosify.load``: a converted model as ``model.safetensors`` + ``config.json`` + model card.

``config.json`` holds the resolved :class:`~bcosify.BcosConfig`; ``load`` rebuilds the architecture from it,
converts it with that config, and loads the weights: nothing is patched afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

from torch import nn

from .. import __version__
from ..config import BcosConfig
from ..errors import CheckpointError
from ..model import BcosModel
from ..utils import atomic_write
from ..weights import build_model, load_weights, read_state_dict, upgrade_gate_branch_names

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: 3: the config may hold options format-2 readers do not know (unit, rank, squash, temperature, padding_mode,
#: padding_value, padding_layers), so they say "newer bcosify" instead of "invalid config"; format 2 reads as is
#: (defaults).
#: 4: squeeze-excite branches keep their library's names (read from their forwards, no wrapper): older weights are
#: renamed on loading (:func:`bcosify.weights.upgrade_gate_branch_names`)
FORMAT_VERSION = 4
_REQUIRED_KEYS = {1: ("source", "options", "in_chans", "num_classes", "logit_bias"), 2: ("config",), 3: ("config",),
                  4: ("config",)}


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(model: BcosModel) -> str:
    """A model card (markdown) with the source, config and conversion report."""
    config = model.config
    spec = config.spec or config.model_class or "a custom model"
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in config.to_dict().items())
    load = ("bmodel = bcosify.load(\"PATH\")" if config.spec
            else "bmodel = bcosify.load(\"PATH\", model=MyUnconvertedModel())")
    return f"""---
library_name: bcosify
tags: [b-cos, interpretability, image-classification]
---

# B-cos version of `{spec}`

Converted with bcosify {__version__}: dynamic linear, `logit(x) = W(x) . x` exactly, with `W(x)` as the
explanation. Inputs are images in [0, 1] with {model.in_chans} channels (the normalization is folded into
the first layer); {model.num_classes} classes; fixed logit bias {model.logit_bias:.6g}.

```python
import bcosify
{load}
explanation = bcosify.explain(bmodel, images)
```

| config | value |
|---|---|
{rows}

## Conversion report

```
{model.report.table()}
```
"""


def save(model: BcosModel, folder: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> pathlib.Path:
    """Write ``model`` to ``folder`` as ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

    ``class_names`` (one per class) are recorded in the model's config. Each file is written atomically;
    ``config.json`` (written last) records the weights' SHA-256, so an interrupted save is never loaded with
    mismatched files.
    """
    from safetensors.torch import save_file

    if not isinstance(model, BcosModel):
        raise TypeError(f"save needs a BcosModel (from bcosify.convert), got {type(model).__name__}")
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names for {model.num_classes} classes")
    named = model.config if class_names is None else \
        model.config.replace(class_names=tuple(str(c) for c in class_names))
    try:  # before anything is written
        named.check_json()
    except ValueError as e:
        raise ValueError(f"cannot save: {e} (load would not rebuild the model; pass constructor arguments JSON "
                         "keeps, e.g. string keys, or convert an instance and load it with its skeleton)") from None
    model.config.class_names = named.class_names
    folder = pathlib.Path(folder)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "bcosify_format_version": str(FORMAT_VERSION)}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    saved = {"format_version": FORMAT_VERSION, "bcosify_version": __version__, "config": model.config.to_dict(),
             "weights_sha256": _sha256(folder / WEIGHTS_FILE), "report": model.report.to_dict()}
    atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(saved, indent=2) + "\n"))
    atomic_write(folder / CARD_FILE, lambda tmp: tmp.write_text(model_card(model)))
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a saved model folder, in the current layout (format 1's is upgraded;
    ``format_version`` stays the folder's, which :func:`load` needs to read its weights).

    Keys: ``format_version``, ``bcosify_version``, ``config`` (a :class:`BcosConfig` as a dict),
    ``weights_sha256``, ``report``.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no saved model folder at {str(folder)!r}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} is not a saved bcosify model: missing {', '.join(missing)}")
    where = repr(str(folder / CONFIG_FILE))
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} does not hold a JSON object")
    version = saved.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where} has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(folder)!r} was written by a newer bcosify (format version {version}, written by bcosify "
            f"{saved.get('bcosify_version', '?')}); this bcosify {__version__} reads up to version "
            f"{FORMAT_VERSION}: upgrade bcosify")
    absent = [key for key in _REQUIRED_KEYS[version] if key not in saved]
    if absent:
        raise CheckpointError(f"{where} lacks {', '.join(absent)}")
    if version == 1:
        saved = _upgrade_v1(saved)
    if not isinstance(saved["config"], dict):
        raise CheckpointError(f"{where}: 'config' must be a JSON object")
    return saved


def _upgrade_v1(saved: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (bcosify 0.1: options, source and derived values side by side) in the format 2 layout."""
    source = saved.get("source") or {}
    config = {**(saved.get("options") or {}), "in_chans": saved["in_chans"], "num_classes": saved["num_classes"],
              "logit_bias": saved["logit_bias"], "class_names": saved.get("class_names"),
              "spec": source.get("spec"), "model_kwargs": source.get("model_kwargs") or {},
              "model_class": source.get("class"), "normalization_from": source.get("normalisation_from")}
    return {"format_version": 2, "bcosify_version": saved.get("bcosify_version"), "config": config,
            "weights_sha256": saved.get("weights_sha256"), "report": saved.get("report")}


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> BcosModel:
    """Rebuild a model saved by :func:`save`, in eval mode.

    The architecture comes from the recorded spec (``timm:NAME``, ``hf-hub:ORG/NAME``, ``torchvision:NAME``); for a
    custom architecture pass its unconverted skeleton as ``model``.
    """
    from ..conversion import convert

    folder = pathlib.Path(folder)
    saved = read_config(folder)
    expected = saved.get("weights_sha256")
    if expected is not None and _sha256(folder / WEIGHTS_FILE) != expected:
        raise CheckpointError(f"{str(folder / WEIGHTS_FILE)!r} does not match {CONFIG_FILE} (its SHA-256 differs): "
                              "the save was interrupted or the file was changed or corrupted")
    try:
        config = BcosConfig.from_dict(saved["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} holds an invalid config: {e}") from None
    if model is None:
        if not config.spec:
            raise CheckpointError(f"{str(folder)!r} was converted from the custom class {config.model_class}; "
                                  "pass its unconverted skeleton as load(folder, model=...)")
        model = build_model(config.spec, weights=None, model_kwargs=config.model_kwargs)
    bmodel = convert(model, config)
    state = read_state_dict(folder / WEIGHTS_FILE)
    if saved["format_version"] < 4:
        state = upgrade_gate_branch_names(state, bmodel.state_dict())
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        bmodel.to(dtypes.pop())  # a model saved in float64 (or bfloat16) loads in that precision
    load_weights(bmodel, state)
    return bmodel.eval()
