"""``bcosify.save`` / ``bcosify.load``: a converted model as ``model.safetensors`` + ``config.json`` + model card."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Sequence

import torch
from torch import nn

from . import __version__
from .checkpoints import load_weights, read_state_dict
from .config import BcosConfig
from .errors import CheckpointError
from .model import FORMAT_VERSION, BcosModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
_REQUIRED_KEYS = ("format_version", "source", "options", "in_chans", "num_classes", "logit_bias")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: pathlib.Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place."""
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


def model_card(model: BcosModel) -> str:
    """A model card (markdown) with the source, options and conversion report."""
    spec = model.source.get("spec") or model.source.get("class", "a custom model")
    options = "\n".join(f"| `{k}` | `{v}` |" for k, v in model.options.to_dict().items())
    load = ("bmodel = bcosify.load(\"PATH\")" if model.source.get("spec")
            else "bmodel = bcosify.load(\"PATH\", model=MyUnconvertedModel())")
    return f"""---
library_name: bcosify
tags: [b-cos, interpretability, image-classification]
---

# B-cos version of `{spec}`

Converted with bcosify {__version__}: dynamic linear, `logit(x) = W(x) . x` exactly, with `W(x)` as the
explanation. Inputs are images in [0, 1] with {model.in_chans} channels (the normalisation is folded into
the first layer); {model.num_classes} classes; fixed logit bias {model.logit_bias:.6g}.

```python
import bcosify
{load}
explanation = bcosify.explain(bmodel, images)
```

| option | value |
|---|---|
{options}

## Conversion report

```
{model.report.table()}
```
"""


def save(model: BcosModel, folder: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> pathlib.Path:
    """Write ``model`` to ``folder`` as ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

    Each file is written atomically; ``config.json`` (written last) records the weights' SHA-256, so an
    interrupted save is never loaded with mismatched files.
    """
    from safetensors.torch import save_file

    if not isinstance(model, BcosModel):
        raise TypeError(f"save needs a BcosModel (from bcosify.convert), got {type(model).__name__}")
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names for {model.num_classes} classes")
        model.class_names = [str(c) for c in class_names]
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "bcosify_format_version": str(FORMAT_VERSION)}
    _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    config = {**model.config, "weights_sha256": _sha256(folder / WEIGHTS_FILE), "report": model.report.to_dict()}
    _atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    _atomic_write(folder / CARD_FILE, lambda tmp: tmp.write_text(model_card(model)))
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a saved model folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no saved model folder at {str(folder)!r}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} is not a saved bcosify model: missing {', '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} does not hold a JSON object")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} has no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(folder)!r} was written by a newer bcosify (format version {version}, written by bcosify "
            f"{config.get('bcosify_version', '?')}); this bcosify {__version__} reads up to version "
            f"{FORMAT_VERSION}: upgrade bcosify")
    absent = [key for key in _REQUIRED_KEYS if key not in config]
    if absent:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} lacks {', '.join(absent)}")
    return config


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> BcosModel:
    """Rebuild a model saved by :func:`save`, in eval mode.

    The architecture comes from the recorded spec (``timm:NAME`` / ``torchvision:NAME``); for a custom
    architecture pass its unconverted skeleton as ``model``.
    """
    from .convert import build_model, convert

    folder = pathlib.Path(folder)
    config = read_config(folder)
    expected = config.get("weights_sha256")
    if expected is not None and _sha256(folder / WEIGHTS_FILE) != expected:
        raise CheckpointError(f"{str(folder / WEIGHTS_FILE)!r} does not match {CONFIG_FILE} (its SHA-256 differs): "
                              "the save was interrupted or the file was changed or corrupted")
    try:
        options = BcosConfig.from_dict(config["options"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} holds invalid options: {e}") from None
    source = config["source"]
    if model is None:
        spec = source.get("spec")
        if not spec:
            raise CheckpointError(f"{str(folder)!r} was converted from the custom class {source.get('class')}; "
                                  "pass its unconverted skeleton as load(folder, model=...)")
        model = build_model(spec, weights=None, model_kwargs=source.get("model_kwargs") or {})
    bmodel = convert(model, **{k: v for k, v in options.to_dict().items()})
    bmodel.source = {**source, **{k: v for k, v in bmodel.source.items() if k not in source}}
    bmodel.bias.value = float(config["logit_bias"])
    bmodel.class_names = config.get("class_names")
    load_weights(bmodel, read_state_dict(folder / WEIGHTS_FILE))
    return bmodel.eval()
