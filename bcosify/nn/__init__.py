"""Layers of B-cos networks: alignment layers, normalization, gates, the input encoding and the heads."""

from .act import GatedActivation, gated, gelu_gate, gelu_tanh_gate, hardswish_gate, ratio_gate, relu6_gate
from .attention import (GateLinear, GatePath, LinearAttention, MultiScaleProjection, SelfAttention,
                        ShiftedWindowAttention, SplitQKV, SplitQKVConv)
from .base import DetachableModule, set_explanation_mode
from .condconv import BcosCondConv2d
from .conv1d import Conv1dAs2d
from .bcos import BcosConv2d, BcosLinear, bcos_scale, conv_patch_sq_norms
from .dau import DauConv2d, DauLinear
from .encoding import InputEncoder, check_images, fold_input_normalization, resolve_normalization
from .gate import DetachedGate, ExplanationDetach
from .head import ClassifierBeforePooling, LogitBias, MeanPatchTokens
from .norm import (DetachableGroupNorm, DetachableLayerNorm, DetachableLayerNorm2d, SyncUncenteredBatchNorm2d,
                   UncenteredBatchNorm1d, UncenteredBatchNorm2d, sync_batchnorm)

__all__ = [
    "BcosCondConv2d", "BcosConv2d", "BcosLinear", "ClassifierBeforePooling", "Conv1dAs2d", "DauConv2d", "DauLinear", "DetachableGroupNorm", "DetachableLayerNorm",
    "DetachableLayerNorm2d", "DetachableModule", "DetachedGate", "ExplanationDetach", "GateLinear", "GatePath",
    "GatedActivation", "InputEncoder", "LinearAttention", "LogitBias", "MeanPatchTokens", "MultiScaleProjection",
    "SelfAttention", "ShiftedWindowAttention", "SplitQKV", "SplitQKVConv", "SyncUncenteredBatchNorm2d",
    "UncenteredBatchNorm1d", "UncenteredBatchNorm2d",
    "bcos_scale", "check_images", "conv_patch_sq_norms", "fold_input_normalization", "gated", "gelu_gate",
    "gelu_tanh_gate", "hardswish_gate", "ratio_gate", "relu6_gate", "resolve_normalization",
    "set_explanation_mode", "sync_batchnorm",
]
