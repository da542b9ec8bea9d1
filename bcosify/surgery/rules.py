"""The replacement table: exact module type -> what conversion does with it.

Keys are exact types, never ``isinstance``: timm subclasses ``nn.Conv2d``, ``nn.BatchNorm2d`` and
``nn.LayerNorm`` with different forwards, and a subclass we have not read must be refused, not
converted as if it were its parent. Architecture quirks live in the small named builders below.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import timm.layers
import timm.layers.activations as timm_act
import timm.models
import timm.models._efficientnet_blocks as timm_eff_blocks
import timm.models.beit as timm_beit
import timm.models.deit as timm_deit
import timm.models.eva as timm_eva
import timm.models.swin_transformer as timm_swin
import timm.models.vision_transformer as timm_vit
import torch
import torchvision.models as tvm
import torchvision.models.convnext as tv_convnext
import torchvision.models.densenet as tv_densenet
import torchvision.models.efficientnet as tv_efficientnet
import torchvision.models.mobilenetv2 as tv_mobilenetv2
import torchvision.models.mobilenetv3 as tv_mobilenetv3
import torchvision.models.regnet as tv_regnet
import torchvision.models.resnet as tv_resnet
import torchvision.models.swin_transformer as tv_swin
import torchvision.models.vision_transformer as tv_vit
import torchvision.ops
import torchvision.ops.misc as tv_misc
from torch import nn

from ..config import BcosConfig
from ..errors import ConversionError
from ..nn import (BcosConv2d, BcosLinear, DetachableGroupNorm, DetachableLayerNorm, DetachableLayerNorm2d,
                  DetachedGate, GatePath, MeanPatchTokens, SelfAttention, SplitQKV, UncenteredBatchNorm2d, gated,
                  gelu_gate, gelu_tanh_gate, hardswish_gate, relu6_gate)
from ..nn.act import quick_gelu_gate
from .report import GATED, REPLACED, ConversionReport

DESCEND = "descend"
KEEP = "keep"
REPLACE = "replace"
GATE = "gate"
REFUSE = "refuse"


@dataclass
class Context:
    """What a builder may read while converting one model."""

    config: BcosConfig
    report: ConversionReport
    first_layer: nn.Module | None = None
    convert_child: Callable[[nn.Module, str], nn.Module] | None = None
    path: str = ""
    extra: dict = field(default_factory=dict)


Builder = Callable[[nn.Module, Context], nn.Module]


@dataclass(frozen=True)
class Rule:
    """What happens to modules of one exact type.

    ``descend``: a container whose own forward only composes its children with linear operations
    (sums, concatenation, constant scales, reshapes); its children are converted one by one.
    ``keep``: left as is (linear or dynamic linear: ReLU, pooling, dropout, reshapes).
    ``replace``/``gate``: ``build(module, context)`` returns the replacement.
    ``refuse``: a known type with no exact conversion; ``note`` says why.
    ``constants``: for a container, its own parameters that its forward adds to the value path as constants
    (positional embeddings, class/register tokens); explanations account for them per sample.
    ``scales``: a container's own parameters that its forward multiplies the value path by (layer scale).
    A container's own parameter declared in neither is refused.
    """

    action: str
    build: Builder | None = None
    note: str = ""
    constants: tuple[str, ...] = ()
    scales: tuple[str, ...] = ()


# --- builders ---------------------------------------------------------------------------------------

def fold_input_normalisation(conv: nn.Conv2d, mean: torch.Tensor, std: torch.Tensor) -> nn.Conv2d:
    """A conv over ``[x, 1 - x]`` that computes ``conv((x - mean) / std)`` exactly, zero borders included.

    Weights ``A_c = W_c (1 - mean_c) / std_c`` act on ``x_c`` and ``B_c = -W_c mean_c / std_c`` on
    ``1 - x_c``; a zero-padded tap gives 0 in both models.
    """
    if conv.groups != 1:
        raise ConversionError(f"the first layer must have groups=1 to fold the input normalisation, got {conv.groups}")
    c = conv.in_channels
    if mean.numel() != c or std.numel() != c:
        raise ConversionError(f"mean/std have {mean.numel()}/{std.numel()} values but the first layer takes {c} channels")
    w = conv.weight.detach()
    mean = mean.to(w).view(1, c, 1, 1)
    std = std.to(w).view(1, c, 1, 1)
    new = nn.Conv2d(2 * c, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([w * (1 - mean) / std, -w * mean / std], dim=1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _bcos_conv(conv: nn.Conv2d, ctx: Context, same_padding: bool = False) -> BcosConv2d:
    if conv is ctx.first_layer:
        conv = fold_input_normalisation(conv, torch.tensor(ctx.config.mean, dtype=torch.float64),
                                        torch.tensor(ctx.config.std, dtype=torch.float64))
    try:
        return BcosConv2d.from_module(conv, ctx.config.b, ctx.config.normalize_weights,
                                      keep_bias=ctx.config.keep_bias, same_padding=same_padding)
    except ValueError as e:
        raise ConversionError(f"{ctx.path} ({type(conv).__name__}): {e}") from None


def _bcos_conv_same(conv: nn.Conv2d, ctx: Context) -> BcosConv2d:
    return _bcos_conv(conv, ctx, same_padding=True)


def _bcos_linear(linear: nn.Linear, ctx: Context) -> BcosLinear:
    return BcosLinear.from_module(linear, ctx.config.b, ctx.config.normalize_weights, keep_bias=ctx.config.keep_bias)


def _batchnorm(bn: nn.BatchNorm2d, ctx: Context) -> UncenteredBatchNorm2d:
    return UncenteredBatchNorm2d.from_module(bn, keep_bias=ctx.config.keep_bias)


def _norm_act(norm_type: type) -> Builder:
    """timm's ``*NormAct`` layers: the converted norm, then the layer's own dropout and activation, converted."""

    def build(norm: nn.Module, ctx: Context) -> nn.Sequential:
        parts = OrderedDict(norm=norm_type.from_module(norm, keep_bias=ctx.config.keep_bias))
        convert_child = ctx.convert_child  # (nested conversions move ctx on)
        for name in ("drop", "act"):
            if hasattr(norm, name):
                parts[name] = convert_child(getattr(norm, name), name)
        return nn.Sequential(parts)

    return build


def _layernorm(ln: nn.LayerNorm, ctx: Context) -> DetachableLayerNorm:
    return DetachableLayerNorm.from_module(ln, keep_bias=ctx.config.keep_bias)


def _layernorm2d(ln: nn.LayerNorm, ctx: Context) -> DetachableLayerNorm2d:
    return DetachableLayerNorm2d.from_module(ln, keep_bias=ctx.config.keep_bias)


def _groupnorm(gn: nn.GroupNorm, ctx: Context) -> DetachableGroupNorm:
    return DetachableGroupNorm.from_module(gn, keep_bias=ctx.config.keep_bias)


def _maxpool(pool: nn.MaxPool2d, ctx: Context) -> nn.Module:
    if not ctx.config.maxpool_to_avgpool:
        return pool
    if pool.dilation not in (1, (1, 1)) or pool.return_indices:
        raise ConversionError(f"{ctx.path}: a dilated or index-returning MaxPool2d cannot become AvgPool2d")
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)


def _gate(gate, name: str) -> Builder:
    return lambda act, ctx: gated(act, gate, name)


def _ratio_gate(act: nn.Module, ctx: Context) -> nn.Module:
    return gated(act)


def _gelu(act: nn.GELU, ctx: Context) -> nn.Module:
    if act.approximate == "tanh":
        return gated(act, gelu_tanh_gate, "gelu_tanh")
    return gated(act, gelu_gate, "gelu")


def _se_gate(gate_fn) -> Builder:
    return lambda module, ctx: DetachedGate(module, gate_fn)


def _timm_efficientnet_se_gate(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x_se = se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True))))
    return se.gate(x_se)


def _timm_se_module_gate(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x_se = x.mean((2, 3), keepdim=True)
    if se.add_maxpool:
        x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
    return se.gate(se.fc2(se.act(se.bn(se.fc1(x_se)))))


def _torchvision_se_gate(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return se._scale(x)


#: children of an attention module on the value path (converted); every other child is on the gate path
_ATTENTION_VALUE_CHILDREN = ("proj", "norm", "attn_drop", "proj_drop")


def _attention(attn: nn.Module, ctx: Context) -> nn.Module:
    """timm ``Attention`` / Swin ``WindowAttention``: ``qkv`` split (q, k a gate; v B-cos), ``proj`` converted,
    every other child (q/k norms, softmax, output gate) kept on the gate path."""
    base, convert_child = ctx.path, ctx.convert_child  # (nested conversions move ctx on)
    for name, child in list(attn.named_children()):
        path = f"{base}.{name}"
        if name == "qkv":
            if type(child) not in (nn.Linear, timm.layers.Linear):
                raise ConversionError(f"{path}: expected a Linear qkv projection, got {type(child).__name__}")
            new = SplitQKV.from_weights(child.weight, child.bias, lambda v: _bcos_linear(v, ctx))
            ctx.report.add(path, child, REPLACED, new, "q, k kept (gate, detached in explanation mode); v B-cos")
        elif name in _ATTENTION_VALUE_CHILDREN:
            new = convert_child(child, name)
        else:
            new = GatePath(child)
            ctx.report.add(path, child, GATED, new, "gate path (attention logits or output gate), kept")
        setattr(attn, name, new)
    return attn


def _multihead_attention(mha: nn.MultiheadAttention, ctx: Context) -> SelfAttention:
    """``nn.MultiheadAttention`` (self-attention) as :class:`SelfAttention` with a split ``qkv``."""
    base = ctx.path
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ConversionError(f"{base} (MultiheadAttention): only self-attention with one in_proj, no bias_k/bias_v "
                              "and no add_zero_attn can be converted")
    qkv = SplitQKV.from_weights(mha.in_proj_weight, mha.in_proj_bias, lambda v: _bcos_linear(v, ctx))
    proj = ctx.convert_child(mha.out_proj, "out_proj")
    return SelfAttention(qkv, proj, mha.num_heads, mha.batch_first, mha.dropout)


# --- the table --------------------------------------------------------------------------------------

_CONTAINERS = [
    nn.Sequential, nn.ModuleList, nn.ModuleDict,
    # timm
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
    # torchvision
    tv_resnet.ResNet, tv_resnet.BasicBlock, tv_resnet.Bottleneck, tvm.VGG,
    tv_densenet.DenseNet, tv_densenet._DenseBlock, tv_densenet._DenseLayer, tv_densenet._Transition,
    tv_regnet.RegNet, tv_regnet.AnyStage, tv_regnet.BottleneckTransform, tv_regnet.ResBottleneckBlock,
    tv_regnet.SimpleStemIN,
    tv_efficientnet.EfficientNet, tv_efficientnet.MBConv, tv_efficientnet.FusedMBConv,
    tv_mobilenetv2.MobileNetV2, tv_mobilenetv2.InvertedResidual,
    tv_mobilenetv3.MobileNetV3, tv_mobilenetv3.InvertedResidual,
    tv_convnext.ConvNeXt, tv_misc.Conv2dNormActivation,
    # transformers (the top-level ViTs are below, with their constants)
    timm_vit.Block, timm_vit.ResPostBlock, timm.layers.PatchEmbed,
    timm_swin.SwinTransformer, timm_swin.SwinTransformerStage, timm_swin.SwinTransformerBlock,
    timm_swin.PatchMerging,
    tv_vit.EncoderBlock, tv_vit.MLPBlock, torchvision.ops.MLP,
]

_KEPT = [
    nn.Identity, nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
    nn.AdaptiveMaxPool2d,
    timm.layers.SelectAdaptivePool2d, timm.layers.DropPath,
    torchvision.ops.StochasticDepth, tv_misc.Permute,
    timm.layers.LayerScale, timm.layers.PatchDropout, MeanPatchTokens,
]

RULES: dict[type, Rule] = {
    **{t: Rule(DESCEND) for t in _CONTAINERS},
    **{t: Rule(KEEP) for t in _KEPT},
    # blocks with a layer scale of their own
    timm.models.convnext.ConvNeXtBlock: Rule(DESCEND, scales=("gamma",)),
    tv_convnext.CNBlock: Rule(DESCEND, scales=("layer_scale",)),
    # vision transformers: containers that add constants (explained as constant_contribution)
    timm_vit.VisionTransformer: Rule(DESCEND, constants=("cls_token", "reg_token", "pos_embed")),
    timm_deit.VisionTransformerDistilled: Rule(DESCEND, constants=("cls_token", "reg_token", "dist_token",
                                                                   "pos_embed")),
    tv_vit.VisionTransformer: Rule(DESCEND, constants=("class_token",)),
    tv_vit.Encoder: Rule(DESCEND, constants=("pos_embedding",)),
    # attention: the attention matrix is a gate (q, k detached in explanation mode), v and proj B-cos
    timm.layers.Attention: Rule(GATE, _attention, "attention matrix a gate; v, proj B-cos"),
    timm_swin.WindowAttention: Rule(GATE, _attention, "attention matrix (relative position bias) a gate; v, "
                                                      "proj B-cos"),
    nn.MultiheadAttention: Rule(REPLACE, _multihead_attention, "self-attention; attention matrix a gate"),
    nn.modules.linear.NonDynamicallyQuantizableLinear: Rule(REPLACE, _bcos_linear),
    # known, and refused: their forwards read weights functionally or mix gate and value paths
    timm_beit.Attention: Rule(REFUSE, note="reads its qkv weight functionally with separate q/v biases"),
    timm_eva.EvaAttention: Rule(REFUSE, note="reads q/k/v weights functionally (rotary embedding, q/v biases)"),
    timm.layers.AttentionPoolLatent: Rule(REFUSE, note="attention pooling with a learned query "
                                                       "(use global_pool='token' or 'avg')"),
    tv_swin.ShiftedWindowAttention: Rule(REFUSE, note="reads qkv/proj weights functionally (use timm's Swin)"),
    tv_swin.ShiftedWindowAttentionV2: Rule(REFUSE, note="reads qkv/proj weights functionally (use timm's Swin)"),
    nn.MaxPool2d: Rule(REPLACE, _maxpool, "dynamic linear (selects an input)"),
    # convolutions and linear layers on the value path
    nn.Conv2d: Rule(REPLACE, _bcos_conv),
    timm.layers.Conv2dSame: Rule(REPLACE, _bcos_conv_same, "TF 'SAME' padding kept"),
    nn.Linear: Rule(REPLACE, _bcos_linear),
    timm.layers.Linear: Rule(REPLACE, _bcos_linear),
    # normalisation
    nn.BatchNorm2d: Rule(REPLACE, _batchnorm, "uncentred, bias-free"),
    timm.layers.BatchNormAct2d: Rule(REPLACE, _norm_act(UncenteredBatchNorm2d), "uncentred, bias-free; act kept"),
    timm.layers.GroupNormAct: Rule(REPLACE, _norm_act(DetachableGroupNorm), "std detached; act kept"),
    timm.layers.GroupNorm1Act: Rule(REPLACE, _norm_act(DetachableGroupNorm), "std detached; act kept"),
    timm.layers.LayerNormAct: Rule(REPLACE, _norm_act(DetachableLayerNorm), "std detached; act kept"),
    timm.layers.LayerNormAct2d: Rule(REPLACE, _norm_act(DetachableLayerNorm2d), "std detached; act kept"),
    nn.LayerNorm: Rule(REPLACE, _layernorm, "std detached in explanation mode"),
    timm.layers.LayerNorm: Rule(REPLACE, _layernorm, "std detached in explanation mode"),
    timm.layers.LayerNorm2d: Rule(REPLACE, _layernorm2d, "std detached in explanation mode"),
    tv_convnext.LayerNorm2d: Rule(REPLACE, _layernorm2d, "std detached in explanation mode"),
    nn.GroupNorm: Rule(REPLACE, _groupnorm, "std detached in explanation mode"),
    timm.layers.GroupNorm: Rule(REPLACE, _groupnorm, "std detached in explanation mode"),
    timm.layers.GroupNorm1: Rule(REPLACE, _groupnorm, "std detached in explanation mode"),
    # activations as gates
    nn.ReLU6: Rule(REPLACE, _gate(relu6_gate, "relu6")),
    nn.GELU: Rule(REPLACE, _gelu),
    timm_act.GELU: Rule(REPLACE, _gate(gelu_gate, "gelu")),
    timm_act.GELUTanh: Rule(REPLACE, _gate(gelu_tanh_gate, "gelu_tanh")),
    timm_act.QuickGELU: Rule(REPLACE, _gate(quick_gelu_gate, "quick_gelu")),
    nn.SiLU: Rule(REPLACE, _gate(torch.sigmoid, "silu")),
    timm_act.Swish: Rule(REPLACE, _gate(torch.sigmoid, "silu")),
    nn.Hardswish: Rule(REPLACE, _gate(hardswish_gate, "hardswish")),
    timm_act.HardSwish: Rule(REPLACE, _gate(hardswish_gate, "hardswish")),
    nn.Tanh: Rule(REPLACE, _ratio_gate),
    timm_act.Tanh: Rule(REPLACE, _ratio_gate),
    nn.LeakyReLU: Rule(REPLACE, _ratio_gate),
    nn.Mish: Rule(REPLACE, _ratio_gate),
    timm_act.Mish: Rule(REPLACE, _ratio_gate),
    # squeeze-excite: the gate branch stays as it is and is detached in explanation mode
    timm_eff_blocks.SqueezeExcite: Rule(GATE, _se_gate(_timm_efficientnet_se_gate)),
    timm.layers.SEModule: Rule(GATE, _se_gate(_timm_se_module_gate)),
    tv_misc.SqueezeExcitation: Rule(GATE, _se_gate(_torchvision_se_gate)),
}


def register_rule(module_type: type, rule: Rule) -> None:
    """Teach the engine a module type of your own (exact type), e.g. ``Rule("descend")`` for a block
    whose forward only composes its children linearly."""
    if rule.action not in (DESCEND, KEEP, REPLACE, GATE, REFUSE):
        raise ValueError(f"unknown rule action {rule.action!r}")
    if rule.action in (REPLACE, GATE) and rule.build is None:
        raise ValueError(f"a {rule.action!r} rule needs a build function")
    RULES[module_type] = rule
