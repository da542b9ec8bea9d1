"""Vision transformers: constants explained per sample, attention as a gate, token pooling, refusals.

(Equivalence and completeness of every ViT family run with the other families in test_families.py.)
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from torch import nn

import bcosify
from bcosify.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from bcosify.errors import ConversionError
from bcosify.explanation import per_sample_constants
from bcosify.explanation.checks import equivalence_error
from bcosify.explanation.viz import row_titles
from bcosify.nn import GateLinear, GatePath, SelfAttention, SplitQKV
from bcosify.surgery import Rule, register_rule
from bcosify.surgery.rules import RULES
from bcosify.surgery.support import randomised
from helpers import assert_batch_matches_single, randomise_zero_weights

SIZE = 32
TINY = dict(img_size=SIZE, patch_size=8, depth=2, num_classes=10)


def _timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **kwargs}).double().eval()


def _tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    return randomise_zero_weights(model).double().eval()


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _bcos(model: nn.Module, **options) -> bcosify.BcosModel:
    bmodel = bcosify.convert(model, **options)
    return bcosify.calibrate(bmodel, _images(4, seed=7), progress=False)


def test_constants_are_reported_and_explained_per_sample():
    bmodel = _bcos(_timm_vit(reg_tokens=2))
    assert bmodel.constants == ["cls_token", "reg_token", "pos_embed"]
    x = _images(3)
    e = bcosify.explain(bmodel, x)
    assert e.completeness_error.max() < 1e-6
    # the constants carry a real, sample-dependent share of the logit
    assert bool((e.constant_contribution.abs() > 1e-3 * e.explained_logit.abs()).all())
    assert len(set(round(v, 12) for v in e.constant_contribution.tolist())) == 3
    assert " · constants " in row_titles(e)[0]  # the picture says how much comes from no pixel
    # one image at a time gives the same per-sample numbers as the batch
    assert_batch_matches_single(bmodel, x, e.target, ("constant_contribution", "contributions"), rtol=1e-9)


def test_constants_contribution_is_the_gradient_dot_product():
    bmodel = _bcos(_timm_vit())
    x = _images(1)
    e = bcosify.explain(bmodel, x)
    with bmodel.explanation_mode():
        params = [bmodel.network.cls_token, bmodel.network.pos_embed]
        logit = bmodel.network(bmodel.encode(x))[0, e.target[0]]
        grads = torch.autograd.grad(logit, params)
    expected = sum((p * g).sum() for p, g in zip(params, grads))
    torch.testing.assert_close(e.constant_contribution[0], expected.detach(), rtol=1e-10, atol=0)


def test_dynamic_image_size_explains_images_of_another_size():
    """timm resamples ``pos_embed`` to the image (``dynamic_img_size``) assuming batch size 1: explain falls back to
    one image at a time, with the same numbers, and completeness holds."""
    bmodel = _bcos(_timm_vit(dynamic_img_size=True))
    x = torch.rand(3, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    e = bcosify.explain(bmodel, x, target=torch.tensor([0, 4, 9]))
    assert e.contributions.shape == (3, 48, 48) and e.target.tolist() == [0, 4, 9]
    assert e.completeness_error.max() < 1e-6
    assert bool((e.constant_contribution.abs() > 1e-3 * e.explained_logit.abs()).all())
    assert_batch_matches_single(bmodel, x, e.target, ("constant_contribution", "contributions"), rtol=1e-9)


def test_explain_restores_the_constant_parameters():
    bmodel = _bcos(_tv_vit())
    before = list(bmodel.named_parameters())
    state = {k: v.clone() for k, v in bmodel.state_dict().items()}
    bcosify.explain(bmodel, _images(2))
    with pytest.raises(ValueError):
        bcosify.explain(bmodel, _images(2) * 3)  # bad input: raised before any swap
    network = bmodel.network
    with pytest.raises(RuntimeError, match="boom"):
        with per_sample_constants(network, bmodel.constants, 2):
            assert not isinstance(network.class_token, nn.Parameter)
            raise RuntimeError("boom")
    after = list(bmodel.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert list(bmodel.state_dict()) == list(state)
    for k, v in bmodel.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_fused_and_manual_paths(fused):
    model = _timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = fused
    assert equivalence_error(model, _images()) < 1e-10
    e = bcosify.explain(_bcos(model), _images())
    assert e.completeness_error.max() < 1e-6


def test_attention_is_split_into_gate_and_value_paths():
    bmodel = bcosify.convert(_timm_vit(), keep_bias=False)
    attn = bmodel.network.blocks[0].attn
    assert isinstance(attn.qkv, SplitQKV) and isinstance(attn.qkv.qk, GatePath)
    assert attn.qkv.qk.module.bias is not None, "q, k keep their biases (gate path)"
    assert attn.qkv.v.bias is None and attn.proj.bias is None
    assert type(attn.qkv.v).__name__ == "BcosLinear" and type(attn.proj).__name__ == "BcosLinear"
    # in explanation mode the attention matrix gets no gradient: the q, k rows receive none
    x = _images(2)
    with bmodel.explanation_mode():
        bmodel(x).sum().backward()
    assert attn.qkv.qk.module.weight.grad is None
    assert attn.qkv.v.weight.grad is not None and attn.qkv.v.weight.grad.abs().sum() > 0


def test_training_step_reaches_gate_value_and_constants():
    bmodel = bcosify.convert(_timm_vit()).train()
    loss = bmodel(_images(4)).logsumexp(1).mean()
    loss.backward()
    net = bmodel.network
    for name, p in [("qk", net.blocks[0].attn.qkv.qk.module.weight), ("v", net.blocks[0].attn.qkv.v.weight),
                    ("pos_embed", net.pos_embed), ("cls_token", net.cls_token)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_multihead_attention_replacement_checks_its_call():
    bmodel = bcosify.convert(_tv_vit(), b=1, keep_bias=True)
    attn = bmodel.network.encoder.layers[0].self_attention
    assert isinstance(attn, SelfAttention)
    x = torch.rand(2, 5, 32, dtype=torch.float64)
    out, weights = attn(x, x, x, need_weights=False)
    assert out.shape == x.shape and weights is None
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, x.clone(), x)
    with pytest.raises(ValueError, match="attention weights"):
        attn(x, x, x, need_weights=True)


def test_token_pool_mean_timm():
    model = _timm_vit()
    bmodel = bcosify.convert(model, b=1, keep_bias=True, token_pool="mean")
    reference = _timm_vit(global_pool="avg", fc_norm=False)  # same weights, mean over the patch tokens
    reference.load_state_dict(model.state_dict())
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(bmodel(x), reference(_normalise(x, model)), rtol=1e-10, atol=1e-12)
    e = bcosify.explain(_bcos(model, token_pool="mean"), x)
    assert e.completeness_error.max() < 1e-6
    assert bcosify.convert(model).network.global_pool == "token", "the option must not leak into the original"


def test_token_pool_mean_torchvision():
    model = _tv_vit()
    bmodel = bcosify.convert(model, b=1, keep_bias=True, token_pool="mean")
    x = _images()
    with torch.no_grad():
        tokens = model.encoder(torch.cat([model.class_token.expand(len(x), -1, -1),
                                          model._process_input(_normalise(x))], 1))
        expected = model.heads(tokens[:, 1:].mean(1))
        torch.testing.assert_close(bmodel(x), expected, rtol=1e-10, atol=1e-12)
    e = bcosify.explain(_bcos(model, token_pool="mean"), x)
    assert e.completeness_error.max() < 1e-6


def _normalise(x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """What the original model expects: timm's ``pretrained_cfg`` normalisation, else torchvision's."""
    cfg = getattr(model, "pretrained_cfg", None) or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return normalize(x, cfg["mean"], cfg["std"])


def test_token_pool_refuses_other_models():
    with pytest.raises(ConversionError, match="token_pool"):
        bcosify.convert(timm.create_model("resnet18", num_classes=10), token_pool="mean")
    with pytest.raises(ValueError, match="token_pool"):
        bcosify.convert(_timm_vit(), token_pool="max")


@pytest.mark.parametrize("build, names", [
    (lambda: timm.create_model("vit_tiny_patch16_224", global_pool="map", **TINY),
     ["attn_pool: timm.layers.attention_pool.AttentionPoolLatent (attention pooling"]),
], ids=["map-pooling"])  # (BEiT, EVA and torchvision's Swin convert)
def test_refused_transformers_name_module_and_reason(build, names):
    with pytest.raises(ConversionError) as info:
        bcosify.convert(build().eval())
    for name in names:
        assert name in str(info.value)


class _TokenNet(nn.Module):
    """A toy transformer-like net adding a learned offset to its tokens."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 8, 8)
        self.offset = nn.Parameter(torch.randn(1, 1, 8) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2) + self.offset
        return self.head(tokens.mean(1))


def test_container_parameters_must_be_declared_constants():
    torch.manual_seed(0)
    model = _TokenNet().double().eval()
    try:
        register_rule(_TokenNet, Rule("descend"))
        with pytest.raises(ConversionError, match=r"offset: torch.nn.parameter.Parameter"):
            bcosify.convert(model, mean=0.0, std=1.0)
        register_rule(_TokenNet, Rule("descend", constants=("offset",)))
        bmodel = _bcos(model, mean=0.0, std=1.0)
        assert bmodel.constants == ["offset"]
        e = bcosify.explain(bmodel, _images())
        assert e.completeness_error.max() < 1e-6 and bool((e.constant_contribution != 0).all())
    finally:
        RULES.pop(_TokenNet, None)


def _round_trip(bmodel: bcosify.BcosModel, folder) -> bcosify.BcosModel:
    """Save and load ``bmodel``; the loaded model's logits and constant contributions equal the saved one's."""
    bcosify.save(bmodel, folder)
    loaded = bcosify.load(folder)
    x = _images(2).float()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), bmodel(x))
    torch.testing.assert_close(bcosify.explain(loaded, x).constant_contribution,
                               bcosify.explain(bmodel, x).constant_contribution)
    return loaded


def test_vit_save_load_round_trip(tmp_path):
    kwargs = dict(TINY)
    bmodel = bcosify.convert("timm:vit_tiny_patch16_224", weights=None, model_kwargs=kwargs, token_pool="mean")
    loaded = _round_trip(bmodel, tmp_path / "vit")
    assert loaded.constants == bmodel.constants == ["cls_token", "pos_embed"]


def test_vit_recipe_settings_fine_tune_a_vit():
    from torch.utils.data import DataLoader, TensorDataset

    from bcosify.training import load_recipe

    recipe = load_recipe("vit-imagenet")
    assert recipe.finetune["lr"] == 1e-3 and recipe.finetune["warmup_steps"] > 0
    torch.manual_seed(0)
    x = torch.rand(64, 3, SIZE, SIZE)
    x[:32] *= 0.5  # class 0: dark images, class 1: bright ones
    x[32:] = 0.5 + 0.5 * x[32:]
    y = torch.tensor([0] * 32 + [1] * 32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    bmodel = bcosify.convert(timm.create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 2}))
    options = {**recipe.finetune, "epochs": 3, "warmup_steps": 2, "device": "cpu", "progress": False}
    history = bcosify.finetune(bmodel, loader, **options)
    losses = [epoch["loss"] for epoch in history.epochs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_vit_exports_to_onnx(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    bmodel = bcosify.calibrate(bcosify.convert(timm.create_model("vit_tiny_patch16_224", **TINY)).eval(),
                               torch.rand(4, 3, SIZE, SIZE), progress=False)
    path = bcosify.export_onnx(bmodel, tmp_path / "vit.onnx", torch.rand(1, 3, SIZE, SIZE))
    x = torch.rand(3, 3, SIZE, SIZE)
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    with torch.no_grad():
        reference = bmodel(x)
    assert (torch.from_numpy(out) - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


def _with_output_gate(model: nn.Module) -> nn.Module:
    """timm's gated attention (``Attention(gated=True)``): a sigmoid gate on the attention output."""
    for block in model.blocks:
        dim = block.attn.qkv.in_features
        block.attn.gate = nn.Linear(dim, block.attn.attn_dim, dtype=torch.float64)
    return model


@pytest.mark.parametrize("variant", ["qk_norm", "scale_norms", "res_post_block", "output_gate", "dynamic_img_size"])
def test_timm_vit_variants(variant):
    import timm.models.vision_transformer as timm_vit

    kwargs = {"qk_norm": dict(qk_norm=True), "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
              "res_post_block": dict(block_fn=timm_vit.ResPostBlock), "output_gate": {},
              "dynamic_img_size": dict(dynamic_img_size=True)}[variant]
    model = _timm_vit(**kwargs)
    if variant == "output_gate":
        model = _with_output_gate(model)
    assert equivalence_error(model, _images()) < 1e-10
    bmodel = _bcos(model)
    assert bmodel.report.leftovers == []
    e = bcosify.explain(bmodel, _images())
    assert e.completeness_error.max() < 1e-6


def test_split_qkv_needs_three_equal_parts():
    with pytest.raises(ValueError, match="3 equal parts"):
        SplitQKV.from_weights(torch.randn(5, 4), None, lambda v: v)
    qkv = SplitQKV.from_weights(torch.randn(6, 4), torch.randn(6), lambda v: v)
    assert qkv.qk.module.out_features == 4 and qkv.v.out_features == 2


def _xcit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("xcit_nano_12_p8_224", img_size=SIZE, embed_dim=32, depth=2, num_heads=2,
                             cls_attn_layers=1, num_classes=10).double().eval()


def test_xcit_fourier_positional_encoding_is_a_constant_explained_per_sample():
    """XCiT adds sines and cosines of the token grid through a 1x1 convolution (bias included): a module whose
    output is a constant; it is kept, and its output is explained per sample like a positional embedding."""
    bmodel = _bcos(_xcit())
    assert sorted(bmodel.constants) == ["cls_token", "pos_embed"]
    (entry,) = [e for e in bmodel.report.entries if e.path == "pos_embed"]
    assert entry.action == "constant" and entry.old_type.endswith("PositionalEncodingFourier")
    assert bmodel.network.pos_embed.token_projection.bias is not None  # part of the constant, kept
    x = _images(3)
    e = bcosify.explain(bmodel, x)
    assert e.completeness_error.max() < 1e-10
    assert bool((e.constant_contribution.abs() > 1e-3 * e.explained_logit.abs()).all())
    assert len(set(round(v, 12) for v in e.constant_contribution.tolist())) == 3
    assert not bmodel.network.pos_embed._forward_hooks  # explain leaves no hook behind
    assert_batch_matches_single(bmodel, x, e.target, ("constant_contribution", "contributions"), rtol=1e-9)
    # the constants' contribution is sum(c * dlogit/dc) for the encoding's output c, plus the class token's
    outputs = []
    handle = bmodel.network.pos_embed.register_forward_hook(
        lambda _m, _i, out: outputs.append(out.detach().requires_grad_(True)) or outputs[-1])
    try:
        with bmodel.explanation_mode():
            logit = bmodel.network(bmodel.encode(x[:1]))[0, e.target[0]]
            tensors = [outputs[0], bmodel.network.cls_token]
            grads = torch.autograd.grad(logit, tensors)
    finally:
        handle.remove()
    expected = sum((t * g).sum() for t, g in zip(tensors, grads)).detach()
    assert (outputs[0] * grads[0]).sum().abs() > 1e-3 * logit.abs()  # the encoding's own share is no rounding
    torch.testing.assert_close(e.constant_contribution[0], expected, rtol=1e-10, atol=0)


def test_xcit_save_load_round_trip(tmp_path):
    kwargs = dict(img_size=SIZE, embed_dim=32, depth=2, num_heads=2, cls_attn_layers=1, num_classes=10)
    bmodel = bcosify.convert("timm:xcit_nano_12_p8_224", weights=None, model_kwargs=kwargs)
    loaded = _round_trip(bmodel, tmp_path / "xcit")
    assert loaded.constants == bmodel.constants and "pos_embed" in loaded.constants


_EVA = dict(img_size=28, patch_size=7, num_classes=10, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize("variant", ["fused-biases-rope", "fused-no-bias", "separate-swiglu-scale-norm",
                                     "post-norm-gated", "no-rope"])
def test_timm_eva_attention_variants(variant):
    """EVA's attention: q, k (and the rotary embedding on them) a gate, v, the scale norm and proj converted."""
    from timm.models.eva import Eva, EvaAttention
    from timm.layers import LayerNorm

    kwargs = {"fused-biases-rope": dict(use_rot_pos_emb=True, num_reg_tokens=2),
              "fused-no-bias": dict(use_rot_pos_emb=True, qkv_bias=False),
              "separate-swiglu-scale-norm": dict(use_rot_pos_emb=True, qkv_fused=False, swiglu_mlp=True,
                                                 scale_attn_inner=True, qk_norm=True),
              "post-norm-gated": dict(use_rot_pos_emb=True, use_post_norm=True),
              "no-rope": {}}[variant]
    torch.manual_seed(0)
    model = Eva(**_EVA, **kwargs)
    if variant == "post-norm-gated":
        model.blocks[0].attn = EvaAttention(32, 2, gated=True, norm_layer=LayerNorm, scale_norm=True)
    model = randomised(model.double().eval())
    attn = model.blocks[0].attn
    if attn.q_bias is not None:  # (zero at init)
        with torch.no_grad():
            attn.q_bias.normal_(), attn.v_bias.normal_()
    bmodel = bcosify.convert(model, mean=IMAGENET_MEAN, std=IMAGENET_STD, verify=True)
    (entry,) = bmodel.report.by_action("verified")
    errors = {k: float(v) for k, v in re.findall(r"(equivalence|completeness) ([0-9.e+-]+)", entry.note)}
    assert "not informative" not in entry.note and errors["equivalence"] < 1e-10 and errors["completeness"] < 1e-6
    assert bmodel.report.leftovers == []
    if kwargs.get("use_rot_pos_emb"):  # the model calls the rope module's get_embed, never its forward
        (rope,) = [e for e in bmodel.report.entries if e.path == "rope"]
        assert rope.action == "unused" and "calls its methods is checked there" in rope.note
    new = bmodel.network.blocks[0].attn
    if attn.qkv is not None:
        assert isinstance(new.qkv, SplitQKV) and new.q_bias is None and new.k_bias is None
        assert type(new.qkv.v).__name__ == "BcosLinear"
    else:
        assert isinstance(new.q_proj, GatePath) and isinstance(new.k_proj, GatePath)
        assert type(new.v_proj).__name__ == "BcosLinear" and type(new.norm).__name__ == "DetachableLayerNorm"
    if variant == "post-norm-gated":
        assert isinstance(new.gate, GatePath)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "separate-q-k-v"])
def test_timm_attention_rope_splits_q_k_from_v(fused):
    """timm's ``AttentionRope`` (PE, the RoPE ViTs, Qwen3-ViT): q, k (biases kept) a gate, v B-cos."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_rope_mixed_224", img_size=32, depth=1, embed_dim=32, num_heads=2,
                              num_classes=10)
    if not fused:
        model.blocks[0].attn = timm.layers.AttentionRope(32, 2, qkv_fused=False)
    model = randomised(model.double().eval())
    bmodel = bcosify.convert(model, mean=IMAGENET_MEAN, std=IMAGENET_STD, verify=True)
    (entry,) = bmodel.report.by_action("verified")
    errors = {k: float(v) for k, v in re.findall(r"(equivalence|completeness) ([0-9.e+-]+)", entry.note)}
    assert "not informative" not in entry.note and errors["equivalence"] < 1e-10 and errors["completeness"] < 1e-6
    assert bmodel.report.leftovers == []
    new = bmodel.network.blocks[0].attn
    if fused:
        assert isinstance(new.qkv, SplitQKV) and type(new.qkv.v).__name__ == "BcosLinear"
        assert new.qkv.qk.module.bias is not None  # the gate keeps its biases
    else:
        assert isinstance(new.q_proj, GatePath) and type(new.v_proj).__name__ == "BcosLinear"


def _convit() -> nn.Module:
    """A ConViT with one GPSA block (local), then the class token, then one MHSA block; q/k biases on."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", img_size=SIZE, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=8,
                              num_heads=2, qkv_bias=True, num_classes=10)
    return randomised(model.double().eval())


def test_convit_gpsa_keeps_its_attention_as_a_gate_and_converts_v_and_proj():
    """ConViT's gated positional self-attention: ``qk``, ``pos_proj`` (on the relative indices) and the gating
    parameter make the attention matrix (a gate, kept); ``v`` and ``proj`` B-cos. Exact at b=1 with biases,
    complete at b=2, the class token and positional embedding explained as constants."""
    model = _convit()
    attn = model.blocks[0].attn
    bmodel = bcosify.convert(model, mean=IMAGENET_MEAN, std=IMAGENET_STD, verify=True)
    (entry,) = bmodel.report.by_action("verified")
    errors = {k: float(v) for k, v in re.findall(r"(equivalence|completeness) ([0-9.e+-]+)", entry.note)}
    assert "not informative" not in entry.note and errors["equivalence"] < 1e-10 and errors["completeness"] < 1e-6
    assert bmodel.report.leftovers == []
    assert bmodel.constants == ["cls_token", "pos_embed"]
    new = bmodel.network.blocks[0].attn
    assert type(new).__name__ == "GPSA"  # its own forward, kept
    assert isinstance(new.qk, GateLinear) and new.qk.module.bias is not None  # the gate keeps its biases
    assert new.qk.weight is new.qk.module.weight
    assert isinstance(new.pos_proj, GatePath) and new.pos_proj.module.bias is not None
    assert type(new.v).__name__ == "BcosLinear" and new.v.bias is None
    assert type(new.proj).__name__ == "BcosLinear" and new.proj.bias is None
    torch.testing.assert_close(new.gating_param, attn.gating_param)
    gated = {e.path for e in bmodel.report.by_action("gated")}
    assert {"blocks.0.attn", "blocks.0.attn.qk", "blocks.0.attn.pos_proj", "blocks.0.attn.gating_param"} <= gated
    mhsa = bmodel.network.blocks[1].attn  # the global blocks' attention: fused qkv split
    assert isinstance(mhsa.qkv, SplitQKV) and type(mhsa.qkv.v).__name__ == "BcosLinear"
    # b=1 with biases: the original model
    x = _images(3)
    assert equivalence_error(model, x, mean=IMAGENET_MEAN, std=IMAGENET_STD) < 1e-10
    # the relative indices, recomputed when the token count changes, read the gate's weight for their dtype
    with torch.no_grad():
        before = bmodel(x)
        new.rel_indices = torch.zeros(1, 1, 1, 3, dtype=torch.float64)
        torch.testing.assert_close(bmodel(x), before, rtol=1e-12, atol=0)
    assert new.rel_indices.shape == (1, 16, 16, 3) and new.rel_indices.dtype == torch.float64
    # completeness per sample, the constants carrying part of the logit
    e = bcosify.explain(bmodel, x)
    assert e.completeness_error.max() < 1e-6
    total = e.contributions.flatten(1).sum(1) + e.constant_contribution
    torch.testing.assert_close(total, e.explained_logit, rtol=1e-9, atol=0)
    assert bool((e.constant_contribution.abs() > 1e-6 * e.explained_logit.abs()).all())


def test_convit_save_load_round_trip(tmp_path):
    """The wrapped gate layers (``qk``, ``pos_proj``) rebuild from the saved skeleton."""
    kwargs = dict(img_size=SIZE, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=8, num_heads=2, qkv_bias=True,
                  num_classes=10)
    bmodel = bcosify.convert("timm:convit_tiny", weights=None, model_kwargs=kwargs)
    loaded = _round_trip(bmodel, tmp_path / "convit")
    assert loaded.constants == bmodel.constants == ["cls_token", "pos_embed"]


def _edgenext() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("edgenext_xx_small", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), heads=(2, 2, 2, 2),
                             ls_init_value=1.0, num_classes=10).double().eval()


def test_edgenext_positional_encoding_called_with_a_shape_is_a_constant_explained_per_sample():
    """EdgeNeXt's SplitTransposeBlock calls its Fourier positional encoding with ``(B, H, W)`` alone (no tensor goes
    in) and adds the output to the tokens: read as a constant because the encoding's rule says it is one."""
    bmodel = _bcos(_edgenext())
    path = "stages.1.blocks.0.pos_embd"
    assert bmodel.constants == [path] and bmodel.report.leftovers == []
    (entry,) = [e for e in bmodel.report.entries if e.path == path]
    assert entry.action == "constant" and entry.old_type.endswith("edgenext.PositionalEncodingFourier")
    encoding = bmodel.network.get_submodule(path)
    assert encoding.token_projection.bias is not None  # part of the constant, kept
    x = _images(3)
    e = bcosify.explain(bmodel, x)
    assert e.completeness_error.max() < 1e-10
    assert bool((e.constant_contribution.abs() > 1e-3 * e.explained_logit.abs()).all())
    assert len(set(round(v, 15) for v in e.constant_contribution.tolist())) == 3
    assert not encoding._forward_hooks  # explain leaves no hook behind
    assert_batch_matches_single(bmodel, x, e.target, ("constant_contribution", "contributions"), rtol=1e-9)
    # the constant contribution is sum(c * dlogit/dc) for the encoding's output c
    outputs = []
    handle = encoding.register_forward_hook(
        lambda _m, _i, out: outputs.append(out.detach().requires_grad_(True)) or outputs[-1])
    try:
        with bmodel.explanation_mode():
            logit = bmodel.network(bmodel.encode(x[:1]))[0, e.target[0]]
            (grad,) = torch.autograd.grad(logit, outputs)
    finally:
        handle.remove()
    expected = (outputs[0] * grad).sum().detach()
    assert expected.abs() > 1e-3 * logit.abs()  # no rounding
    torch.testing.assert_close(e.constant_contribution[0], expected, rtol=1e-10, atol=0)


def test_coat_save_load_round_trip(tmp_path):
    """CoaT: the relative position encoding shared by a stage's blocks, the class tokens as constants, the
    class-token aggregation (an ``nn.Conv1d``) converted; after a save and load, the same logits."""
    kwargs = dict(img_size=32, embed_dims=[16, 16, 16, 16], serial_depths=[2, 1, 1, 1], parallel_depth=1,
                  num_heads=8, mlp_ratios=[1, 1, 1, 1])  # (the default windows: 3, 5, 7 for 2, 3, 3 heads)
    bmodel = bcosify.convert("timm:coat_tiny", weights=None, model_kwargs=kwargs)
    network = bmodel.network
    assert network.serial_blocks1[0].factoratt_crpe.crpe is network.serial_blocks1[1].factoratt_crpe.crpe
    assert type(network.crpe1.conv_list[0]).__name__ == "BcosConv2d"
    assert type(network.aggregate).__name__ == "Conv1dAs2d"
    loaded = _round_trip(bmodel, tmp_path / "coat")
    assert loaded.constants == bmodel.constants and "cls_token1" in bmodel.constants
    # windows given as {window: heads}: JSON would write the keys as strings, and timm cannot build from those
    windowed = bcosify.convert("timm:coat_tiny", weights=None, model_kwargs={**kwargs, "num_heads": 2,
                                                                             "crpe_window": {3: 1, 5: 1}})
    with pytest.raises(ValueError, match=r"cannot save: model_kwargs\['crpe_window'\] has the key 3"):
        bcosify.save(windowed, tmp_path / "windowed")
    assert not (tmp_path / "windowed").exists()
