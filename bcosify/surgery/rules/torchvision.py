"""Rules for torchvision's models (imported only when torchvision is installed)."""

from __future__ import annotations

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

from .base import DESCEND, GATE, KEEP, REFUSE, REPLACE, Rule
from .core import layernorm2d, se_gate


def _se_gate(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return se._scale(x)


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
)

RULES: dict[type, Rule] = {
    **{t: Rule(DESCEND) for t in _CONTAINERS},
    **{t: Rule(KEEP) for t in (torchvision.ops.StochasticDepth, tv_misc.Permute)},
    # blocks with a layer scale of their own
    tv_convnext.CNBlock: Rule(DESCEND, scales=("layer_scale",)),
    # vision transformers: containers that add constants (explained as constant_contribution)
    tv_vit.VisionTransformer: Rule(DESCEND, constants=("class_token",)),
    tv_vit.Encoder: Rule(DESCEND, constants=("pos_embedding",)),
    # known, and refused: their forwards read weights functionally
    tv_swin.ShiftedWindowAttention: Rule(REFUSE, note="reads qkv/proj weights functionally (use timm's Swin)"),
    tv_swin.ShiftedWindowAttentionV2: Rule(REFUSE, note="reads qkv/proj weights functionally (use timm's Swin)"),
    tv_convnext.LayerNorm2d: Rule(REPLACE, layernorm2d, "std detached in explanation mode"),
    # squeeze-excite: the gate branch stays as it is and is detached in explanation mode
    tv_misc.SqueezeExcitation: Rule(GATE, se_gate(_se_gate)),
}
