"""Resume state of a fine-tuning run: checkpoint folders (safetensors + JSON, no pickle), written atomically."""

from __future__ import annotations

import json
import os
import random
import pathlib
import shutil
from typing import Any

import numpy as np
import torch

from ..errors import BcosifyError
from ..model import BcosModel
from ..weights import load_weights, upgrade_gate_branch_names

CHECKPOINT_FORMAT = 2  # 2: generator states of every process


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
    rngs = meta.pop("rng")
    for rank, state in enumerate(rngs):
        for key in ("torch", "epoch_start", "cuda"):
            if key in state:
                tensors[f"rng.{rank}.{key}"] = state[key]
    save_file(tensors, str(tmp / "state.safetensors"))
    payload = {"format": CHECKPOINT_FORMAT, **meta, "host_rng": [s["host"] for s in rngs], "optimizer": opt_plain,
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


def read_checkpoint(path: pathlib.Path) -> tuple[pathlib.Path, dict, dict[str, torch.Tensor]]:
    """``(path, metadata, tensors)`` of a checkpoint folder, checked for its format."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:
        raise BcosifyError(f"checkpoint {str(path)!r} is unreadable: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BcosifyError(f"checkpoint {str(path)!r} has format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    return path, meta, tensors


def load_checkpoint(path: pathlib.Path, model: BcosModel, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder; return its metadata."""
    return restore_checkpoint(read_checkpoint(path), model, optimizer, scheduler)


def restore_checkpoint(checkpoint: tuple[pathlib.Path, dict, dict[str, torch.Tensor]], model: BcosModel, optimizer,
                       scheduler, rank: int = 0) -> dict:
    """Restore model, optimizer, scheduler and process ``rank``'s generators from :func:`read_checkpoint`'s result;
    return the metadata (with this process's generator states)."""
    path, meta, tensors = checkpoint
    meta = dict(meta)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    weights = upgrade_gate_branch_names(weights, model.state_dict())  # (a checkpoint of an older bcosify)
    _check_same_model(path, model, weights)
    load_weights(model, weights)
    opt_plain = meta["optimizer"]
    state: dict[int, dict] = {int(i): dict(plain) for i, plain in opt_plain["state"].items()}
    for key in meta["optimizer_tensor_keys"]:
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensors[key]
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt_plain["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if f"rng.{rank}.torch" in tensors:
        meta["rng_after"], meta["epoch_start_rng"] = tensors[f"rng.{rank}.torch"], tensors[f"rng.{rank}.epoch_start"]
        meta["host_rng"] = meta["host_rng"][rank]
        if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"])
    else:  # more processes than the checkpoint's: a stream of its own (the run cannot repeat one it never had)
        fresh = torch.Generator().manual_seed(1_000_003 * rank + meta["global_step"]).get_state()
        meta["rng_after"] = meta["epoch_start_rng"] = fresh
        meta["host_rng"] = None
        random.seed(1_000_003 * rank + meta["global_step"])
        np.random.seed((1_000_003 * rank + meta["global_step"]) % 2 ** 32)
    torch.set_rng_state(meta["rng_after"])
    return meta


def _check_same_model(path: pathlib.Path, model: BcosModel, weights: dict[str, torch.Tensor]) -> None:
    """Refuse, in one line, a checkpoint whose weights are not those of ``model``."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    reshaped = sorted(k for k in set(own) & set(weights) if tuple(weights[k].shape) != own[k])
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise BcosifyError(f"checkpoint {str(path)!r} is from another model: {len(missing)} of this model's tensors "
                           f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape (e.g. "
                           f"{example!r}); resume with the model it was written for, or start in a new --out")


def rng_state(epoch_start: torch.Tensor) -> dict:
    """This process's generator states for a checkpoint: torch's (now, and ``epoch_start`` at the start of the
    epoch), its CUDA device's, Python's and numpy's."""
    state = {"torch": torch.get_rng_state(), "epoch_start": epoch_start, "host": _host_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _host_rng_state() -> dict:
    """Python's and numpy's generator states as JSON (augmentations and timm's Mixup draw from them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def restore_host_rng(meta: dict) -> None:
    """Set Python's and numpy's generators to this process's states in :func:`restore_checkpoint`'s metadata."""
    state = meta.get("host_rng")
    if state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
