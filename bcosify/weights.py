"""Weights in: the original model from a spec (``timm:NAME``, ``hf-hub:ORG/NAME``, ``torchvision:NAME``) with hub or
local weights, safe reading of foreign weight files, and strict loading of them into models."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import pickle
import pickletools
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = [
    "HUB",
    "HubUnavailableError",
    "build_model",
    "load_weights",
    "read_state_dict",
]

HUB = "hub"
SPEC_SOURCES = ("timm", "hf-hub", "torchvision")

_SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
_PICKLE_SUFFIXES = frozenset({".pth", ".pt", ".bin", ".ckpt"})
_PLAIN_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_EMA_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "ema")
_LAST_WRAPPER_KEYS = ("module",)
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 4
_MAX_LISTED = 10
_KEY_MAPS = (None, "positional")
_PROBE_TIMEOUT_S = 3.0
_NETWORK_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError)


class HubUnavailableError(CheckpointError):
    """Pretrained weights (or an ``hf-hub:`` config) are neither in the local cache nor downloadable."""


# --------------------------------------------------------------------------- models from specs


def build_model(spec: str, weights: str | os.PathLike | None = HUB, model_kwargs: dict[str, Any] | None = None,
                key_map: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` (``"timm:NAME"``, ``"hf-hub:ORG/NAME"`` or ``"torchvision:NAME"``).

    ``weights="hub"`` uses the pretrained weights (from the local cache, else downloaded), ``None`` leaves them
    random, and a path loads a local checkpoint (safetensors, or ``.pth`` read with ``weights_only=True``).
    ``hf-hub:`` specs always need the repository's ``config.json`` (cached or downloaded).

    Raises:
        HubUnavailableError: the hub files are not cached and the hub cannot be reached (checked within seconds).
    """
    source, sep, name = spec.partition(":")
    if not sep or source not in SPEC_SOURCES or not name:
        raise ValueError(f"unknown model spec {spec!r}: expected 'timm:NAME', 'hf-hub:ORG/NAME' or "
                         "'torchvision:NAME'")
    kwargs = dict(model_kwargs or {})
    hub = isinstance(weights, str) and weights == HUB
    origin = None  # where the hub files come from: a URL, or the Hugging Face Hub endpoint
    if source in ("timm", "hf-hub"):
        import timm

        if source == "timm" and not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
        create = functools.partial(timm.create_model, spec if source == "hf-hub" else name, pretrained=hub, **kwargs)
        if source == "hf-hub":
            origin = _hf_endpoint()
        elif hub:
            origin = _timm_origin(name, kwargs.get("pretrained_cfg_overlay"))
    else:
        import torchvision.models as tvm

        if name not in tvm.list_models():
            raise ValueError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
        create = functools.partial(tvm.get_model, name, weights="DEFAULT" if hub else None, **kwargs)
        origin = tvm.get_model_weights(name).DEFAULT.url if hub else None
    model = _create_from_hub(spec, create, origin, kwargs.get("cache_dir")) if origin else create()
    if weights is not None and not hub:
        load_weights(model, read_state_dict(weights), key_map=key_map)
    return model


def _hf_endpoint() -> str:
    """The Hugging Face Hub endpoint in use (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _timm_origin(name: str, overlay: Mapping[str, Any] | None) -> str | None:
    """Where timm downloads the pretrained weights of ``name`` from; ``None`` when it downloads nothing."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = {**(cfg.to_dict() if cfg is not None else {}), **(overlay or {})}
    if cfg.get("file") or cfg.get("state_dict"):
        return None
    return _hf_endpoint() if cfg.get("hf_hub_id") else cfg.get("url") or None


@contextlib.contextmanager
def _hf_offline():
    """huggingface_hub's offline mode, for the duration of the block."""
    from huggingface_hub import constants

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def _create_from_hub(spec: str, create: Callable[[], nn.Module], origin: str, cache_dir: str | None) -> nn.Module:
    """``create()``, which fetches files from ``origin``: from the local cache when they are there, otherwise
    only after a quick check that the host answers."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    host = urllib.parse.urlsplit(origin).netloc
    if origin == _hf_endpoint():
        try:
            with _hf_offline():
                return create()
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            pass  # not (all) in the cache
        if constants.HF_HUB_OFFLINE:
            raise HubUnavailableError(_unavailable(spec, "HF_HUB_OFFLINE is set and the files are not in the local "
                                                         "Hugging Face cache"))
    else:
        cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
        if os.path.isfile(os.path.join(cache_dir, os.path.basename(urllib.parse.urlsplit(origin).path))):
            return create()
    if not _reachable(origin):
        raise HubUnavailableError(_unavailable(spec, f"{host} is not reachable and the files are not in the local "
                                                     "cache"))
    try:
        return create()
    except (*_NETWORK_ERRORS, LocalEntryNotFoundError) as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise HubUnavailableError(_unavailable(spec, f"the download from {host} failed "
                                                     f"({type(error).__name__}: {detail})")) from error


def _unavailable(spec: str, reason: str) -> str:
    """The one-line message of a :class:`HubUnavailableError`."""
    if spec.startswith("hf-hub:"):
        return (f"cannot load {spec!r} from the Hugging Face Hub: {reason}; run it once with network access (it is "
                "then cached), or build the architecture as 'timm:ARCH' with weights=PATH (a local "
                ".safetensors/.pth file) or weights=None for random weights (CLI: --weights FILE or --weights none)")
    return (f"cannot download the pretrained weights of {spec!r}: {reason}; pass weights=PATH (a local "
            ".safetensors/.pth file) or weights=None for random weights (CLI: --weights FILE or --weights none)")


def _reachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether the host of ``url`` (or the proxy configured for it) accepts a connection within ``timeout``."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (parts.hostname, parts.port or (80 if parts.scheme == "http" else 443))
    reached: list[bool] = []

    def connect() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection(address, timeout=timeout).close()
            reached.append(True)

    probe = threading.Thread(target=connect, daemon=True)  # a thread: name resolution ignores socket timeouts
    probe.start()
    probe.join(timeout)
    return bool(reached)


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


def upgrade_gate_branch_names(state_dict: Mapping[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """``state_dict`` with the names of squeeze-excite branches as bcosify writes them since format 4.

    Up to format 3 (bcosify 0.x before graph-read squeeze-excite) the gate branch of a squeeze-excite module was
    wrapped, one ``module.`` deeper (``blocks.1.0.se.module.conv_reduce.weight``); since, it keeps the library's
    own names (``blocks.1.0.se.conv_reduce.weight``). A key is renamed only when the model lacks it and expects
    the name without one ``.module.`` that the checkpoint lacks; every other key is left for the exact check.
    """
    expected = set(expected)
    upgraded = dict(state_dict)
    for key in list(state_dict):
        if key in expected:
            continue
        parts = key.split(".")
        for i, part in enumerate(parts[1:-1], start=1):
            candidate = ".".join(parts[:i] + parts[i + 1:])
            if part == "module" and candidate in expected and candidate not in upgraded:
                upgraded[candidate] = upgraded.pop(key)
                break
    return upgraded


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
