"""Rules for timm's modules (imported only when timm is installed)."""

from __future__ import annotations

import timm.layers
import timm.layers.activations as timm_act
import timm.models
import timm.models._efficientnet_blocks as timm_eff_blocks
import timm.models.beit as timm_beit
import timm.models.coat as timm_coat
import timm.models.convit as timm_convit
import timm.models.deit as timm_deit
import timm.models.edgenext as timm_edgenext
import timm.models.efficientvit_mit as timm_evit_mit
import timm.models.eva as timm_eva
import timm.models.focalnet as timm_focalnet
import timm.models.metaformer as timm_metaformer
import timm.models.mlp_mixer as timm_mlp_mixer
import timm.models.swin_transformer as timm_swin
import timm.models.swin_transformer_v2 as timm_swin_v2
import timm.models.twins as timm_twins
import timm.models.vision_transformer as timm_vit
import timm.models.vision_transformer_relpos as timm_vit_relpos
import timm.models.xcit as timm_xcit
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from ...nn import (DetachableGroupNorm, DetachableLayerNorm, DetachableLayerNorm2d, UncenteredBatchNorm2d, gated,
                   gelu_gate, gelu_tanh_gate, hardswish_gate)
from ...errors import ConversionError
from ...nn import BcosCondConv2d, GateLinear, GatePath, LinearAttention, SplitQKV, SplitQKVConv
from ...nn.act import quick_gelu_gate
from ..report import GATED, REPLACED
from .base import CONSTANT_OUTPUT, DESCEND, GATE, KEEP, REFUSE, REPLACE, Rule
from .base import Context
from .core import (FIRST_LAYER_TYPES, LINEAR_TYPES, PLAIN_CONVS, attention, bcos_conv, bcos_conv_same, bcos_linear,
                   gate, groupnorm, layernorm, layernorm2d, norm_act, ratio_gate, route_children, split_qkv)

LINEAR_TYPES.add(timm.layers.Linear)
FIRST_LAYER_TYPES.add(timm.layers.Conv2dSame)
_STD_CONVS = (timm.layers.StdConv2d, timm.layers.StdConv2dSame, timm.layers.ScaledStdConv2d,
              timm.layers.ScaledStdConv2dSame)


def plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The plain convolution a weight-standardised one computes: its standardised weight (a function of its
    parameters alone, as its forward computes it) baked in; TF 'SAME' padding kept."""
    gain = (conv.gain * conv.scale).view(-1) if hasattr(conv, "gain") else None
    with torch.no_grad():
        weight = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, weight=gain,
                              training=True, momentum=0.0, eps=conv.eps).reshape_as(conv.weight)
    same = getattr(conv, "same_pad", False)
    new = skip_init(
        timm.layers.Conv2dSame if same else nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size,
        conv.stride, 0 if same else conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new.train(conv.training)


def _std_conv(conv: nn.Conv2d, ctx: Context) -> nn.Module:
    plain = plain_conv(conv)
    return (bcos_conv_same if type(plain) is timm.layers.Conv2dSame else bcos_conv)(plain, ctx)


PLAIN_CONVS.update({t: plain_conv for t in _STD_CONVS})


class LearnedScale(nn.Module):
    """HGNetV2's learnable affine block without (or, for the equivalence check, with) its bias: ``scale * x``."""

    def __init__(self, scale: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.scale, self.bias = scale, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x if self.bias is None else self.scale * x + self.bias


def _learnable_affine(block: nn.Module, ctx: Context) -> LearnedScale:
    return LearnedScale(block.scale, block.bias if ctx.config.keep_bias else None)


class _ScaledSquaredReLU(nn.Module):
    """``scale * relu(x) ** 2``: MetaFormer's StarReLU without its bias."""

    def __init__(self, scale: nn.Parameter) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2


def _star_relu(act: nn.Module, ctx: Context) -> nn.Module:
    """``scale * relu(x)^2 (+ bias)`` as ``x * (scale * relu(x))``, the gate detached in explanation mode; the bias
    (``f(0) != 0``) is removed unless biases are kept."""
    core = act if ctx.config.keep_bias else _ScaledSquaredReLU(act.scale)
    return gated(core, lambda x: act.scale * F.relu(x), "star_relu")


def _cond_conv(conv: nn.Module, ctx: Context) -> BcosCondConv2d:
    """timm's ``CondConv2d``: expert kernels mixed per sample by routing weights (a gate, computed by the block)."""
    config = ctx.config
    if config.unit != "bcos":
        raise ConversionError(f"{ctx.path} ({type(conv).__name__}): unit={config.unit!r} has no form with "
                              "per-sample expert kernels; convert with unit='bcos'")
    return BcosCondConv2d.from_module(conv, config.b, config.normalize_weights, keep_bias=config.keep_bias)


def _attention_with_qkv_biases(attn: nn.Module, ctx: Context) -> nn.Module:
    """BEiT's and Swin V2's attention: the ``qkv`` weight and separate q/k/v biases as one split ``qkv`` (q, k a
    gate, v B-cos), which the forward then calls; position biases (a table, Swin V2's continuous position bias MLP)
    and the cosine attention's scale stay on the attention logits (gate path)."""
    base, convert_child = ctx.path, ctx.convert_child
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach()
    qkv = SplitQKV.from_weights(attn.qkv.weight.detach(), bias, lambda v: bcos_linear(v, ctx))
    ctx.report.add(f"{base}.qkv", attn.qkv, REPLACED, qkv, "with q/k/v biases; q, k kept (gate, detached in "
                                                            "explanation mode); v B-cos")
    attn.qkv = qkv
    attn.q_bias = attn.k_bias = attn.v_bias = None  # its forward now calls qkv, biases included
    attn.proj = convert_child(attn.proj, "proj")
    return attn


def _eva_attention(attn: nn.Module, ctx: Context) -> nn.Module:
    """EVA's attention (EVA-02, DINOv3, ...) and timm's ``AttentionRope`` (PE, the RoPE ViTs, Qwen3-ViT): the fused ``qkv`` with its q/k/v biases (``k_bias`` a zero buffer)
    split (q, k a gate, v B-cos), or separate ``q_proj``/``k_proj`` (gate) and ``v_proj`` (B-cos); the rotary
    embedding and q/k norms act on the detached q, k only; the output gate (``gated``) is a gate; the scale norm on
    the value path and ``proj`` converted. Its own forward is kept: it then calls the split projections."""
    base, convert_child = ctx.path, ctx.convert_child
    gate_note = "q, k kept (gate, detached in explanation mode; rotary embedding on them only); v B-cos"
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is not None:  # EVA: separate q/k/v biases, concatenated by its forward
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach()
            attn.q_bias = attn.k_bias = attn.v_bias = None  # its forward now calls qkv, biases included
        else:
            bias = None if attn.qkv.bias is None else attn.qkv.bias.detach()
        qkv = SplitQKV.from_weights(attn.qkv.weight.detach(), bias, lambda v: bcos_linear(v, ctx))
        ctx.report.add(f"{base}.qkv", attn.qkv, REPLACED, qkv, ("with q/k/v biases; " if bias is not None else "")
                       + gate_note)
        attn.qkv = qkv
    else:
        for name in ("q_proj", "k_proj"):
            old = getattr(attn, name)
            setattr(attn, name, GatePath(old))
            ctx.report.add(f"{base}.{name}", old, GATED, note="kept (gate, detached in explanation mode)")
        attn.v_proj = convert_child(attn.v_proj, "v_proj")
    if attn.gate is not None:  # sigmoid(gate(x)) multiplies the attention output: a gate
        ctx.report.add(f"{base}.gate", attn.gate, GATED, note="output gate, kept (detached in explanation mode)")
        attn.gate = GatePath(attn.gate)
    attn.norm = convert_child(attn.norm, "norm")
    attn.proj = convert_child(attn.proj, "proj")
    return attn


def _gpsa(attn: nn.Module, ctx: Context) -> nn.Module:
    """ConViT's gated positional self-attention: ``attn = (1 - sigmoid(g)) softmax(q k^T) + sigmoid(g)
    softmax(pos_proj(rel_indices))``, renormalised, then ``proj(attn @ v)``. The attention matrix is a gate: ``qk``
    (biases kept; it still shows its weight, which the forward reads for the dtype of the relative indices),
    ``pos_proj`` (on a buffer of the token grid's relative positions) and the gating parameter stay as they are,
    detached in explanation mode; ``v`` and ``proj`` are converted. Its own forward is kept (it recomputes the
    relative indices when the token count changes, which torch.fx cannot trace)."""
    def qk(child: nn.Module, path: str) -> nn.Module:
        if type(child) not in LINEAR_TYPES:
            raise ConversionError(f"{path}: expected a Linear qk projection, got {type(child).__name__}")
        new = GateLinear(child)
        ctx.report.add(path, child, GATED, new, "q, k kept (gate, detached in explanation mode)")
        return new

    base = ctx.path
    route_children(attn, ctx, value=("v", "proj", "proj_drop"),
                   gate={"pos_proj": "positional attention logits from the relative indices (gate), kept"},
                   build={"qk": qk, "attn_drop": lambda child, path: child})  # (attn_drop acts on the attention)
    for name, param in attn.named_parameters(recurse=False):
        if name != "gating_param":
            raise ConversionError(f"{base}.{name}: a parameter of {type(attn).__name__} this rule does not know")
        ctx.report.add(f"{base}.{name}", param, GATED, note="mixes the two attention matrices (gate), kept")
    return attn


def _relpos_attention(attn: nn.Module, ctx: Context) -> nn.Module:
    """A ViT attention whose relative position module (called for a bias, never on the input) stays as it is."""
    rel_pos = attn.rel_pos
    del attn.rel_pos
    try:
        attention(attn, ctx)
    finally:
        attn.rel_pos = rel_pos
    return attn


def _conv_attention(attn: nn.Module, ctx: Context) -> nn.Module:
    """MaxViT/CoAtNet's ``Attention2d``: its 1x1 ``qkv`` convolution split (q, k a gate; v B-cos, in the fused
    channel order), ``proj`` converted; the relative position module (a bias on the logits) stays as it is."""
    conv = attn.qkv
    if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ConversionError(f"{ctx.path}.qkv: expected a 1x1 Conv2d, got {conv}")
    part = torch.arange(conv.out_channels, device=conv.weight.device)
    if attn.head_first:  # (heads, [q, k, v], dim_head)
        value_channels = (part // attn.dim_head) % 3 == 2
    else:  # ([q, k, v], heads, dim_head)
        value_channels = part >= 2 * conv.out_channels // 3
    qkv = SplitQKVConv.from_conv(conv, value_channels, lambda v: bcos_conv(v, ctx))
    ctx.report.add(f"{ctx.path}.qkv", conv, REPLACED, qkv, "q, k kept (gate, detached in explanation mode); v B-cos")
    attn.qkv = qkv
    attn.proj = ctx.convert_child(attn.proj, "proj")
    return attn


def _linear_attention(mla: nn.Module, ctx: Context) -> nn.Module:
    """EfficientViT-MIT's ``LiteMLA`` (ReLU linear attention over multi-scale q/k/v): its fused ``qkv``
    convolution and every aggregation convolution split by channel (q, k kept, a gate; v B-cos), ``proj``
    converted; see :class:`bcosify.nn.LinearAttention`."""
    base = ctx.path

    def convert_value(conv: nn.Conv2d, name: str) -> nn.Module:
        ctx.path = f"{base}.{name}"
        new = bcos_conv(conv, ctx)
        ctx.report.add(ctx.path, mla.get_submodule(name), REPLACED, new,
                       "value channels B-cos; query/key channels kept (gate, detached in explanation mode)")
        return new

    try:
        new = LinearAttention.from_module(mla, convert_value, proj=nn.Identity())
    except ValueError as e:
        raise ConversionError(f"{base} ({type(mla).__name__}): {e}") from None
    new.proj = ctx.convert_child(mla.proj, "proj")
    ctx.path = base
    return new


def _subsample_attention(attn: nn.Module, ctx: Context) -> nn.Module:
    """Twins' ``GlobalSubSampleAttn``: queries from ``q`` on the input (a gate); keys and values from one ``kv``
    linear on the input subsampled by the strided convolution ``sr`` and its LayerNorm ``norm``. ``sr`` and
    ``norm`` are on the value path (v is computed from them), so they are converted; ``kv`` is split (k a gate,
    detached in explanation mode; v B-cos); ``proj`` converted. The keys are computed from the converted ``sr`` and
    ``norm``: at b=1 with biases kept they are the original keys."""
    return route_children(attn, ctx, value=("sr", "norm", "proj", "attn_drop", "proj_drop"),
                          gate={"q": "queries: gate path, kept (detached in explanation mode)"},
                          build={"kv": split_qkv(ctx, parts=2)})


def _spatial_gating_unit(sgu: nn.Module, ctx: Context) -> nn.Module:
    """gMLP's spatial gating ``u * proj(norm(v))^T``: the token-mixing branch (norm, proj; the half ``v`` of the
    input) a gate, kept and detached in explanation mode, as attention is; ``u`` on the value path."""
    return route_children(sgu, ctx, gate=dict.fromkeys(("norm", "proj"), "spatial gating branch (a gate), kept"))


def _focal_modulation(mod: nn.Module, ctx: Context) -> nn.Module:
    """FocalNet's ``q * h(ctx_all)``: the modulator (the context channels and gates of ``f``, the focal
    convolutions, their aggregation and ``h``) a gate, kept and detached in explanation mode, as attention is;
    ``q`` (the first ``dim`` channels of ``f``), the post-norm and ``proj`` on the value path."""
    note = "modulator (a gate), kept"

    def f(child: nn.Module, path: str) -> nn.Module:
        if type(child) is not nn.Conv2d or child.kernel_size != (1, 1) or child.groups != 1:
            raise ConversionError(f"{path}: expected a 1x1 Conv2d without groups, got {child}")
        value = torch.arange(child.out_channels, device=child.weight.device) < mod.dim
        new = SplitQKVConv.from_conv(child, value, lambda conv: bcos_conv(conv, ctx))
        ctx.report.add(path, child, REPLACED, new, "q B-cos; context and gate channels kept (a gate)")
        return new

    def focal_layers(child: nn.Module, path: str) -> nn.Module:  # (the forward iterates over them: each wrapped)
        new = nn.ModuleList(map(GatePath, child))
        ctx.report.add(path, child, GATED, new, note)
        return new

    return route_children(mod, ctx, value=("norm", "proj", "proj_drop"), gate=dict.fromkeys(("h", "act"), note),
                          build={"f": f, "focal_layers": focal_layers})


#: CoaT's attention: the children on the value path (its shared relative position encoding convolves v)
_COAT_VALUE_CHILDREN = ("proj", "attn_drop", "proj_drop", "crpe")

_CONTAINERS = (
    timm.models.resnet.ResNet, timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck,
    timm.models.vgg.VGG, timm.models.vgg.ConvMlp,
    timm.models.densenet.DenseNet, timm.models.densenet.DenseBlock, timm.models.densenet.DenseLayer,
    timm.models.densenet.DenseTransition,
    timm.models.regnet.RegNet, timm.models.regnet.RegStage, timm.models.regnet.Bottleneck,
    timm.models.efficientnet.EfficientNet, timm.models.mobilenetv3.MobileNetV3,
    timm_eff_blocks.DepthwiseSeparableConv, timm_eff_blocks.InvertedResidual, timm_eff_blocks.ConvBnAct,
    timm_eff_blocks.EdgeResidual,
    timm.models.convnext.ConvNeXt, timm.models.convnext.ConvNeXtStage,
    timm.layers.ClassifierHead, timm.layers.NormMlpClassifierHead, timm.layers.Mlp, timm.layers.ConvNormAct,
    # transformers (the top-level ViTs are below, with their constants)
    timm_vit.Block, timm_vit.ResPostBlock, timm.layers.PatchEmbed,
    timm_swin.SwinTransformer, timm_swin.SwinTransformerStage, timm_swin.SwinTransformerBlock,
    timm_swin.PatchMerging,
    # read by hand: linear glue whose forwards torch.fx cannot trace (lists of tensors in and out, indexed or
    # filled in place; a forward chosen per instance)
    timm.models.vovnet.SequentialAppendList,  # children appended to the caller's list, then concatenated
    timm.models.hrnet.HighResolutionModule,  # branches, then sums of resampled branches and a ReLU
    timm.models.selecsls.SelecSlsBlock,  # convolutions and concatenations over a list of two tensors
    timm.models.fasternet.Partial_conv3,  # a convolution over the first channels, the rest passed on
    timm.models.mobilenetv5.MobileNetV5MultiScaleFusionAdapter,  # resize, concatenate, a block, pool
    # per stage: patch embedding (returns tokens and the grid size), dropout, blocks called with the grid size,
    # the positional convolution after the first block, tokens reshaped to a map between stages; then norm, token
    # mean, head (fx cannot unpack the grid size, `*size`, nor zip the stage lists)
    timm_twins.Twins,
)

_KEPT = (timm.layers.SelectAdaptivePool2d, timm.layers.DropPath, timm.layers.LayerScale, timm.layers.PatchDropout,
         timm.layers.AvgPool2dSame,  # zero 'SAME' padding, then averaging: linear
         timm.layers.pool2d_same.MaxPool2dSame)  # -inf 'SAME' padding, then a selection: dynamic linear

RULES: dict[type, Rule] = {
    **{t: Rule(DESCEND) for t in _CONTAINERS},
    **{t: Rule(KEEP) for t in _KEPT},
    # blocks with a layer scale of their own
    timm.models.convnext.ConvNeXtBlock: Rule(DESCEND, scales=("gamma",)),
    # vision transformers: containers that add constants (explained as constant_contribution)
    timm_vit.VisionTransformer: Rule(DESCEND, constants=("cls_token", "reg_token", "pos_embed")),
    timm_deit.VisionTransformerDistilled: Rule(DESCEND, constants=("cls_token", "reg_token", "dist_token",
                                                                   "pos_embed")),
    # a positional encoding computed from the token grid's size alone (sines and cosines, then a 1x1 convolution
    # with its bias): a constant the model adds to the tokens, kept and explained per sample
    timm_xcit.PositionalEncodingFourier: Rule(CONSTANT_OUTPUT, note="Fourier features of the grid size through a 1x1 "
                                                                    "conv: a constant, explained as "
                                                                    "constant_contribution"),
    # EdgeNeXt's copy of it, called with the shape (B, H, W) alone
    timm_edgenext.PositionalEncodingFourier: Rule(CONSTANT_OUTPUT, note="Fourier features of the grid size "
                                                                        "through a 1x1 conv: a constant, explained "
                                                                        "as constant_contribution"),
    # attention: the attention matrix is a gate (q, k detached in explanation mode), v and proj B-cos
    timm.layers.Attention: Rule(GATE, attention, "attention matrix a gate; v, proj B-cos"),
    timm_swin.WindowAttention: Rule(GATE, attention, "attention matrix (relative position bias) a gate; v, "
                                                     "proj B-cos"),
    # known, and refused: their forwards read weights functionally or mix gate and value paths
    timm_beit.Attention: Rule(GATE, _attention_with_qkv_biases, "attention matrix (relative position bias) a "
                                                                "gate; v, proj B-cos"),
    timm_swin_v2.WindowAttention: Rule(GATE, _attention_with_qkv_biases, "cosine attention (continuous position "
                                                                         "bias) a gate; v, proj B-cos"),
    timm.models.maxxvit.Attention2d: Rule(GATE, _conv_attention, "attention matrix (relative position bias) a "
                                                                 "gate; v, proj B-cos"),
    # Twins: locally grouped (windowed, zero-padded to whole windows) attention with a fused qkv; global
    # attention over keys and values from a strided convolution of the input (v's path: sr, norm, kv's v rows)
    timm_twins.LocallyGroupedAttn: Rule(GATE, attention, "windowed attention matrix a gate; v, proj B-cos"),
    timm_twins.GlobalSubSampleAttn: Rule(GATE, _subsample_attention, "attention matrix a gate (q; k from kv); "
                                                                     "sr, norm, v, proj B-cos"),
    timm_convit.GPSA: Rule(GATE, _gpsa, "gated positional attention matrix a gate (qk, pos_proj, gating_param "
                                        "kept); v, proj B-cos"),
    timm_convit.MHSA: Rule(GATE, attention, "attention matrix a gate; v, proj B-cos"),
    timm_evit_mit.LiteMLA: Rule(GATE, _linear_attention, "ReLU linear attention: q, k (and the normaliser) a gate; "
                                                        "v (qkv and aggregation convolutions' value channels), "
                                                        "proj B-cos"),
    timm_vit_relpos.RelPosAttention: Rule(GATE, _relpos_attention, "attention matrix (relative position bias) a "
                                                                   "gate; v, proj B-cos"),
    # CoaT's factorized attention: q @ (softmax(k)^T v), plus q * (depthwise convolutions of v): q and softmax(k)
    # a gate (as in attention, detached in explanation mode), linear in v
    timm_coat.FactorAttnConvRelPosEnc: Rule(GATE, lambda attn, ctx: attention(attn, ctx, _COAT_VALUE_CHILDREN),
                                            "q and softmax(k) a gate; v, proj and the position encoding's "
                                            "convolutions of v B-cos"),
    timm_coat.ConvRelPosEnc: Rule(DESCEND, note="q (a gate: the split qkv's, detached in explanation mode) times "
                                                "depthwise convolutions of v (read by hand)"),
    # one factor of a product a gate, as the attention matrix is: gMLP's spatial gating, FocalNet's modulator
    timm_mlp_mixer.SpatialGatingUnit: Rule(GATE, _spatial_gating_unit, "u * proj(norm(v)): the v branch a gate"),
    timm_focalnet.FocalModulation: Rule(GATE, _focal_modulation, "q * modulator: the modulator a gate; q, proj "
                                                                 "B-cos"),
    timm_eva.EvaAttention: Rule(GATE, _eva_attention, "attention matrix (rotary embedding on q, k) a gate; v, "
                                                       "proj B-cos", gate_args=("rope",)),
    timm.layers.AttentionRope: Rule(GATE, _eva_attention, "attention matrix (rotary embedding on q, k) a gate; v, "
                                                          "proj B-cos", gate_args=("rope",)),
    timm.layers.AttentionPoolLatent: Rule(REFUSE, note="attention pooling with a learned query "
                                                       "(use global_pool='token' or 'avg')"),
    timm_metaformer.StarReLU: Rule(REPLACE, _star_relu, "x * (scale * relu(x)), bias removed"),
    timm_metaformer.SquaredReLU: Rule(REPLACE, gate(F.relu, "squared_relu")),
    timm_metaformer.GroupNorm1NoBias: Rule(REPLACE, groupnorm, "std detached in explanation mode"),
    timm_metaformer.LayerNorm2dNoBias: Rule(REPLACE, layernorm2d, "std detached in explanation mode"),
    timm_metaformer.LayerNormNoBias: Rule(REPLACE, layernorm, "std detached in explanation mode"),
    timm.models.hgnet.LearnableAffineBlock: Rule(REPLACE, _learnable_affine, "a learned scale; bias removed"),
    # convolutions and linear layers on the value path
    timm.layers.Conv2dSame: Rule(REPLACE, bcos_conv_same, "TF 'SAME' padding kept"),
    timm.layers.CondConv2d: Rule(REPLACE, _cond_conv, "expert kernels mixed per sample by the routing weights (a "
                                                      "gate, detached in explanation mode)"),
    **{t: Rule(REPLACE, _std_conv, "weight standardisation baked into the weight") for t in _STD_CONVS},
    timm.layers.Linear: Rule(REPLACE, bcos_linear),
    # normalization
    timm.layers.BatchNormAct2d: Rule(REPLACE, norm_act(UncenteredBatchNorm2d), "uncentred, bias-free; act kept"),
    timm.layers.GroupNormAct: Rule(REPLACE, norm_act(DetachableGroupNorm), "std detached; act kept"),
    timm.layers.GroupNorm1Act: Rule(REPLACE, norm_act(DetachableGroupNorm), "std detached; act kept"),
    timm.layers.LayerNormAct: Rule(REPLACE, norm_act(DetachableLayerNorm), "std detached; act kept"),
    timm.layers.LayerNormAct2d: Rule(REPLACE, norm_act(DetachableLayerNorm2d), "std detached; act kept"),
    timm.layers.LayerNorm: Rule(REPLACE, layernorm, "std detached in explanation mode"),
    timm.layers.LayerNorm2d: Rule(REPLACE, layernorm2d, "std detached in explanation mode"),
    timm.layers.GroupNorm: Rule(REPLACE, groupnorm, "std detached in explanation mode"),
    timm.layers.GroupNorm1: Rule(REPLACE, groupnorm, "std detached in explanation mode"),
    # activations as gates
    timm_act.GELU: Rule(REPLACE, gate(gelu_gate, "gelu")),
    timm_act.GELUTanh: Rule(REPLACE, gate(gelu_tanh_gate, "gelu_tanh")),
    timm_act.QuickGELU: Rule(REPLACE, gate(quick_gelu_gate, "quick_gelu")),
    timm_act.Swish: Rule(REPLACE, gate(torch.sigmoid, "silu")),
    timm_act.HardSwish: Rule(REPLACE, gate(hardswish_gate, "hardswish")),
    timm_act.Tanh: Rule(REPLACE, ratio_gate),
    timm_act.Mish: Rule(REPLACE, ratio_gate),
    # (squeeze-excite modules have no rule: their forwards are read, the gate branch kept as it is and detached in
    # explanation mode)
}
