"""Rules for ``torch.nn`` modules, and the builders every library's rules share."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ...errors import ConversionError
from ...nn import (BcosConv2d, BcosLinear, Conv1dAs2d, DauConv2d, DauLinear, DetachableGroupNorm, DetachableLayerNorm,
                   DetachableLayerNorm2d, ExplanationDetach, GatedActivation, GatePath, SelfAttention, SplitQKV,
                   UncenteredBatchNorm1d, UncenteredBatchNorm2d, gated, gelu_gate, gelu_tanh_gate, hardswish_gate,
                   relu6_gate)
from ...nn.head import ClassifierBeforePooling, MeanPatchTokens
from ..report import GATED, REPLACED
from .base import DESCEND, KEEP, REFUSE, REPLACE, Builder, Context, Rule

#: exact types of linear layers (the classifier, a ``qkv`` projection) and of first layers that can take the
#: folded input normalization; other libraries' rule modules add theirs
LINEAR_TYPES: set[type] = {nn.Linear}
FIRST_LAYER_TYPES: set[type] = {nn.Conv2d}
#: convolutions that compute a plain convolution with a weight derived from their parameters alone (weight
#: standardisation): type -> the equivalent plain convolution, built at conversion
PLAIN_CONVS: dict[type, Callable[[nn.Module], nn.Conv2d]] = {}
#: models that map their (normalized) input by a fixed per-channel affine map ``x * scale + shift`` before their
#: first layers while a flag is on (torchvision GoogLeNet/Inception v3 ``transform_input``): type -> (flag
#: attribute, scale, shift); conversion folds the map into the input normalization and switches the flag off
INPUT_TRANSFORMS: dict[type, tuple[str, tuple[float, ...], tuple[float, ...]]] = {}


# --- builders ---------------------------------------------------------------------------------------

def _seed(ctx: Context) -> int:
    """A seed for a DAU layer's random projection, fixed by its path: a conversion is reproducible."""
    return zlib.crc32(ctx.path.encode())


def bcos_conv(conv: nn.Conv2d, ctx: Context, same_padding: bool = False) -> BcosConv2d | DauConv2d:
    """The alignment convolution of the config's ``unit`` (B-cos or DAU) with the weights of ``conv``."""
    config = ctx.config
    try:
        if config.unit == "dau":
            return DauConv2d.from_module(conv, config.rank_at(ctx.path), config.squash, keep_bias=config.keep_bias,
                                         same_padding=same_padding, seed=_seed(ctx))
        return BcosConv2d.from_module(conv, config.b, config.normalize_weights, keep_bias=config.keep_bias,
                                      same_padding=same_padding)
    except ValueError as e:
        raise ConversionError(f"{ctx.path} ({type(conv).__name__}): {e}") from None


def conv1d(conv: nn.Conv1d, ctx: Context) -> Conv1dAs2d:
    """A 1-d convolution as the alignment convolution of its ``1 x k`` 2-d form."""
    try:
        as_2d = Conv1dAs2d.conv2d_of(conv)
    except ValueError as e:
        raise ConversionError(f"{ctx.path} ({type(conv).__name__}): {e}") from None
    return Conv1dAs2d(bcos_conv(as_2d, ctx))


def bcos_conv_same(conv: nn.Conv2d, ctx: Context) -> BcosConv2d | DauConv2d:
    return bcos_conv(conv, ctx, same_padding=True)


def bcos_linear(linear: nn.Linear, ctx: Context) -> BcosLinear | DauLinear:
    """The alignment linear layer of the config's ``unit`` (B-cos or DAU) with the weights of ``linear``."""
    config = ctx.config
    if config.unit == "dau":
        try:
            rank = config.rank_at(ctx.path)
        except ValueError as e:
            raise ConversionError(f"{ctx.path} ({type(linear).__name__}): {e}") from None
        return DauLinear.from_module(linear, rank, config.squash, keep_bias=config.keep_bias, seed=_seed(ctx))
    return BcosLinear.from_module(linear, config.b, config.normalize_weights, keep_bias=config.keep_bias)


def batchnorm(bn: nn.BatchNorm2d, ctx: Context) -> UncenteredBatchNorm2d:
    return UncenteredBatchNorm2d.from_module(bn, keep_bias=ctx.config.keep_bias)


def batchnorm1d(bn: nn.BatchNorm1d, ctx: Context) -> UncenteredBatchNorm1d:
    return UncenteredBatchNorm1d.from_module(bn, keep_bias=ctx.config.keep_bias)


def norm_act(norm_type: type) -> Builder:
    """timm's ``*NormAct`` layers: the converted norm, then the layer's own dropout and activation, converted."""

    def build(norm: nn.Module, ctx: Context) -> nn.Sequential:
        parts = OrderedDict(norm=norm_type.from_module(norm, keep_bias=ctx.config.keep_bias))
        convert_child = ctx.convert_child  # (nested conversions move ctx on)
        for name in ("drop", "act"):
            if hasattr(norm, name):
                parts[name] = convert_child(getattr(norm, name), name)
        return nn.Sequential(parts)

    return build


def layernorm(ln: nn.LayerNorm, ctx: Context) -> DetachableLayerNorm:
    return DetachableLayerNorm.from_module(ln, keep_bias=ctx.config.keep_bias)


def layernorm2d(ln: nn.LayerNorm, ctx: Context) -> DetachableLayerNorm2d:
    return DetachableLayerNorm2d.from_module(ln, keep_bias=ctx.config.keep_bias)


def groupnorm(gn: nn.GroupNorm, ctx: Context) -> DetachableGroupNorm:
    return DetachableGroupNorm.from_module(gn, keep_bias=ctx.config.keep_bias)


def unbiased(layer: nn.Module, ctx: Context) -> nn.Module:
    """A linear layer with no B-cos form (a transposed convolution) kept linear; its bias removed unless biases are
    kept."""
    if ctx.config.keep_bias or layer.bias is None:
        return layer
    layer.bias = None
    return layer


def maxpool(pool: nn.MaxPool2d, ctx: Context) -> nn.Module:
    if not ctx.config.maxpool_to_avgpool:
        return pool
    if pool.dilation not in (1, (1, 1)) or pool.return_indices:
        raise ConversionError(f"{ctx.path}: a dilated or index-returning MaxPool2d cannot become AvgPool2d")
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)


def gate(gate, name: str) -> Builder:
    return lambda act, ctx: gated(act, gate, name)


def ratio_gate(act: nn.Module, ctx: Context) -> nn.Module:
    return gated(act)


def gelu(act: nn.GELU, ctx: Context) -> nn.Module:
    if act.approximate == "tanh":
        return gated(act, gelu_tanh_gate, "gelu_tanh")
    return gated(act, gelu_gate, "gelu")


#: children of an attention module on the value path (converted); every other child is on the gate path
_ATTENTION_VALUE_CHILDREN = ("proj", "norm", "attn_drop", "proj_drop")


def route_children(module: nn.Module, ctx: Context, *, value: Iterable[str] = (),
                   gate: Mapping[str, str] | None = None,
                   build: Mapping[str, Callable[[nn.Module, str], nn.Module]] | None = None,
                   other_gate_note: str | None = None) -> nn.Module:
    """Replace ``module``'s children in place, by name: ``build[name](child, path)`` makes (and reports) one
    child's replacement; the ``value`` children are converted; the ``gate`` ones (name -> report note) are kept
    on the gate path in a :class:`GatePath` (detached in explanation mode). Every other child is kept on the gate
    path too when ``other_gate_note`` is given, else refused by name. Returns ``module``."""
    base, convert_child = ctx.path, ctx.convert_child  # (nested conversions move ctx on)
    gate, build = gate or {}, build or {}
    for name, child in list(module.named_children()):
        path = f"{base}.{name}"
        if name in build:
            new = build[name](child, path)
        elif name in value:
            new = convert_child(child, name)
        elif name in gate or other_gate_note is not None:
            new = GatePath(child)
            ctx.report.add(path, child, GATED, new, gate.get(name, other_gate_note))
        else:
            raise ConversionError(f"{path} ({type(child).__name__}): a child of {type(module).__name__} this rule "
                                  "does not know")
        setattr(module, name, new)
    return module


def split_qkv(ctx: Context, parts: int = 3) -> Callable[[nn.Module, str], nn.Module]:
    """A :func:`route_children` builder for a fused ``qkv`` (``parts=2``: ``kv``) linear: q, k a gate, v B-cos."""
    kind = "qkv" if parts == 3 else "kv"

    def build(child: nn.Module, path: str) -> nn.Module:
        if type(child) not in LINEAR_TYPES:
            raise ConversionError(f"{path}: expected a Linear {kind} projection, got {type(child).__name__}")
        try:
            new = SplitQKV.from_weights(child.weight.detach(), None if child.bias is None else child.bias.detach(),
                                        lambda v: bcos_linear(v, ctx), parts=parts)
        except ValueError as e:
            raise ConversionError(f"{path} ({type(child).__name__}): {e}") from None
        ctx.report.add(path, child, REPLACED, new, ("q, k" if parts == 3 else "k") + " kept (gate, detached in "
                                                                                     "explanation mode); v B-cos")
        return new

    return build


def attention(attn: nn.Module, ctx: Context,
              value_children: tuple[str, ...] = _ATTENTION_VALUE_CHILDREN) -> nn.Module:
    """timm ``Attention`` / Swin ``WindowAttention``: ``qkv`` split (q, k a gate; v B-cos), ``proj`` (every one
    of ``value_children``) converted, every other child (q/k norms, softmax, output gate) kept on the gate path."""
    return route_children(attn, ctx, value=value_children, build={"qkv": split_qkv(ctx)},
                          other_gate_note="gate path (attention logits or output gate), kept")


def multihead_attention(mha: nn.MultiheadAttention, ctx: Context) -> SelfAttention:
    """``nn.MultiheadAttention`` (self-attention) as :class:`SelfAttention` with a split ``qkv``."""
    base = ctx.path
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ConversionError(f"{base} (MultiheadAttention): only self-attention with one in_proj, no bias_k/bias_v "
                              "and no add_zero_attn can be converted")
    qkv = SplitQKV.from_weights(mha.in_proj_weight, mha.in_proj_bias, lambda v: bcos_linear(v, ctx))
    proj = ctx.convert_child(mha.out_proj, "out_proj")
    return SelfAttention(qkv, proj, mha.num_heads, mha.batch_first, mha.dropout)


# --- the table --------------------------------------------------------------------------------------

RULES: dict[type, Rule] = {
    **{t: Rule(DESCEND) for t in (nn.Sequential, nn.ModuleList, nn.ModuleDict, ClassifierBeforePooling)},
    **{t: Rule(KEEP) for t in (nn.Identity, nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.AdaptiveAvgPool2d,
                               nn.AvgPool2d, nn.AdaptiveMaxPool2d, MeanPatchTokens)},
    nn.MaxPool2d: Rule(REPLACE, maxpool, "dynamic linear (selects an input)"),
    # what reading a forward's graph inserts
    GatedActivation: Rule(KEEP, note="functional activation as a gate (read from the graph)"),
    ExplanationDetach: Rule(KEEP, note="gate, detached in explanation mode (read from the graph)"),
    # convolutions and linear layers on the value path
    nn.Conv2d: Rule(REPLACE, bcos_conv),
    nn.Conv1d: Rule(REPLACE, conv1d, "as a 1 x k 2-d alignment convolution"),
    nn.Linear: Rule(REPLACE, bcos_linear),
    nn.modules.linear.NonDynamicallyQuantizableLinear: Rule(REPLACE, bcos_linear),
    nn.ConvTranspose2d: Rule(REPLACE, unbiased, "kept linear (no B-cos form), bias removed"),
    # attention: the attention matrix is a gate (q, k detached in explanation mode), v and proj B-cos
    nn.MultiheadAttention: Rule(REPLACE, multihead_attention, "self-attention; attention matrix a gate"),
    # normalization
    nn.BatchNorm2d: Rule(REPLACE, batchnorm, "uncentred, bias-free"),
    nn.BatchNorm1d: Rule(REPLACE, batchnorm1d, "uncentred, bias-free"),
    nn.LayerNorm: Rule(REPLACE, layernorm, "std detached in explanation mode"),
    nn.GroupNorm: Rule(REPLACE, groupnorm, "std detached in explanation mode"),
    # activations as gates
    nn.ReLU6: Rule(REPLACE, gate(relu6_gate, "relu6")),
    nn.GELU: Rule(REPLACE, gelu),
    nn.SiLU: Rule(REPLACE, gate(torch.sigmoid, "silu")),
    nn.Hardswish: Rule(REPLACE, gate(hardswish_gate, "hardswish")),
    nn.Tanh: Rule(REPLACE, ratio_gate),
    nn.LeakyReLU: Rule(REPLACE, ratio_gate),
    nn.Mish: Rule(REPLACE, ratio_gate),
    # known, and refused
    **{t: Rule(REFUSE, note="a recurrent layer: its fused forward computes the sigmoid gates and tanh state updates "
                            "from its weights in one kernel, biases inside; bcosify has no rewrite of it into gates "
                            "and alignment layers")
       for t in (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)},
}
