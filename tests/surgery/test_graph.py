"""Containers without a rule: their forward is read from its torch.fx graph, converted when exact, refused with the
operation and source line when not, and every such conversion is verified in float64."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bcosify
from bcosify import ConversionError
from bcosify.surgery import Rule
from bcosify.surgery.graph import read_forward


class Glue(nn.Module):
    """The issue's example: concatenation, a functional GELU and a residual add, no rule anywhere."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y = self.stem(x)
        z = torch.cat([y, F.gelu(self.branch(y)) + y], dim=1)
        return self.fc(z.mean((2, 3)))


class Squared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((y * y).mean((2, 3)))  # not dynamic linear: no gate between the factors


class SqueezeExcite(nn.Module):
    """A gate computed by children (kept as they are), a layer scale and a positional constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.reduce = nn.Conv2d(4, 2, 1)
        self.expand = nn.Conv2d(2, 4, 1)
        self.gamma = nn.Parameter(torch.full((4, 1, 1), 0.7))
        self.pos = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc(((x * gate) * self.gamma + self.pos).mean((2, 3)))


class ExpandedGate(nn.Module):
    """ECA's gate: a 1-d convolution across channels, broadcast with ``expand_as`` (which reads only the shape of
    the value path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv1d(1, 1, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        y = torch.sigmoid(self.mix(x.mean((2, 3)).view(x.shape[0], 1, -1))).view(x.shape[0], -1, 1, 1)
        return self.fc((x * y.expand_as(x)).mean((2, 3)))


class Normalized(nn.Module):
    """``F.normalize`` on the value path: ``x * (1 / ||x||)``, the norm a gate (SwiftFormer's queries)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.normalize(self.conv(x), dim=1).mean((2, 3)))


class TokenAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention: q and k are a gate, v the value path."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + F.scaled_dot_product_attention(self.q(t), self.k(t), self.v(t))
        return self.head(t.mean(1))


class QueryBiasedAttention(TokenAttention):
    """Attention whose mask (added to the attention logits) is computed from the queries, like SAM ViT's decomposed
    relative position bias: the mask is part of the gate, detached with q and k."""

    def __init__(self, dim: int = 8):
        super().__init__(dim)
        self.rel = nn.Parameter(torch.randn(dim, 1))

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q = self.q(t)
        mask = (q @ self.rel).transpose(-2, -1)  # a bias per key token, read from its query
        t = t + F.scaled_dot_product_attention(q, self.k(t), self.v(t), attn_mask=mask)
        return self.head(t.mean(1))


class GatedUnit(nn.Module):
    """A gated linear unit (GeGLU / StarNet's ``act(x1) * x2``): the activated factor is the product's gate."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.f1, self.f2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        g = F.gelu(self.f1(y)) if self.functional else self.act(self.f1(y))
        return self.fc((g * self.f2(y)).mean((2, 3)))


class BlurredPadded(nn.Module):
    """A zero-padded image into two convolutions (a re-parameterisable stem), a fixed blur filter applied with
    ``F.conv2d`` (a buffer: a linear map), and an image resized for a second branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(3, 4, 1, stride=2)
        self.c = nn.Conv2d(3, 4, 3, stride=4)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("blur", torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])).div(16)
                             .expand(4, 1, 3, 3).clone())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        p = F.pad(self.drop(x), (1, 1, 1, 1))
        y = self.a(p) + self.b(p[..., 1:-1, 1:-1])
        y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), self.blur, groups=4)
        z = self.c(F.interpolate(x, scale_factor=2.0, mode="bilinear"))
        return self.fc(torch.cat([y.mean((2, 3)), z.mean((2, 3))], 1))


class _Partition(nn.Module):
    """Windows of a size the caller passes as a plain number (torchvision MaxViT's ``WindowPartition``)."""

    def forward(self, x, p: int):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, H // p, W // p)


class WindowsByArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.part, self.fc = nn.Conv2d(3, 4, 3, padding=1), _Partition(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.part(self.stem(x), 2).mean((2, 3)))


class SpaceToDepthStem(nn.Module):
    """TResNet's stem: the image rearranged into 4x4 blocks (timm's SpaceToDepth), then a convolution."""

    def __init__(self):
        super().__init__()
        import timm.layers

        self.s2d, self.conv, self.fc = timm.layers.SpaceToDepth(4), nn.Conv2d(48, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(self.s2d(x))).mean((2, 3)))


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _verified(bmodel) -> str:
    (entry,) = bmodel.report.by_action("verified")
    return entry.note


@pytest.mark.parametrize("make", [Glue, SqueezeExcite, ExpandedGate, Normalized, TokenAttention, QueryBiasedAttention, lambda: GatedUnit(False), lambda: GatedUnit(True),
                                  BlurredPadded, WindowsByArgument, SpaceToDepthStem],
                         ids=["glue", "squeeze-excite", "gate-expanded-as-the-value-path", "normalized", "attention", "attention-mask-from-q", "glu-module", "glu-functional",
                              "padded-blurred-resized", "plain-number-argument", "space-to-depth-stem"])
def test_linear_glue_converts_without_a_rule_and_is_exact(make):
    torch.manual_seed(0)
    original = make().double().eval()
    exact = bcosify.convert(original, b=1, keep_bias=True, mean=0.5, std=0.25).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(exact(x), original((x - 0.5) / 0.25), rtol=1e-10, atol=1e-12)
    assert "equivalence" in _verified(exact) and exact.report.by_action("read")
    bmodel = bcosify.calibrate(bcosify.convert(original, mean=0.5, std=0.25), _images(4), progress=False).eval()
    e = bcosify.explain(bmodel, x)
    assert bool((e.explained_logit.abs() > 1e-3).all())
    assert e.completeness_error.max().item() < 1e-10


def test_product_of_value_path_tensors_is_refused_naming_the_line():
    with pytest.raises(ConversionError) as info:
        bcosify.convert(Squared(), mean=0.5, std=0.25)
    message = str(info.value)
    assert "Squared" in message and "a product of two value-path tensors" in message
    line = next(i for i, text in enumerate(inspect.getsource(Squared).splitlines()) if "y * y" in text)
    assert f"test_graph.py:{inspect.getsourcelines(Squared)[1] + line}" in message  # the line `y * y` stands on


class UnprojectedAttention(TokenAttention):
    """The same tokens as queries, keys and values: no use of them can be detached alone."""

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(F.scaled_dot_product_attention(t, t, t).mean(1))


def test_attention_over_the_same_tensor_as_gate_and_values_is_refused():
    with pytest.raises(ConversionError, match="attention whose values are also its queries, keys or mask"):
        bcosify.convert(UnprojectedAttention(), mean=0.5, std=0.25)


def test_reading_classifies_gates_constants_and_scales():
    reading = read_forward(SqueezeExcite())
    assert reading.ok and reading.constants == {"pos"} and "gamma" in reading.scales
    assert reading.gate_children == {"reduce", "expand"} and reading.value_children == {"conv", "fc"}
    assert len(reading.gate_nodes) == 1
    bmodel = bcosify.convert(SqueezeExcite(), mean=0.5, std=0.25)
    network = bmodel.network
    assert type(network.reduce) is nn.Conv2d and network.reduce.bias is not None, "gate path kept as it is"
    assert type(network.conv).__name__ == "BcosConv2d" and bmodel.constants == ["pos"]
    kept = {"gamma", "pos", "conv.weight", "reduce.weight", "reduce.bias", "expand.weight", "expand.bias", "fc.weight"}
    assert set(dict(network.named_parameters())) == kept, "state-dict names are kept (value-path biases go)"


@pytest.mark.parametrize("body, message", [
    ("return self.fc(self.conv(x).mean((2, 3)) + 1)", "adds the number 1"),
    ("return self.fc(torch.erf(self.conv(x)).mean((2, 3)))", "torch.erf at .*no exact form"),
    ("return self.fc(F.conv2d(self.conv(x), self.mix.weight).mean((2, 3)))", "reads the tensor mix.weight"),
    ("return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))", "does not depend linearly"),
    ("return self.fc(self.conv(x).mean((2, 3)) if x.sum() > 0 else self.conv(x).amax((2, 3)))", "cannot be traced"),
])
def test_what_blocks_a_forward_is_named(body, message):
    namespace = {"nn": nn, "torch": torch, "F": F}
    exec("class Net(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n"
         "        self.mix = nn.Conv2d(4, 4, 1)\n"
         "        self.fc = nn.Linear(4, 3)\n"
         "    def forward(self, x):\n"
         f"        {body}\n", namespace)
    with pytest.raises(ConversionError, match=message):
        bcosify.convert(namespace["Net"](), mean=0.5, std=0.25)


def test_torchvision_alexnet_converts_top_level_included():
    bmodel = bcosify.convert(torchvision.models.alexnet(num_classes=4))
    assert [e.path for e in bmodel.report.by_action("read")] == ["<model>"]
    assert "completeness" in _verified(bmodel)


def test_verification_catches_wrong_rules():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x) * 2 + 0.5

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.shift = Shift()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.shift(self.stem(x)).mean((2, 3)))

    # a rule that hides an added constant: exact at b=1 with biases, but not dynamic linear
    with pytest.raises(ConversionError, match="contributions miss the logit"):
        bcosify.convert(Net(), mean=0.5, std=0.25, rules={Shift: Rule("descend")})
    assert bcosify.convert(Net(), mean=0.5, std=0.25, rules={Shift: Rule("descend")}, verify=False)
    # a rule whose replacement computes another function: named by the first module whose output differs
    wrong = Rule("replace", lambda module, ctx: nn.Identity())
    with pytest.raises(ConversionError, match="first module whose output diverges is shift \\(Shift\\)"):
        bcosify.convert(Net(), mean=0.5, std=0.25, rules={Shift: wrong})
    # without any rule, the forward is read and the added 0.5 refused
    with pytest.raises(ConversionError, match="adds the number 0.5"):
        bcosify.convert(Net(), mean=0.5, std=0.25)


class _DeepPlainNet(nn.Module):
    """Twenty plain 3x3 convolutions: at b=2 its random-init activations shrink by ``|cos|`` per layer until the
    patch norm's epsilon dominates, and from there every layer squares their scale: the logits underflow to 0."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                   *[m for _ in range(19) for m in (nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.convs(x).mean((2, 3)))


def test_verification_calibrates_when_b2_logits_underflow():
    torch.manual_seed(0)
    original = _DeepPlainNet().double().eval()
    x = _images(2, 32)
    plain = bcosify.convert(original, mean=0.5, std=0.25, verify=False)
    with torch.no_grad():
        assert bool(((plain(x) - plain.logit_bias) == 0).all()), "the model should underflow: the test would be weak"
    note = _verified(bcosify.convert(original, mean=0.5, std=0.25, verify=True))
    assert "b=2 logits 0e+00: calibrated first (bcosify.calibrate on the verification input)" in note, note
    assert "not informative" not in note and "FAILED" not in note, note
    completeness = float(re.search(r"completeness ([0-9.e+-]+)", note).group(1))
    assert completeness < 1e-6
    after = float(re.search(r"logits ([0-9.e+-]+) after", note).group(1))
    assert after > 1e-3
    # unit-norm weight rows take no calibration gains: the note says so, and that completeness tells nothing there
    note = _verified(bcosify.convert(original, mean=0.5, std=0.25, verify=True, normalize_weights=True))
    assert "not calibrated (unit-norm weights take no gains)" in note and "not informative" in note, note


def test_read_models_save_and_load(tmp_path):
    torch.manual_seed(0)
    bmodel = bcosify.convert(SqueezeExcite(), mean=0.5, std=0.25).eval()
    bcosify.save(bmodel, tmp_path / "m")
    loaded = bcosify.load(tmp_path / "m", model=SqueezeExcite())
    x = _images().float()
    with torch.no_grad():
        assert torch.equal(loaded(x), bmodel(x))


def test_import_survives_a_renamed_library_class():
    """A timm release that renames a class the rules name: bcosify still imports, warns, and reads timm models
    from their graphs (verified) instead of by rule."""
    import subprocess
    import sys

    code = ("import warnings, timm, timm.models.beit as beit\n"
            "del beit.Attention\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import bcosify\n"
            "from bcosify.surgery.rules import LIBRARIES\n"
            "assert 'timm' not in LIBRARIES and any('timm rules' in str(w.message) for w in caught), LIBRARIES\n"
            "b = bcosify.convert(timm.create_model('resnet10t', num_classes=3))\n"
            "assert b.report.by_action('read') and b.report.by_action('verified')\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_verification_checks_the_surgery_not_the_options_that_change_the_function():
    bmodel = bcosify.convert(Glue(), mean=0.5, std=0.25, normalize_weights=True, b=2.5)
    assert "equivalence" in _verified(bmodel) and "FAILED" not in _verified(bmodel)


class _TokenIntoChild(nn.Module):
    """A learned token handed to a child next to the value path (as CaiT's class token): a constant."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.join = _Join()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.join(t, self.token.expand(t.shape[0], -1, -1))[:, 0])


class _Join(nn.Module):
    def forward(self, t, token):
        return torch.cat([token, t], dim=1).cumsum(1)  # a linear mix of the token and the patches


def test_a_parameter_handed_to_a_child_is_a_constant():
    bmodel = bcosify.calibrate(bcosify.convert(_TokenIntoChild(), mean=0.5, std=0.25, rules={
        _Join: Rule("keep")}).double(), _images(4), progress=False)
    assert bmodel.constants == ["token"]
    e = bcosify.explain(bmodel, _images())
    assert bool((e.constant_contribution.abs() > 0).all()) and e.completeness_error.max().item() < 1e-10


def test_replaced_modules_stay_alive_during_the_walk():
    """The walk keys what it did by id(module); a replaced module freed mid-walk would lend its id to a module
    created later (seen in a registry sweep: a gate inserted by a rewrite took a LayerNorm's place)."""
    import weakref

    class First(nn.Module):
        def forward(self, x):
            return x

    class Second(First):
        pass

    seen = {}

    def replace_first(module, ctx):
        seen["first"] = weakref.ref(module)
        return nn.Identity()

    def replace_second(module, ctx):
        seen["alive"] = seen["first"]() is not None
        return nn.Identity()

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(First()), nn.Sequential(Second()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    bcosify.convert(model, mean=0.5, std=0.25, verify=False,
                    rules={First: Rule("replace", replace_first), Second: Rule("replace", replace_second)})
    assert seen["alive"]


class _Affine(nn.Module):
    """timm HGNet's LearnableAffineBlock: a (1,)-shaped parameter added to the value path is a bias."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.bias = nn.Parameter(torch.tensor([0.1]))

    def forward(self, x):
        return self.scale * x + self.bias


class _OptionalInput(nn.Module):
    """An argument with a default that the parent passes: traced as given, not fixed at the default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.heads = 2  # a plain attribute other code may read

    def forward(self, x, extra=None):
        y = F.gelu(self.conv(x))  # a functional activation: the forward is rewritten
        return y if extra is None else y + extra


def test_a_bias_added_without_batch_dimension_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Affine(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match="1.bias: .*shape \\(1,\\): a bias no pixel accounts for"):
        bcosify.convert(model, mean=0.5, std=0.25)


def test_arguments_the_parent_gives_are_traced_as_given():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.block = _OptionalInput()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.stem(x)
            return self.fc(self.block(y, y).mean((2, 3)))  # the default None is not what runs

    torch.manual_seed(0)
    original = Parent().double().eval()
    exact = bcosify.convert(original, b=1, keep_bias=True, mean=0.5, std=0.25)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(exact(x), original((x - 0.5) / 0.25), rtol=1e-10, atol=1e-12)
    assert exact.network.block.heads == 2 and hasattr(exact.network.block, "bcos_act_0")


def test_a_rewrite_keeps_an_optional_argument_that_was_none_and_refuses_another_value():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x, mask=None):
            y = F.gelu(self.conv(x))
            return y if mask is None else y * mask

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.block = Gated()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(self.stem(x), mask=None).mean((2, 3)))

    block = bcosify.convert(Parent(), mean=0.5, std=0.25).network.block  # (verified)
    x = torch.rand(1, 4, 3, 3)
    torch.testing.assert_close(block(x, mask=None), block(x))
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        block(x, mask=torch.ones(1))  # read with mask None: another value is refused, not computed wrongly


def test_a_converted_model_that_cannot_run_is_refused_not_crashed():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape trouble")

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match="cannot be run or explained .*RuntimeError: shape trouble"):
        bcosify.convert(model, mean=0.5, std=0.25, rules={nn.Identity: Rule("replace", lambda m, ctx: Boom())})


class _AppendsToTheList(nn.Module):
    """Fills the list it is given in place (a side effect no graph shows), as timm's VoVNet does."""

    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, outs: list):
        outs.append(self.mid(x))
        return torch.cat(outs, 1)


class AppendsToAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fill, self.fc = nn.Conv2d(3, 4, 3, padding=1), _AppendsToTheList(), nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(self.fill(y, [y]).mean((2, 3)))


def test_the_image_goes_into_every_first_layer():
    bmodel = bcosify.convert(BlurredPadded().double(), mean=0.5, std=0.25)
    firsts = {e.path for e in bmodel.report.entries if e.note.startswith("first layer")}
    assert firsts == {"a", "b", "c"}
    assert all(bmodel.network.get_submodule(p).in_channels == 6 for p in firsts)


def test_a_side_effect_is_refused_not_misread():
    with pytest.raises(ConversionError, match="Tensor.append at test_graph.py:.*side effect"):
        bcosify.convert(AppendsToAList(), mean=0.5, std=0.25)


def test_a_functional_layer_with_a_bias_is_refused():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("w", torch.randn(4, 4))
            self.register_buffer("b", torch.randn(4))

        def forward(self, x):
            return F.linear(self.conv(x).mean((2, 3)), self.w, self.b)

    with pytest.raises(ConversionError, match="F.linear at test_graph.py:.*adds a bias"):
        bcosify.convert(Biased(), mean=0.5, std=0.25)


def test_a_recurrent_layer_is_refused_with_its_reason():
    class Rows(nn.Module):  # Sequencer's pattern: an LSTM over the rows of a feature map
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv(x).mean(2).transpose(1, 2)
            return self.fc(self.rnn(x)[0].mean(1))

    with pytest.raises(ConversionError, match=r"rnn: torch.nn.modules.rnn.LSTM \(a recurrent layer: .*sigmoid gates"):
        bcosify.convert(Rows(), mean=0.5, std=0.25)


def test_input_channels_and_size_come_from_the_pretrained_config():
    """CSATv2's first Conv2d in module order takes 64 channels and LeViT built for 32 px runs at no default size:
    the channels and the size are read from the model, not guessed."""
    import timm

    from bcosify.surgery.trace import trace

    model = timm.create_model("levit_128s", img_size=32, num_classes=4).eval()
    info = trace(model)
    assert (info.in_chans, info.size) == (3, 32)
    with pytest.raises(ConversionError, match="went into no layer; the forward first transforms it by mul at csatv2"):
        trace(timm.create_model("csatv2", num_classes=4))


class _PadsToWindows(nn.Module):
    """Control flow on the input's shape (pad to a multiple of the window), as MobileViT's and TinyViT's blocks."""

    def __init__(self, gate: bool):
        super().__init__()
        self.gate = gate
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % 4 or W % 4:
            x = F.pad(x, (0, -W % 4, 0, -H % 4))
        y = self.conv(x)
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True)) if self.gate else y


class _Windowed(nn.Module):
    def __init__(self, gate: bool):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 3, stride=2), _PadsToWindows(gate), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_a_forward_with_shape_dependent_control_flow_is_read_at_its_shapes():
    torch.manual_seed(0)
    original = _Windowed(gate=False).double().eval()
    bmodel = bcosify.convert(original, mean=0.5, std=0.25)
    (entry,) = [e for e in bmodel.report.entries if e.path == "block"]
    assert entry.action == "read" and "at the input shapes it ran with" in entry.note
    exact = bcosify.convert(original, b=1, keep_bias=True, mean=0.5, std=0.25).eval()
    for size in (15, 16):  # padded and not: the original forward is kept, at every size
        x = _images(size=size)
        with torch.no_grad():
            torch.testing.assert_close(exact(x), original((x - 0.5) / 0.25), rtol=1e-10, atol=1e-12)
    with pytest.raises(ConversionError, match="block: .*_PadsToWindows .*control flow depends on the input shape"):
        bcosify.convert(_Windowed(gate=True), mean=0.5, std=0.25)


class _Tables(nn.Module):
    """A rotary-embedding-like child: the parent calls a method of it (not its forward), so the trace reads its
    buffer functionally (``tables.freqs``) and captures the tensor ``torch.linspace`` makes (``_tensor_constant0``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.rand(4) + 0.5)

    def table(self, n):
        positions = torch.arange(n, dtype=self.freqs.dtype, device=self.freqs.device)  # n: a size the trace follows
        return torch.sin(self.freqs * positions) * torch.linspace(1, 2, 4, dtype=self.freqs.dtype)


class _GatedByTable(nn.Module):
    """Uses its ``table`` argument on its gate path only (as EVA's attention uses the rotary embedding on q, k)."""

    def __init__(self):
        super().__init__()
        self.gate, self.value = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, table):
        return self.value(x) * torch.sigmoid(self.gate(x) * table)


class _TableNet(nn.Module):
    def __init__(self, body: str = "gate"):
        super().__init__()
        self.body = body
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tables = _Tables()
        self.mix = _GatedByTable()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        table = self.tables.table(y.shape[-1])
        if self.body == "gate":
            y = self.mix(y, table)
        elif self.body == "added":
            y = y + table
        else:
            y = y * table
        return self.fc(y)


def test_buffers_and_captured_tensors_feeding_a_gate_only_argument_are_read():
    reading = read_forward(_GatedByTable())
    assert reading.ok and reading.gate_args == {"table"}
    assert not read_forward(_TableNet()).ok, "without knowing the child's gate-only argument, the table is refused"
    assert read_forward(_TableNet(), gate_args_of=lambda m: {"table"} if isinstance(m, _GatedByTable) else set()).ok
    bmodel = bcosify.convert(_TableNet(), mean=0.5, std=0.25)
    assert bmodel.report.leftovers == []
    assert "equivalence" in _verified(bmodel) and "completeness" in _verified(bmodel)
    torch.manual_seed(0)
    e = bcosify.explain(bmodel, torch.rand(2, 3, 8, 8))
    assert e.completeness_error.max().item() < 1e-5


@pytest.mark.parametrize("body", ["added", "scaled"])
def test_buffers_and_captured_tensors_on_the_value_path_are_still_refused(body):
    with pytest.raises(ConversionError) as info:
        bcosify.convert(_TableNet(body), mean=0.5, std=0.25)
    message = str(info.value)
    assert "<model>: " in message and "_TableNet" in message
    assert re.search(r"tables\.freqs at test_graph\.py:\d+: reads the tensor tables\.freqs of a child directly", message)
    assert re.search(r"_tensor_constant0 at test_graph\.py:\d+: reads the tensor _tensor_constant0, captured while "
                     r"tracing \(computed from no parameter\), on the value path", message)


class _GridCode(nn.Module):
    """A code of the grid computed from the shape ``(B, H, W)`` alone (as EdgeNeXt's Fourier positional encoding):
    sines and cosines through a 1x1 convolution with its bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(4, dim, 1)

    def forward(self, shape):
        B, H, W = shape
        ys = torch.linspace(0, 3, H, dtype=self.proj.weight.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
        xs = torch.linspace(0, 3, W, dtype=self.proj.weight.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
        return self.proj(torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], 1))


class _AddsGridCode(nn.Module):
    def __init__(self, multiply: bool = False):
        super().__init__()
        self.stem, self.code, self.fc, self.multiply = nn.Conv2d(3, 4, 3, stride=2), _GridCode(4), nn.Linear(4, 3), \
            multiply

    def forward(self, x):
        y = self.stem(x)
        B, C, H, W = y.shape
        code = self.code((B, H, W))  # called with shape values only: no tensor goes in
        y = y * code if self.multiply else y + code
        return self.fc(y.mean((2, 3)))


def test_a_child_called_with_shapes_only_is_a_constant_only_under_a_constant_rule():
    torch.manual_seed(0)
    model = _AddsGridCode().double().eval()
    for rules in ({}, {_GridCode: Rule("keep")}):  # no rule, or one that does not say its output is a constant
        with pytest.raises(ConversionError, match=r"<model>: .*_AddsGridCode \(add at test_graph.py:\d+: adds a "
                                                  "tensor computed from no parameter to the value path"):
            bcosify.convert(model, mean=0.5, std=0.25, rules=rules)
    bmodel = bcosify.convert(model, mean=0.5, std=0.25, rules={_GridCode: Rule("constant")})
    assert bmodel.constants == ["code"] and bmodel.report.leftovers == []
    assert any(e.action == "read" and "constant added from: code" in e.note for e in bmodel.report.entries)
    assert [e.action for e in bmodel.report.entries if e.path == "code"] == ["constant"]
    assert bmodel.network.code.proj.bias is not None  # part of the constant, kept
    errors = {k: float(v) for k, v in re.findall(r"(equivalence|completeness) ([0-9.e+-]+)", _verified(bmodel))}
    assert errors["equivalence"] < 1e-10 and errors["completeness"] < 1e-10, _verified(bmodel)
    e = bcosify.explain(bmodel, _images(3))
    assert e.completeness_error.max().item() < 1e-10
    assert bool((e.constant_contribution.abs() > 1e-3 * e.explained_logit.abs()).all())
    # the constant's output multiplying the value path is no added constant: refused, even under the rule
    with pytest.raises(ConversionError, match="mul at test_graph.py:\\d+: multiplies the value path by the output "
                                              "of code"):
        bcosify.convert(_AddsGridCode(multiply=True).double().eval(), mean=0.5, std=0.25,
                        rules={_GridCode: Rule("constant")})


def test_a_child_an_attention_rule_does_not_know_is_refused_by_name():
    from timm.models.mlp_mixer import SpatialGatingUnit

    sgu = SpatialGatingUnit(dim=8, seq_len=4)
    sgu.extra = nn.Linear(4, 4)  # (a newer release's child the rule has not read)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 8, stride=8)
            self.pool = nn.AdaptiveAvgPool2d(2)  # 4 tokens at any size
            self.gate = sgu
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.gate(self.pool(self.embed(x)).flatten(2).transpose(1, 2)).mean(1))

    with pytest.raises(ConversionError, match=r"gate\.extra \(Linear\): a child of SpatialGatingUnit this rule does "
                                              "not know"):
        bcosify.convert(Net(), mean=0.5, std=0.25)
