"""Rules for torchvision's models (imported only when torchvision is installed)."""

from __future__ import annotations

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
from torchvision.models.googlenet import GoogLeNet
from torchvision.models.inception import Inception3

from ...errors import ConversionError
from ...nn import ShiftedWindowAttention, SplitQKV
from ..report import REPLACED
from .base import DESCEND, GATE, KEEP, REPLACE, Context, Rule
from .core import INPUT_TRANSFORMS, LINEAR_TYPES, bcos_linear, layernorm2d


# GoogLeNet and Inception v3 built for torchvision's weights re-normalize their ImageNet-normalized input to
# (x - 0.5) / 0.5 per channel: x * (std / 0.5) + (mean - 0.5) / 0.5
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
for _type in (GoogLeNet, Inception3):
    INPUT_TRANSFORMS[_type] = ("transform_input", tuple(s / 0.5 for s in _IMAGENET_STD),
                               tuple((m - 0.5) / 0.5 for m in _IMAGENET_MEAN))

def _shifted_window_attention(attn: nn.Module, ctx: Context) -> ShiftedWindowAttention:
    """Swin's and Swin V2's shifted-window attention, whose forward reads ``qkv.weight`` and ``proj.weight``
    functionally: rebuilt as a module that calls a split ``qkv`` (q, k a gate, v B-cos) and the converted
    ``proj``. V2's forward zeroes the key bias on every call; the split's key bias is zero. The relative
    position bias (a table, or V2's continuous position bias MLP), the cosine attention's scale and the shifted
    windows' mask stay on the attention logits (gate path)."""
    base, convert_child = ctx.path, ctx.convert_child  # (nested conversions move ctx on)
    for name in ("qkv", "proj"):
        if type(getattr(attn, name)) not in LINEAR_TYPES:
            raise ConversionError(f"{base}.{name}: expected a Linear, got {type(getattr(attn, name)).__name__}")
    v2 = type(attn) is tv_swin.ShiftedWindowAttentionV2
    bias = None if attn.qkv.bias is None else attn.qkv.bias.detach().clone()
    if v2 and bias is not None:
        length = bias.numel() // 3
        bias[length:2 * length] = 0
    qkv = SplitQKV.from_weights(attn.qkv.weight.detach(), bias, lambda v: bcos_linear(v, ctx))
    ctx.report.add(f"{base}.qkv", attn.qkv, REPLACED, qkv, "q, k kept (gate, detached in explanation mode); v B-cos"
                   + ("; key bias zero, as V2's forward makes it" if v2 and bias is not None else ""))
    proj = convert_child(attn.proj, "proj")
    position = (dict(cpb_mlp=attn.cpb_mlp, relative_coords_table=attn.relative_coords_table,
                     logit_scale=attn.logit_scale) if v2
                else dict(relative_position_bias_table=attn.relative_position_bias_table))
    return ShiftedWindowAttention(qkv, proj, attn.window_size, attn.shift_size, attn.num_heads,
                                  attn.relative_position_index, attention_dropout=attn.attention_dropout,
                                  dropout=attn.dropout, **position).train(attn.training)


_CONTAINERS = (
    tv_resnet.ResNet, tv_resnet.BasicBlock, tv_resnet.Bottleneck, tvm.VGG,
    tv_densenet.DenseNet, tv_densenet._DenseBlock, tv_densenet._DenseLayer, tv_densenet._Transition,
    tv_regnet.RegNet, tv_regnet.AnyStage, tv_regnet.BottleneckTransform, tv_regnet.ResBottleneckBlock,
    tv_regnet.SimpleStemIN,
    tv_efficientnet.EfficientNet, tv_efficientnet.MBConv, tv_efficientnet.FusedMBConv,
    tv_mobilenetv2.MobileNetV2, tv_mobilenetv2.InvertedResidual,
    tv_mobilenetv3.MobileNetV3, tv_mobilenetv3.InvertedResidual,
    tv_convnext.ConvNeXt, tv_misc.Conv2dNormActivation,
    tv_vit.EncoderBlock, tv_vit.MLPBlock, torchvision.ops.MLP,
    # read by hand: zero padding to even sizes, strided slicing and concatenation (a call torchvision wraps as an
    # fx leaf, ``_patch_merging_pad``), then the norm and the reduction
    tv_swin.PatchMerging, tv_swin.PatchMergingV2,
)

RULES: dict[type, Rule] = {
    **{t: Rule(DESCEND) for t in _CONTAINERS},
    **{t: Rule(KEEP) for t in (torchvision.ops.StochasticDepth, tv_misc.Permute)},
    # blocks with a layer scale of their own
    tv_convnext.CNBlock: Rule(DESCEND, scales=("layer_scale",)),
    # vision transformers: containers that add constants (explained as constant_contribution)
    tv_vit.VisionTransformer: Rule(DESCEND, constants=("class_token",)),
    tv_vit.Encoder: Rule(DESCEND, constants=("pos_embedding",)),
    # shifted-window attention (its forward reads the weights functionally: rebuilt with modules)
    tv_swin.ShiftedWindowAttention: Rule(GATE, _shifted_window_attention, "attention matrix (relative position "
                                                                          "bias, shifted-window mask) a gate; v, "
                                                                          "proj B-cos"),
    tv_swin.ShiftedWindowAttentionV2: Rule(GATE, _shifted_window_attention, "cosine attention (continuous "
                                                                            "position bias) a gate; v, proj B-cos"),
    tv_convnext.LayerNorm2d: Rule(REPLACE, layernorm2d, "std detached in explanation mode"),
    # (squeeze-excitation has no rule: its forward is read, the gate branch kept and detached in explanation mode)
}
