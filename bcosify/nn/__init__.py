"""Alignment layers and helpers for B-cos networks."""

from .act import GatedActivation, gated, gelu_gate, gelu_tanh_gate, hardswish_gate, ratio_gate, relu6_gate
from .attention import GatePath, MeanPatchTokens, SelfAttention, SplitQKV
from .base import DetachableModule, set_explanation_mode
from .bcos import BcosConv2d, BcosLinear, bcos_scale, conv_patch_sq_norms
from .encoding import InputEncoder, LogitBias
from .gate import DetachedGate
from .norm import DetachableGroupNorm, DetachableLayerNorm, DetachableLayerNorm2d, UncenteredBatchNorm2d

__all__ = [
    "BcosConv2d", "BcosLinear", "DetachableGroupNorm", "DetachableLayerNorm", "DetachableLayerNorm2d",
    "DetachableModule", "DetachedGate", "GatePath", "GatedActivation", "MeanPatchTokens", "SelfAttention",
    "SplitQKV", "InputEncoder", "LogitBias", "UncenteredBatchNorm2d",
    "bcos_scale", "conv_patch_sq_norms", "gated", "gelu_gate", "gelu_tanh_gate", "hardswish_gate", "ratio_gate",
    "relu6_gate", "set_explanation_mode",
]
