"""Configs are objects: build one, pass it, override it, save it; conversion resolves every derived value once."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import bcosify
from bcosify import BcosConfig, FinetuneConfig
from bcosify.surgery import RULES, Rule


class _Block(nn.Module):
    """A container no rule knows: its forward is read from its graph unless a rule is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=5).eval()


def test_config_object_equals_keywords_and_keywords_override_it():
    model, x = _resnet(), torch.rand(2, 3, 32, 32)
    config = BcosConfig(b=1, keep_bias=True)
    by_config = bcosify.convert(model, config=config).eval()
    by_keywords = bcosify.convert(model, b=1, keep_bias=True).eval()
    assert by_config.config == by_keywords.config
    with torch.no_grad():
        assert torch.equal(by_config(x), by_keywords(x))
    overridden = bcosify.convert(model, config, b=1.5)
    assert overridden.b == 1.5 and overridden.config.keep_bias
    assert config == BcosConfig(b=1, keep_bias=True), "convert must not change the caller's config"
    with pytest.raises(TypeError, match="unknown conversion options \\['bee'\\]"):
        bcosify.convert(model, config, bee=2)


def test_conversion_resolves_every_derived_value():
    bmodel = bcosify.convert(_resnet())
    c = bmodel.config
    assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)
    assert c.normalization_from == "timm pretrained_cfg"
    assert (c.in_chans, c.num_classes) == (3, 5) and c.logit_bias == pytest.approx(-math.log(4))
    assert c.spec == "timm:resnet18" and c.model_kwargs == {"in_chans": 3, "num_classes": 5}
    assert c.model_class == "timm.models.resnet.ResNet"
    # a resolved config rebuilds the same model from the bare architecture
    again = bcosify.convert(timm.create_model("resnet18", pretrained=False, num_classes=5), c)
    assert again.config == c


def test_resolved_config_must_fit_the_model():
    config = bcosify.convert(_resnet()).config
    grey = timm.create_model("resnet18", pretrained=False, num_classes=5, in_chans=1)
    with pytest.raises(bcosify.ConversionError, match="3 input channels but the model takes 1"):
        bcosify.convert(grey, config)


def test_config_round_trips_through_json_and_rejects_bad_values():
    config = BcosConfig(b=2.5, mean=(0.5,), std=(0.25,), class_names=("a", "b"), num_classes=2)
    assert BcosConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["class_names"] == ["a", "b"]
    with pytest.raises(ValueError, match="unknown conversion options \\['colour'\\]"):
        BcosConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        BcosConfig(num_classes=2, class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="in_chans must be a positive integer"):
        BcosConfig(in_chans=0)
    finetune = FinetuneConfig(epochs=3, lr=1e-3)
    assert FinetuneConfig.from_dict(finetune.to_dict()) == finetune
    assert finetune.replace(lr=2e-3).lr == 2e-3 and finetune.lr == 1e-3
    with pytest.raises(TypeError, match="unknown finetune options \\['learning_rate'\\]"):
        finetune.replace(learning_rate=1)


def test_finetune_takes_a_config_object():
    bmodel = bcosify.convert(_Block(), mean=0.5, std=0.5, rules={_Block: Rule("descend")})
    data = [(torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(2)]
    history = bcosify.finetune(bmodel, data, FinetuneConfig(epochs=2, lr=1e-3, progress=False), seed=1)
    assert len(history.epochs) == 2
    with pytest.raises(TypeError, match="unknown finetune options"):
        bcosify.finetune(bmodel, data, FinetuneConfig(), learning_rate=1)


def test_rules_per_call_extend_the_table_for_that_call_only():
    assert _Block not in RULES
    assert bcosify.convert(_Block(), mean=0.5, std=0.5).report.by_action("read")
    with pytest.raises(bcosify.ConversionError, match="_Block \\(not today\\)"):
        bcosify.convert(_Block(), mean=0.5, std=0.5, rules={_Block: Rule("refuse", note="not today")})
    bmodel = bcosify.convert(_Block(), mean=0.5, std=0.5, rules={_Block: Rule("descend")})
    assert type(bmodel.network.conv).__name__ == "BcosConv2d" and not bmodel.report.by_action("read")
    assert bmodel.report.by_action("verified"), "a user rule is verified"
    assert _Block not in RULES, "a per-call rule must not leak into the global table"
    with pytest.raises(ValueError, match="unknown rule action"):
        Rule("transmogrify")


def test_list_supported_filters_like_timm_list_models():
    everything = bcosify.list_supported()
    assert len(everything) >= 30 and len({f.id for f in everything}) == len(everything)
    timm_only = bcosify.list_supported("timm:*")
    assert timm_only and all(f.library == "timm" for f in timm_only)
    assert {f.spec for f in bcosify.list_supported("vit*")} >= {"timm:vit_tiny_patch16_224",
                                                               "torchvision:vit_b_16"}
    assert bcosify.list_supported("no-such-family") == []


def test_a_supported_model_builds_again_after_its_builder_consumed_nested_arguments():
    """timm's MobileNet builders pop keys from the block definitions they are given: a row with ``block_args``
    must build the same model every time."""
    blocks = [[{"block_type": "er", "out_chs": 8, "stride": 2, "exp_kernel_size": 3, "exp_ratio": 2.0,
                "pw_kernel_size": 1, "force_in_chs": 0, "noskip": False, "se_ratio": 0.0, "act_layer": None}],
              [{"block_type": "uir", "out_chs": 16, "stride": 2, "dw_kernel_size_start": 3, "dw_kernel_size_mid": 3,
                "dw_kernel_size_end": 0, "exp_ratio": 2.0, "noskip": False, "se_ratio": 0.0, "act_layer": None}]]
    row = bcosify.SupportedModel("MobileNetV5", "timm:mobilenetv5_base",
                                 kwargs={"block_args": blocks, "stem_size": 8, "num_features": 16})
    first, second = row.build(num_classes=10), row.build(num_classes=10)
    assert [n for n, _ in first.named_modules()] == [n for n, _ in second.named_modules()]
    assert row.kwargs["block_args"][1][0]["block_type"] == "uir"


def test_dau_options_resolve_and_round_trip():
    config = BcosConfig(unit="dau")
    assert (config.rank, config.squash, config.temperature) == (32, "squash", 1.0)
    config = BcosConfig(unit="dau", rank=4.0, squash="l2", temperature=1000)
    assert config.rank == 4 and isinstance(config.rank, int) and config.temperature == 1000.0
    assert BcosConfig.from_dict(config.to_dict()) == config
    assert BcosConfig().rank is None and BcosConfig().squash is None


@pytest.mark.parametrize("options, message", [
    ({"unit": "coda"}, r"unit must be one of \('bcos', 'dau'\), got 'coda'"),
    ({"unit": "dau", "rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"unit": "dau", "rank": 2.5}, "rank must be an integer >= 1, got 2.5"),
    ({"unit": "dau", "rank": True}, "rank must be an integer >= 1, got True"),
    ({"unit": "dau", "squash": "tanh"}, r"squash must be one of \('squash', 'l2'\), got 'tanh'"),
    ({"temperature": 0}, "temperature must be a finite number > 0, got 0.0"),
    ({"unit": "dau", "temperature": -1}, "temperature must be a finite number > 0, got -1.0"),
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"unit": "dau", "b": 1}, "b=1: a B-cos option that unit='dau' does not have"),
    ({"unit": "dau", "normalize_weights": True}, "normalize_weights=True: a B-cos option that unit='dau'"),
    ({"unit": "dau", "b": 3, "normalize_weights": True}, "b=3 and normalize_weights=True: B-cos options that"),
    ({"rank": 8}, "rank applies to unit='dau' only"),
    ({"squash": "l2"}, "squash applies to unit='dau' only"),
    ({"rank": 8, "squash": "l2"}, "rank and squash apply to unit='dau' only"),
])
def test_bad_unit_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        BcosConfig(**options)
    with pytest.raises(ValueError, match=message):  # and through convert, before any work
        bcosify.convert(_resnet(), **options)


def test_dau_model_and_temperature():
    """A DAU conversion: its layers, its temperature (explained: contributions add up to logit / T), no exponent."""
    from bcosify.nn import BcosConv2d, DauConv2d, DauLinear

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    plain = bcosify.convert(model, unit="dau", rank=2, keep_bias=True).eval()
    hot = bcosify.convert(model, unit="dau", rank=2, keep_bias=True, temperature=8).eval()
    assert plain.unit == "dau" and hot.config.temperature == 8.0
    assert not any(isinstance(m, BcosConv2d) for m in hot.modules())
    assert isinstance(hot.network.conv1, DauConv2d) and isinstance(hot.network.fc, DauLinear)
    with torch.no_grad():
        torch.testing.assert_close(hot(x), plain(x) / 8, rtol=1e-12, atol=0)
    hot = bcosify.convert(model, unit="dau", rank=2, temperature=8)  # no biases
    with torch.no_grad():
        for m in hot.modules():
            if isinstance(m, (DauConv2d, DauLinear)):
                m.weight_b.normal_(std=1e-2)
    e = bcosify.explain(hot, x)
    with torch.no_grad():
        raw = hot.network(hot.encode(x)).gather(1, e.target[:, None])[:, 0]
    torch.testing.assert_close(e.explained_logit, raw / 8, rtol=1e-12, atol=0)
    torch.testing.assert_close(e.logits.gather(1, e.target[:, None])[:, 0], raw / 8 + hot.logit_bias, rtol=1e-12,
                               atol=0)
    assert e.completeness_error.max().item() < 1e-10
    hot.set_b(2.0)  # (the fine-tuning loop sets the default every step)
    with pytest.raises(ValueError, match="b is the exponent of B-cos layers; this model's layers are unit='dau'"):
        hot.set_b(1.5)


def test_conversion_of_a_dau_model_is_reproducible_and_verified():
    model = _resnet()
    a = bcosify.convert(model, unit="dau", rank=2, verify=True)
    b = bcosify.convert(model, unit="dau", rank=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    note = a.report.entries[-1].note
    assert "DAU at init" in note and "FAILED" not in note
    layers = [m for m in a.modules() if hasattr(m, "weight_a")]
    assert not torch.equal(layers[1].weight_a, layers[2].weight_a), "each layer needs its own projection"


def test_check_json_names_what_json_cannot_hold_exactly():
    BcosConfig(model_kwargs={"depths": (1, 2), "window": {"3": 1}}).check_json()  # tuples become lists: kept
    with pytest.raises(ValueError, match=r"model_kwargs\['window'\] has the key 3"):
        BcosConfig(model_kwargs={"window": {3: 1}}).check_json()
    with pytest.raises(ValueError, match=r"model_kwargs\['act_layer'\] is a type"):
        BcosConfig(model_kwargs={"act_layer": torch.nn.GELU}).check_json()
