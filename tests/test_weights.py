"""Tests of bcosify.checkpoints: safe reading and strict loading of weight files."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bcosify.data import normalize
from bcosify.demo import efficientnet_lite0_checkpoint_path
from bcosify.errors import CheckpointError
from bcosify.weights import load_weights, read_state_dict, upgrade_gate_branch_names


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    return model


def fresh() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- round trips


def test_safetensors_round_trip(tmp_path):
    source = tiny()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = fresh()
    load_weights(target, read_state_dict(path))
    assert_same_weights(source, target)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_pth_round_trip(tmp_path, suffix):
    source = tiny()
    path = tmp_path / f"w{suffix}"
    torch.save(source.state_dict(), path)
    target = fresh()
    load_weights(target, read_state_dict(str(path)))
    assert_same_weights(source, target)


def test_legacy_torch_format_round_trip(tmp_path):
    source = tiny()
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    target = fresh()
    load_weights(target, read_state_dict(path))
    assert_same_weights(source, target)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_nested_checkpoint_is_unwrapped(tmp_path, wrapper):
    source = tiny()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "arch": "tiny", wrapper: source.state_dict(), "lr": 0.1}, path)
    target = fresh()
    load_weights(target, read_state_dict(path))
    assert_same_weights(source, target)


def test_ema_is_used_only_when_preferred(tmp_path):
    plain, ema = tiny(), fresh()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    got = read_state_dict(path)
    assert torch.equal(got["0.weight"], plain[0].weight)
    got_ema = read_state_dict(path, prefer_ema=True)
    assert torch.equal(got_ema["0.weight"], ema[0].weight)


def test_ema_only_checkpoint_is_found(tmp_path):
    source = tiny()
    path = tmp_path / "ckpt.pth"
    torch.save({"model_ema": source.state_dict(), "step": 3}, path)
    assert torch.equal(read_state_dict(path)["1.running_var"], source[1].running_var)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    source = tiny()
    path = tmp_path / "w.pth"
    torch.save({"model": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    state = read_state_dict(path)
    assert list(state) == list(source.state_dict())
    target = fresh()
    load_weights(target, state)
    assert_same_weights(source, target)


def test_prefix_shared_by_only_some_keys_is_kept(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"module.a": torch.zeros(1), "b": torch.ones(1)}, str(path))
    assert sorted(read_state_dict(path)) == ["b", "module.a"]


def test_dtype_is_cast_to_the_model(tmp_path):
    source = tiny().half()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = fresh()
    load_weights(target, read_state_dict(path))
    assert target[0].weight.dtype == torch.float32
    assert torch.equal(target[0].weight, source[0].weight.float())
    assert target[1].num_batches_tracked.dtype == torch.int64


# ----------------------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        read_state_dict(path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny().state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_pth(tmp_path, legacy):
    path = tmp_path / "w.pth"
    torch.save(tiny().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"definitely not a checkpoint"], ids=["empty", "garbage"])
def test_corrupted_pth(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_state_dict(path)


def test_no_tensors(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "state_dict": {}, "names": ["a", "b"]}, path)
    with pytest.raises(CheckpointError, match="no tensors found"):
        read_state_dict(path)


def test_empty_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({}, str(path))
    with pytest.raises(CheckpointError, match="no tensors found"):
        read_state_dict(path)


# ----------------------------------------------------------------------------- malicious pickles


class _SystemPayload:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    """Unpickling this would create ``marker`` via ``open``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_is_live(tmp_path):
    """Sanity check: a plain unpickler really would run the payload."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_OpenPayload(str(marker)))).close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload], ids=["os.system", "open"])
@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, payload, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": tiny().state_dict(), "extra": payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    elif writer == "torch.save-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with path.open("wb") as f:
            pickle.dump(obj, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "not plain tensors" in message
    assert "never unpickles untrusted code" in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- strict loading


def test_missing_unexpected_and_mismatched_keys_are_listed():
    state = dict(tiny().state_dict())
    del state["1.running_var"]
    state["2.weight"] = torch.zeros(3)
    state["0.bias"] = torch.zeros(5)
    target = fresh()
    before = target[0].bias.clone()
    with pytest.raises(CheckpointError) as info:
        load_weights(target, state)
    message = str(info.value)
    assert "1 missing key(s): 1.running_var" in message
    assert "1 unexpected key(s): 2.weight" in message
    assert "0.bias (checkpoint (5,) vs model (4,))" in message
    assert torch.equal(target[0].bias, before)  # nothing loaded


def test_long_key_lists_are_capped():
    state = dict(tiny().state_dict())
    state.update({f"extra.{i}": torch.zeros(1) for i in range(25)})
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), state)
    message = str(info.value)
    assert "25 unexpected key(s)" in message
    assert "extra.9" in message and "extra.10" not in message
    assert "and 15 more" in message


def test_positional_key_map_loads_other_names():
    source = tiny()
    renamed = OrderedDict(
        (f"layer{i}.{k.split('.')[-1]}", v)
        for i, (k, v) in enumerate(source.state_dict().items())
        if not k.endswith("num_batches_tracked")
    )
    target = fresh()
    with pytest.raises(CheckpointError, match="missing key"):
        load_weights(target, renamed)
    load_weights(target, renamed, key_map="positional")
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(target.state_dict()[key], value), key


def test_positional_key_map_refuses_first_shape_mismatch():
    state = OrderedDict(
        [
            ("conv.w", torch.zeros(4, 3, 3, 3)),
            ("conv.b", torch.zeros(4)),
            ("bn.gamma", torch.zeros(5)),
            ("bn.beta", torch.zeros(6)),
            ("bn.mean", torch.zeros(4)),
            ("bn.var", torch.ones(4)),
        ]
    )
    target = fresh()
    before = target[0].weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_weights(target, state, key_map="positional")
    message = str(info.value)
    assert "'bn.gamma'" in message and "(5,)" in message
    assert "'1.weight'" in message and "(4,)" in message
    assert "bn.beta" not in message
    assert torch.equal(target[0].weight, before)


def test_positional_key_map_refuses_count_mismatch():
    state = dict(tiny().state_dict())
    del state["1.running_var"]
    with pytest.raises(CheckpointError, match="5 tensors but the model has 6"):
        load_weights(fresh(), state, key_map="positional")


def test_unknown_key_map():
    with pytest.raises(ValueError, match="key_map"):
        load_weights(fresh(), tiny().state_dict(), key_map="by_name")


# ----------------------------------------------------------------------------- a real checkpoint

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_real_efficientnet_lite0_checkpoint_classifies_photos():
    """The packaged ImageNet EfficientNet-Lite0 weights load positionally into timm and work."""
    import timm

    from bcosify.data import sample_photos as imagenet_photos

    path = efficientnet_lite0_checkpoint_path()  # fails (no skip) when the package is missing
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    assert (tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])) == IMAGENET_MEAN_STD

    state = read_state_dict(path)
    assert next(iter(state)) == "_conv_stem.weight"  # other names: exact loading must refuse
    with pytest.raises(CheckpointError, match="missing key"):
        load_weights(model, state)
    load_weights(model, state, key_map="positional")

    names, images = imagenet_photos(224)
    with torch.no_grad():
        top5 = model(normalize(images, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])).topk(5, dim=1).indices
    predictions = dict(zip(names, top5.tolist()))
    assert predictions["chelsea"][0] in range(281, 286), predictions  # a cat
    assert {967, 968} & set(predictions["coffee"]), predictions  # espresso or cup


def test_gate_branch_names_of_older_files_are_renamed_only_where_the_model_expects_them():
    t = torch.zeros(1)
    old = {"se.module.fc1.weight": t, "head.module.weight": t, "extra.module.bias": t, "a.module.b.module.c": t}
    expected = ["se.fc1.weight", "head.module.weight", "head.weight", "a.b.module.c"]
    upgraded = upgrade_gate_branch_names(old, expected)
    # renamed: se (expected without .module.); head kept (expected as is); extra left for the exact check to name
    assert sorted(upgraded) == ["a.b.module.c", "extra.module.bias", "head.module.weight", "se.fc1.weight"]
    assert upgrade_gate_branch_names({"x.module.w": t, "x.w": t}, ["x.w"]) == {"x.module.w": t, "x.w": t}
