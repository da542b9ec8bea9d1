"""save -> load round trips and every way a saved folder can be broken."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import bcosify
from bcosify import CheckpointError
from bcosify.export import folder as saving
from bcosify.surgery import Rule, register_rule


def images(n=2, size=32):
    torch.manual_seed(3)
    return torch.rand(n, 3, size, size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    bmodel = bcosify.convert("timm:resnet18", weights=None, model_kwargs={"num_classes": 5}, b=1.75).eval()
    folder = tmp_path_factory.mktemp("saved") / "resnet18-bcos"
    bcosify.save(bmodel, folder, class_names=list("abcde"))
    return bmodel, folder


@pytest.mark.parametrize("spec, kwargs, options", [
    ("timm:resnet18", {"num_classes": 5}, {"b": 1.75}),
    ("torchvision:mobilenet_v3_small", {}, {"num_classes": 4, "gap_reorder": False, "maxpool_to_avgpool": True}),
    ("timm:efficientnet_b0", {"num_classes": 3}, {"gap_reorder": True, "normalize_weights": True}),
    ("timm:resnet18", {"num_classes": 5}, {"unit": "dau", "rank": 3, "squash": "l2", "temperature": 10.0}),
    ("timm:tf_efficientnet_b0", {"num_classes": 3}, {"unit": "dau", "rank": 2, "gap_reorder": True}),
])
def test_round_trip_gives_identical_logits(tmp_path, spec, kwargs, options):
    torch.manual_seed(0)
    bmodel = bcosify.convert(spec, weights=None, model_kwargs=kwargs, **options).eval()
    with torch.no_grad():  # change the weights (and DAU gains) away from their init so the test sees real loading
        for p in bmodel.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in bmodel.named_buffers():
            if name.endswith(".gain"):
                b.mul_(1 + torch.rand_like(b))
    bcosify.save(bmodel, tmp_path / "m")
    loaded = bcosify.load(tmp_path / "m")
    assert isinstance(loaded, bcosify.BcosModel) and not loaded.training
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel(x))
    assert loaded.config == bmodel.config
    assert loaded.config.spec == spec


def test_saved_folder_layout_and_config(saved):
    bmodel, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 4 and config["bcosify_version"] == bcosify.__version__
    saved_config = config["config"]
    assert saved_config["spec"] == "timm:resnet18" and saved_config["model_kwargs"] == {"num_classes": 5}
    assert saved_config["b"] == 1.75 and saved_config["mean"] == list(bmodel.config.mean)
    assert saved_config["class_names"] == list("abcde") and saved_config["logit_bias"] == bmodel.logit_bias
    assert bcosify.BcosConfig.from_dict(saved_config) == bmodel.config
    card = (folder / "README.md").read_text()
    assert "timm:resnet18" in card and "BcosConv2d" in card and "first layer" in card
    loaded = bcosify.load(folder)
    assert loaded.class_names == tuple("abcde") and loaded.b == 1.75


def test_custom_architecture_needs_skeleton(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.flat(self.pool(self.conv(x))))

    register_rule(Net, Rule("descend"))
    bmodel = bcosify.convert(Net(), mean=0.5, std=0.5).eval()
    bcosify.save(bmodel, tmp_path / "net")
    with pytest.raises(CheckpointError, match="custom class .*Net.*model="):
        bcosify.load(tmp_path / "net")
    loaded = bcosify.load(tmp_path / "net", model=Net())
    with torch.no_grad():
        assert torch.equal(loaded(images()), bmodel(images()))


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_and_files(saved, tmp_path):
    _, folder = saved
    with pytest.raises(CheckpointError, match="no saved model folder"):
        bcosify.load(tmp_path / "nothing")
    broken = _copy(folder, tmp_path)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        bcosify.load(broken)


def test_truncated_weights_are_refused(saved, tmp_path):
    _, folder = saved
    broken = _copy(folder, tmp_path)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        bcosify.load(broken)
    _edit_config(broken, weights_sha256=None)  # without the checksum the reader itself notices
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        bcosify.load(broken)


def test_corrupted_config_and_newer_format(saved, tmp_path):
    _, folder = saved
    broken = _copy(folder, tmp_path)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        bcosify.load(broken)
    (broken / "config.json").write_text((folder / "config.json").read_text())
    _edit_config(broken, format_version=99)
    with pytest.raises(CheckpointError, match="newer bcosify .*format version 99.*upgrade"):
        bcosify.load(broken)
    _edit_config(broken, format_version=2, config=None)
    with pytest.raises(CheckpointError, match="lacks config"):
        bcosify.load(broken)
    _edit_config(broken, format_version=1, options=None)
    with pytest.raises(CheckpointError, match="lacks source, options"):
        bcosify.load(broken)
    _edit_config(broken, format_version=3, config={"b": 2, "no_such_option": 1})
    with pytest.raises(CheckpointError, match="invalid config.*no_such_option"):
        bcosify.load(broken)


def test_format_2_folders_still_load(saved, tmp_path):
    """A folder written before the DAU and padding options (format 2, without those keys) loads with their
    defaults."""
    bmodel, folder = saved
    old = _copy(folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for key in ("unit", "rank", "squash", "temperature", "padding_mode", "padding_layers", "padding_value"):
        config["config"].pop(key, None)
    (old / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    loaded = bcosify.load(old)
    assert loaded.config == bmodel.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel(x))


def test_format_1_folders_still_load(saved, tmp_path):
    """A folder written by bcosify 0.1 (options, source and derived values side by side) loads unchanged."""
    bmodel, folder = saved
    old = _copy(folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    new = config.pop("config")
    options = {k: new[k] for k in ("b", "keep_bias", "normalize_weights", "mean", "std", "logit_bias",
                                   "maxpool_to_avgpool", "gap_reorder", "token_pool", "strict")}
    options["num_classes"] = None
    v1 = {**config, "format_version": 1, "options": options, "in_chans": new["in_chans"],
          "num_classes": new["num_classes"], "logit_bias": new["logit_bias"], "class_names": new["class_names"],
          "source": {"spec": new["spec"], "model_kwargs": new["model_kwargs"],
                     "normalisation_from": new["normalization_from"]}}
    (old / "config.json").write_text(json.dumps(v1))
    loaded = bcosify.load(old)
    assert loaded.config == bmodel.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel(x))


def _efficientnet_se_gate(se, x):  # what bcosify's rule for timm's SqueezeExcite computed up to format 3
    return se.gate(se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True)))))


def _se_module_gate(se, x):  # ... and for timm's SEModule
    return se.gate(se.fc2(se.act(se.bn(se.fc1(x.mean((2, 3), keepdim=True))))))


@pytest.mark.parametrize("spec, kwargs, se_type, gate_fn, first_se", [
    ("timm:test_efficientnet", {"num_classes": 3, "channel_multiplier": 0.5},
     timm.models._efficientnet_blocks.SqueezeExcite, _efficientnet_se_gate, "blocks.3.0.se"),
    ("timm:seresnet18", {"num_classes": 3}, timm.layers.SEModule, _se_module_gate, "layer1.0.se"),
])
def test_format_3_squeeze_excite_weights_load_under_their_new_names(tmp_path, spec, kwargs, se_type, gate_fn,
                                                                    first_se):
    """Up to format 3 a squeeze-excite module was replaced by a DetachedGate around it (its weights one
    ``module.`` deeper); now its forward is read and it keeps its names. A folder of that time loads."""
    from bcosify.nn import DetachedGate

    torch.manual_seed(0)
    old_rule = Rule("gate", lambda se, ctx: DetachedGate(se, gate_fn))
    old = bcosify.convert(spec, weights=None, model_kwargs=kwargs, rules={se_type: old_rule}).eval()
    new_names = bcosify.convert(spec, weights=None, model_kwargs=kwargs).state_dict()
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    bcosify.save(old, tmp_path / "old")
    written = load_file(str(tmp_path / "old" / "model.safetensors"))
    assert f"network.{first_se}.module.{'conv_reduce' if 'efficientnet' in spec else 'fc1'}.weight" in written
    renamed = [k for k in written if k not in new_names]
    assert renamed and all(".se.module." in k for k in renamed)
    with pytest.raises(CheckpointError, match="missing key"):  # as format 4 the names would not fit
        _edit_config(tmp_path / "old", format_version=4)
        bcosify.load(tmp_path / "old")
    _edit_config(tmp_path / "old", format_version=3)
    loaded = bcosify.load(tmp_path / "old")
    assert not any(isinstance(m, DetachedGate) for m in loaded.modules())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)
    e_old, e_new = bcosify.explain(old, x), bcosify.explain(loaded, x)  # the gates detached as before
    torch.testing.assert_close(e_new.weights, e_old.weights, rtol=1e-5, atol=1e-7)


def test_unknown_source_spec(saved, tmp_path):
    _, folder = saved
    broken = _copy(folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())["config"]
    _edit_config(broken, config={**config, "spec": "timm:no_such_model"})
    with pytest.raises(ValueError, match="unknown timm model"):
        bcosify.load(broken)


def test_missing_unexpected_and_misshapen_keys_are_listed(saved, tmp_path):
    _, folder = saved
    broken = _copy(folder, tmp_path)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("network.fc.weight")
    state["network.extra"] = torch.zeros(1)
    state["network.conv1.weight"] = torch.zeros(1, 2, 3)
    save_file(state, str(broken / "model.safetensors"))
    _edit_config(broken, weights_sha256=None)
    with pytest.raises(CheckpointError) as info:
        bcosify.load(broken)
    message = str(info.value)
    assert "network.fc.weight" in message and "network.extra" in message and "network.conv1.weight" in message


def test_interrupted_save_is_never_loaded(saved, tmp_path, monkeypatch):
    bmodel, folder = saved
    target = _copy(folder, tmp_path)
    other = bcosify.convert("timm:resnet18", weights=None, model_kwargs={"num_classes": 5}, b=1.75)
    calls = []
    real = saving.atomic_write

    def crash_after_weights(path, write):
        calls.append(path.name)
        if path.name == "config.json":
            raise KeyboardInterrupt("power cut")
        real(path, write)

    monkeypatch.setattr(saving, "atomic_write", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        bcosify.save(other, target)
    monkeypatch.undo()
    assert calls == ["model.safetensors", "config.json"]
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        bcosify.load(target)


def test_save_rejects_wrong_inputs(saved, tmp_path):
    bmodel, _ = saved
    with pytest.raises(TypeError, match="BcosModel"):
        bcosify.save(timm.create_model("resnet18", pretrained=False), tmp_path / "x")
    with pytest.raises(ValueError, match="3 class names for 5 classes"):
        bcosify.save(bmodel, tmp_path / "y", class_names=["a", "b", "c"])


def test_malicious_pickle_through_convert_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": Evil()}}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        bcosify.convert("timm:resnet18", weights=path)
    assert not marker.exists()


def test_timm_instance_round_trips_without_skeleton(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1).eval()
    bmodel = bcosify.convert(model, mean=0.5, std=0.2).eval()
    assert bmodel.config.spec == "timm:resnet18" and bmodel.config.model_kwargs == {"in_chans": 1, "num_classes": 4}
    bcosify.save(bmodel, tmp_path / "m")
    loaded = bcosify.load(tmp_path / "m")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel(x))


def test_timm_instance_with_other_constructor_arguments_asks_for_its_skeleton(tmp_path):
    """A timm ViT built for 64 px records no spec (the spec would rebuild a 224 px one with other shapes)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64, depth=2).eval()
    bmodel = bcosify.convert(model).eval()
    assert bmodel.config.spec is None
    bcosify.save(bmodel, tmp_path / "m")
    with pytest.raises(CheckpointError, match="skeleton"):
        bcosify.load(tmp_path / "m")
    loaded = bcosify.load(tmp_path / "m", model=timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                                  num_classes=3, img_size=64, depth=2))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel(x))


def test_float64_model_loads_in_float64(saved, tmp_path):
    bmodel, _ = saved
    bcosify.save(bmodel.double(), tmp_path / "m64")
    bmodel.float()
    loaded = bcosify.load(tmp_path / "m64")
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    x = images().double()
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel.double()(x))
    bmodel.float()
