"""Read what a container does between its children from its ``torch.fx`` graph.

A container with no rule is traced with its children as leaves. Every operation between the children is
classified against the value path (what the input flows through to the output):

- linear in the value path (add, sub, cat, stack, reshapes, split/getitem, zero padding, roll, mean/sum,
  average pooling, interpolation, multiplication or division by a value-independent tensor),
- a selection (ReLU, max pooling, maximum),
- a functional activation ``f`` with ``f(0) = 0`` (``F.gelu``, ``F.silu``, ...): rewritten as ``x * g(x)`` with
  the gate ``g = f(x) / x`` detached in explanation mode,
- a gate: a factor computed through sigmoid/softmax/tanh/a norm from the input and multiplied with the value
  path (squeeze-excite, attention, GRN): detached in explanation mode; the children that only compute a gate
  stay as they are,
- constants (own parameters or buffers added to the value path) and scales (own parameters multiplying it),
- arguments handed to a child that uses them on its gate path only (a rotary embedding table: declared by the
  child's rule, or read from the child's own graph): what computes them (a child's buffers, tensors torch.fx
  captured while tracing) stays off the value path.
- the output of a child whose rule says it computes a constant from the input's shape alone (``Rule("constant")``:
  EdgeNeXt's Fourier positional encoding, called with ``(B, H, W)``) added to the value path; a child called with
  shape values only and no such rule stays refused (nothing says its output is a constant the explanation sees).

Anything else (a product of two value-path tensors, a nonlinear function of the value path, a constant number
added to it, a child's weight read functionally) blocks the conversion, named with its source line.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.experimental.meta_tracer import MetaTracer
import torch.nn.functional as F
from torch import nn

from ..nn import ExplanationDetach, GatedActivation, ratio_gate

VALUE, CONST, GATE = "value", "constant", "gate"

# --- what the operations are ---------------------------------------------------------------------

_LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, operator.iadd, operator.isub,
    torch.add, torch.sub, torch.subtract, torch.neg, torch.cat, torch.concat, torch.concatenate, torch.stack,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.squeeze,
    torch.unsqueeze, torch.split, torch.chunk, torch.unbind, torch.roll, torch.narrow, torch.flip, torch.mean,
    torch.sum, torch.t, torch.tile, torch.repeat_interleave, torch.clone,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.interpolate,
    F.pixel_shuffle, F.pixel_unshuffle, F.dropout, F.dropout1d, F.dropout2d, F.unfold, F.fold,
}
_LINEAR_METHODS = {
    "add", "add_", "sub", "sub_", "neg", "view", "view_as", "reshape", "reshape_as", "permute", "transpose",
    "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "split",
    "chunk", "unbind", "mean", "sum", "narrow", "roll", "flip", "to", "type_as", "float", "double", "half",
    "bfloat16", "clone", "movedim", "swapaxes", "__getitem__", "t", "unfold", "tile", "repeat_interleave",
}
#: functions of tensors that never carry a value (shapes, dtypes, devices)
_META_METHODS = {"size", "dim", "numel", "ndimension", "__len__", "get_device", "is_contiguous"}
#: methods that read only the shape, dtype or device of their second tensor (``y.expand_as(x)``)
_SHAPE_OF_ARGUMENT_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}
_META_FUNCTIONS = {getattr, len, torch.numel, isinstance, int, float, math.sqrt}
_SELECTIONS = {F.relu, torch.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
               F.adaptive_max_pool2d, torch.maximum, torch.amax, torch.max}
_SELECTION_METHODS = {"relu", "relu_", "amax", "maximum", "max"}
#: bilinear operations: linear in the value path when every other operand is a constant or a gate
_PRODUCTS = {operator.mul, operator.imul, torch.mul, torch.multiply, operator.matmul, torch.matmul, torch.bmm,
             torch.einsum, F.linear, F.conv1d, F.conv2d, F.conv3d}
#: products whose third argument is a bias added to the result
_WITH_BIAS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
_PRODUCT_METHODS = {"mul", "mul_", "matmul", "bmm"}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_DIVISION_METHODS = {"div", "div_"}
#: nonlinear functions whose output, multiplied with the value path, is a gate (detached in explanation mode)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax, torch.tanh, F.tanh,
                   torch.norm, torch.linalg.vector_norm, torch.std, torch.var, torch.rsqrt, torch.sqrt, torch.pow,
                   torch.exp}
_GATE_METHODS = {"sigmoid", "softmax", "tanh", "norm", "std", "var", "rsqrt", "sqrt", "pow", "exp"}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d, nn.Tanh)
#: elementwise activations with f(0) = 0: on the value path they become gated activations
_ACTIVATIONS = {F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish", F.mish: "mish", F.relu6: "relu6",
                F.leaky_relu: "leaky_relu", F.elu: "elu", F.selu: "selu", F.celu: "celu", torch.tanh: "tanh",
                F.tanh: "tanh", F.softsign: "softsign", F.hardtanh: "hardtanh",
                F.normalize: "normalize"}
_ACTIVATION_METHODS = {"tanh": "tanh"}


#: activation modules: on the value path they are converted by their rules; the one factor of a product of two
#: value-path tensors that is such an activation's output (a gated linear unit: GLU, GeGLU, SwiGLU, StarNet's
#: ``act(x1) * x2``) is that product's gate
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Tanh)


def _register_library_gates() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """timm's sigmoid-like activation modules and attention-weight modules (split attention's radix softmax,
    selective kernel attention) are gate sources too; its other activation modules are activations."""
    try:
        import timm.layers.activations as act
        import timm.layers.selective_kernel as sk
        import timm.layers.split_attn as split_attn
    except ImportError:  # pragma: no cover
        return (), ()
    gates = tuple(getattr(act, name) for name in ("Sigmoid", "HardSigmoid", "Tanh") if hasattr(act, name))
    gates += tuple(getattr(module, name) for module, name in ((split_attn, "RadixSoftmax"),
                                                              (sk, "SelectiveKernelAttn")) if hasattr(module, name))
    activations = tuple(getattr(act, name) for name in ("GELU", "GELUTanh", "QuickGELU", "Swish", "HardSwish", "Mish",
                                                        "Tanh") if hasattr(act, name))
    return gates, activations


_GATE_MODULES = _GATE_MODULES + _register_library_gates()[0]
_ACTIVATION_MODULES = _ACTIVATION_MODULES + _register_library_gates()[1]


@dataclass
class Reading:
    """What a container's forward does between its children.

    Attributes:
        blocking: one line per operation that has no exact B-cos form (``op at file:line: why``).
        constants, scales: own parameters (or buffers) added to / multiplying the value path.
        gate_children: names of children that only compute gates (kept as they are).
        graph: the traced graph (``None`` when tracing failed).
        rewrites: number of gate sources and functional activations to make detachable.
    """

    blocking: list[str] = field(default_factory=list)
    constants: set[str] = field(default_factory=set)
    scales: set[str] = field(default_factory=set)
    gate_children: set[str] = field(default_factory=set)
    value_children: set[str] = field(default_factory=set)
    #: children (``Rule("constant")``) called with shape values only, whose outputs are added as constants
    constant_children: set[str] = field(default_factory=set)
    graph: fx.Graph | None = None
    gate_nodes: list[fx.Node] = field(default_factory=list)
    gate_edges: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    #: forward arguments fixed to a value other than None while tracing (a rewrite would drop them; one fixed to None
    #: stays an argument that must be None)
    fixed_args: tuple[str, ...] = ()
    at_shapes: bool = False  # read at the argument shapes it was called with (a rewrite would fix them)
    activation_nodes: list[fx.Node] = field(default_factory=list)
    #: forward arguments that reach the output only through gates (a rotary embedding table handed on to the
    #: attention): a caller may compute them from buffers and captured tensors
    gate_args: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.blocking

    @property
    def rewrites(self) -> int:
        return len(self.gate_nodes) + len(self.gate_edges) + len(self.activation_nodes)

    def summary(self) -> str:
        parts = ["forward read from its graph" + (" at the input shapes it ran with (its control flow depends on "
                                                  "them; other shapes may take branches not read)"
                                                  if self.at_shapes else "")]
        if self.gate_nodes or self.gate_edges:
            parts.append(f"{len(self.gate_nodes) + len(self.gate_edges)} gate(s) detached")
        if self.activation_nodes:
            parts.append(f"{len(self.activation_nodes)} functional activation(s) gated")
        if self.gate_children:
            parts.append(f"gate path kept: {', '.join(sorted(self.gate_children))}")
        if self.constant_children:
            parts.append(f"constant added from: {', '.join(sorted(self.constant_children))}")
        return "; ".join(parts)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one container's own forward: every submodule call is a leaf."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_notrace_functions())
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class _ChildrenAsLeavesAtShapes(MetaTracer, _ChildrenAsLeaves):
    """The same trace, run alongside on example tensors of the shapes and dtypes the forward was called with: a
    forward whose control flow depends on them (padding to a window size, a dtype check) is read as it runs at
    those shapes."""

    _TORCH_METHODS_TO_PATCH: list[str] = []  # (tensors are real, not on the meta device)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "get_attr":  # the module's own tensor, as it is (the meta tracer moves it to the meta device)
            value = self.root
            for atom in str(target).split("."):
                value = getattr(value, atom)
            proxy.install_tensor_meta(value.detach() if isinstance(value, torch.Tensor) else None)
        return proxy


def _notrace_functions() -> tuple[Callable, ...]:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:  # pragma: no cover
        return ()
    return tuple(f for f in get_notrace_functions() if callable(f))


def _concrete_args(module: nn.Module, given: dict | None) -> dict[str, Any]:
    """Forward arguments after the first fixed while tracing: those the model's own forward pass gave as None
    (``given``: argument position or name -> given as None), and those it did not give that have a default."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    given = given or {}
    fixed = {}
    for i, p in enumerate(parameters):
        if i == 0 or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        as_none = given.get(i, given.get(p.name))
        if as_none:
            fixed[p.name] = None
        elif as_none is None and p.default is not inspect.Parameter.empty:
            fixed[p.name] = p.default
    return fixed


_TORCH_DIR = os.path.dirname(torch.__file__)


def _where(node: fx.Node) -> str:
    """``file:line`` of the source line that created ``node`` (the innermost frame outside torch)."""
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None) or ""
    for line in reversed(trace.strip().splitlines()):
        line = line.strip()
        if line.startswith("File ") and '"' in line:
            path = line.split('"')[1]
            if not path.startswith(_TORCH_DIR):
                number = line.split("line ")[1].split(",")[0] if "line " in line else "?"
                return f"{os.path.basename(path)}:{number}"
    return "unknown line"


def _name(node: fx.Node) -> str:
    """How the source names the operation: ``torch.cat``, ``F.gelu``, ``Tensor.view``, ``mul``..."""
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", None) or str(target)
    if getattr(F, name, None) is target:
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    return name


def _example_args(module: nn.Module, shapes: dict | None,
                  fixed: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Example tensors of the shapes and dtypes the forward was called with, and the plain values (sizes, flags) it
    was given, by argument name."""
    try:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        return {}, {}
    tensors, values = {}, {}
    device = next(iter(module.parameters()), torch.empty(0)).device
    for key, described in (shapes or {}).items():
        name = names[key] if isinstance(key, int) and key < len(names) else key
        if not isinstance(name, str) or name in fixed:
            continue
        if described[0] == "value":
            values[name] = described[1]
        else:
            _, shape, dtype = described
            example = torch.rand(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
            tensors[name] = example.to(device)
    return tensors, values


def read_forward(module: nn.Module, given: dict | None = None, shapes: dict | None = None,
                 gate_args_of: Callable[[nn.Module], set[str]] | None = None,
                 constant_types: tuple[type, ...] = ()) -> Reading:
    """Trace ``module``'s forward with its children as leaves and classify every operation between them.

    ``given``: the arguments the model's forward gave it (position or name -> given as None); those given as
    None or not given are fixed while tracing. ``shapes``: the shapes and dtypes of the tensors it was given
    (position or name -> (shape, dtype)): a forward whose control flow needs them is read at those shapes.
    ``gate_args_of``: the forward arguments a child uses on its gate path only (what feeds them stays off the
    value path, so buffers and captured tensors may compute them).
    ``constant_types``: module types whose rule says they compute a constant from the input's shape alone
    (``Rule("constant")``); such a child called with shape values only gives a constant its caller may add.
    """
    reading = Reading()
    fixed = _concrete_args(module, given)
    reading.fixed_args = tuple(name for name, value in fixed.items() if value is not None)
    try:
        graph = _ChildrenAsLeaves().trace(module, concrete_args=fixed or None)
    except Exception as error:  # noqa: BLE001 - any tracing failure means the forward cannot be read
        graph = None
        examples, values = _example_args(module, shapes, fixed)
        if examples:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with torch.no_grad():
                        graph = _ChildrenAsLeavesAtShapes().trace(module, examples,
                                                                  concrete_args={**fixed, **values} or None)
                reading.at_shapes = True
                reading.fixed_args += tuple(values)
            except Exception:  # noqa: BLE001 - the first error says more
                graph = None
        if graph is None:
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            reading.blocking.append(f"its forward cannot be traced by torch.fx ({type(error).__name__}: {detail})")
            return reading
    reading.graph = graph
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    children = dict(module.named_modules())
    walk = _Walk(own, children, set(_example_args(module, shapes, {})[1]), gate_args_of, constant_types)
    for node in graph.nodes:
        walk.visit(node)
    on_value_path = walk.value_path(graph)
    for node in graph.nodes:  # a result nothing reads acts by a side effect (list.append, an in-place op)
        if node.op in ("call_function", "call_method", "call_module") and not node.users and \
                walk.kind(node) != CONST and getattr(node.target, "__name__", "") not in _ASSERTIONS and \
                not _pure(node):
            reading.blocking.append(f"{_name(node)} at {_where(node)}: its result is not used, so it acts by a "
                                    "side effect (a list filled in place, an in-place operation) the graph cannot "
                                    "follow")
    for node, checks in walk.pending.items():
        if node in on_value_path:
            for check, payload in checks:
                if check == "block":
                    reading.blocking.append(f"{_name(node)} at {_where(node)}: {payload}")
                elif check == "constant":
                    reading.constants |= payload - walk.constant_children
                    reading.constant_children |= payload & walk.constant_children
                elif check == "scale":
                    if payload & walk.constant_children:  # explained as an added constant, so it must be added
                        reading.blocking.append(f"{_name(node)} at {_where(node)}: multiplies the value path by the "
                                                f"output of {', '.join(sorted(payload & walk.constant_children))}, "
                                                "a constant module whose output is explained as added")
                    reading.scales |= payload - walk.constant_children
                elif check == "activation":
                    reading.activation_nodes.append(node)
    reading.gate_nodes = [n for n in walk.gate_sources if n in on_value_path]
    reading.gate_edges = [(a, b) for a, b in walk.gate_edges if b in on_value_path]
    for node in graph.nodes:
        if node.op == "call_module":
            top = str(node.target).split(".")[0]
            if node in on_value_path and node not in walk.gate_sources:
                reading.value_children.add(top)
            else:
                reading.gate_children.add(top)
    reading.gate_children -= reading.value_children
    if reading.ok:  # (a forward that is not dynamic linear, or a gate as a whole, has no gate-only arguments)
        reading.gate_args = {str(n.target) for n in graph.nodes if n.op == "placeholder" and n not in on_value_path}
    if reading.ok and reading.rewrites and reading.at_shapes:
        reading.blocking.append("its gates need a rewritten forward, but its control flow depends on the input "
                                "shape, so the rewrite would only hold for the shape it was read at")
    if reading.ok and reading.rewrites and reading.fixed_args:
        reading.blocking.append(f"its gates need a rewritten forward, which cannot keep the optional arguments "
                                f"{', '.join(reading.fixed_args)} it was traced without")
    return reading


class _Walk:
    """Forward pass over a graph: the kind of every node (value, constant, gate), the gate sources, and the
    checks to apply to the nodes that turn out to be on the value path."""

    def __init__(self, own: dict[str, torch.Tensor], children: dict[str, nn.Module],
                 plain_args: set[str] = frozenset(),
                 gate_args_of: Callable[[nn.Module], set[str]] | None = None,
                 constant_types: tuple[type, ...] = ()) -> None:
        self.own, self.children, self.plain_args = own, children, plain_args
        self.gate_args_of = gate_args_of
        self.gate_arg_edges: set[tuple[fx.Node, fx.Node]] = set()  # (argument, child call): a gate-only argument
        self.shape_edges: set[tuple[fx.Node, fx.Node]] = set()  # (argument, call): its shape or dtype only is read
        self.constant_types = constant_types
        #: children with a constant rule called with shape values only: their names stand in ``sources`` for the
        #: constants they compute (a child's name is never an own tensor's name)
        self.constant_children: set[str] = set()
        self.kinds: dict[fx.Node, str] = {}
        self.sources: dict[fx.Node, set[str]] = {}  # own tensors each constant derives from
        self.gate_sources: list[fx.Node] = []
        self.gate_edges: list[tuple[fx.Node, fx.Node]] = []  # (producer, consumer): detach this use only
        self.pending: dict[fx.Node, list[tuple[str, Any]]] = {}

    def kind(self, arg: Any) -> str:
        return self.kinds.get(arg, CONST) if isinstance(arg, fx.Node) else CONST

    def check(self, node: fx.Node, what: str, payload: Any) -> None:
        self.pending.setdefault(node, []).append((what, payload))

    def value_path(self, graph: fx.Graph) -> set[fx.Node]:
        """Nodes the output depends on without passing through a gate source (gate sources included)."""
        seen: set[fx.Node] = set()
        stack = [n for n in graph.nodes if n.op == "output"]
        sources = set(self.gate_sources)
        cut = set(self.gate_edges) | self.gate_arg_edges | self.shape_edges
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node not in sources:
                stack.extend(a for a in node.all_input_nodes if (a, node) not in cut)
        return seen

    def visit(self, node: fx.Node) -> None:
        inputs = node.all_input_nodes
        if node.op == "call_method" and node.target in _SHAPE_OF_ARGUMENT_METHODS and node.args:
            # ``y.expand_as(x)`` is as much a gate (or a constant) as ``y``: ``x`` lends its shape only
            shaped = [a for a in inputs if a is not node.args[0]]
            self.shape_edges.update((a, node) for a in shaped)
            inputs = [a for a in inputs if a not in shaped]
        kinds = [self.kind(a) for a in _flat_args(node) if a in inputs]
        if node.op == "placeholder":  # an input tensor; a size or flag the caller passes is a constant
            self.kinds[node] = CONST if str(node.target) in self.plain_args else VALUE
        elif node.op == "get_attr":
            self.kinds[node] = CONST
            self.sources[node] = {str(node.target)}
            if str(node.target).startswith("_tensor_constant") and str(node.target) not in self.own:
                self.sources[node] = set()  # a tensor torch.fx captured while tracing: computed from no parameter
                self.check(node, "block", f"reads the tensor {node.target}, captured while tracing (computed from "
                                          "no parameter), on the value path")
            elif str(node.target) not in self.own:
                self.check(node, "block", f"reads the tensor {node.target} of a child directly (a layer used "
                                          "functionally)")
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            out_kinds = {self.kind(a) for a in outs}
            self.kinds[node] = VALUE if VALUE in out_kinds else (GATE if GATE in out_kinds else CONST)
            if self.kinds[node] != VALUE:
                self.check(node, "block", "the output does not depend linearly on the input")
        elif VALUE not in kinds and GATE not in kinds:
            self.kinds[node] = CONST  # computed from constants and shapes only
            self.sources[node] = set().union(*(self.sources.get(a, set()) for a in inputs)) if inputs else set()
            if node.op == "call_module" and self.constant_types and \
                    isinstance(self.children.get(str(node.target)), self.constant_types):
                # a child that computes a constant from shapes (its rule says so): explained per sample
                self.sources[node] = self.sources[node] | {str(node.target)}
                self.constant_children.add(str(node.target))
        elif node.op == "call_module":
            gate_only = self._gate_arguments(node)
            kinds = [self.kind(a) for a in _flat_args(node) if a not in gate_only]
            if isinstance(self.children.get(str(node.target)), _GATE_MODULES) and VALUE in kinds:
                self.kinds[node] = GATE
                self.gate_sources.append(node)
            else:
                self.kinds[node] = VALUE if VALUE in kinds else GATE
                for a in inputs:  # a parameter handed to a child next to the value path enters it there
                    if a not in gate_only and self.kind(a) == CONST and self.sources.get(a):
                        self.check(node, "constant", self.sources[a])
        else:
            self.kinds[node] = self._call(node, inputs, kinds)

    def _gate_arguments(self, node: fx.Node) -> set[fx.Node]:
        """The nodes handed to a child call as arguments the child uses on its gate path only (cut from the value
        path)."""
        child = self.children.get(str(node.target))
        handed_nodes = _flat_args(node)
        if child is None or self.gate_args_of is None or len(set(handed_nodes)) < 2 or \
                isinstance(child, _GATE_MODULES):
            return set()  # (a child handed one tensor uses it on its value path, or is a gate as a whole)
        names = self.gate_args_of(child)
        if not names:
            return set()
        try:
            params = [p.name for p in inspect.signature(child.forward).parameters.values()]
        except (TypeError, ValueError):
            params = []
        handed = [(params[i] if i < len(params) else None, a) for i, a in enumerate(node.args)]
        handed += list(node.kwargs.items())
        out = {a for name, a in handed if name in names and isinstance(a, fx.Node)}
        out -= {a for name, a in handed if name not in names and isinstance(a, fx.Node)}  # handed on as a value too
        for arg in out:
            self.gate_arg_edges.add((arg, node))
        return out

    def _call(self, node: fx.Node, inputs: list[fx.Node], kinds: list[str]) -> str:
        """The kind of a function or method call that involves the value path or a gate."""
        target, method = node.target, node.op == "call_method"

        def any_of(functions, methods) -> bool:
            return (method and target in methods) or (not method and target in functions)

        if any_of(_META_FUNCTIONS, _META_METHODS):
            return CONST
        if VALUE not in kinds:
            return GATE  # a function of gates (and constants) is still a gate
        if any_of(_ACTIVATIONS, _ACTIVATION_METHODS):
            if [self.kind(a) for a in node.args[:1]] != [VALUE] or kinds.count(VALUE) != 1:
                self.check(node, "block", "an activation of several value-path tensors")
            self.check(node, "activation", None)
            return VALUE
        if any_of(_GATE_FUNCTIONS, _GATE_METHODS):
            self.gate_sources.append(node)
            return GATE
        if target is F.scaled_dot_product_attention:
            # softmax(q k^T + mask) v: v is the value path; everything else (q, k, and a mask or scale computed
            # from the input, as SAM ViT's relative position bias read from q) only shapes the attention matrix,
            # a gate, and is detached at this use
            v = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            for gate_input in dict.fromkeys(_flat_args(node)):
                if gate_input is not v and self.kind(gate_input) == VALUE:
                    self.gate_edges.append((gate_input, node))
            if _flat_args(node).count(v) > 1:  # the same tensor as gate and values: no one use to detach
                self.check(node, "block", "attention whose values are also its queries, keys or mask")
            if self.kind(v) != VALUE:
                self.check(node, "block", "attention whose values are not on the value path")
            return VALUE
        if any_of(_LINEAR_FUNCTIONS, _LINEAR_METHODS) or (not method and _is_linear_helper(target)):
            self._additive(node, inputs)
            return VALUE
        if any_of(_SELECTIONS, _SELECTION_METHODS):
            if GATE in kinds:
                self.check(node, "block", "a selection between the value path and a gate")
            return VALUE
        if any_of(_PRODUCTS, _PRODUCT_METHODS):
            if kinds.count(VALUE) > 1:
                self._gate_a_factor(node)
                kinds = [self.kind(a) for a in _flat_args(node)]
            if kinds.count(VALUE) > 1:
                self.check(node, "block", "a product of two value-path tensors (no gate between them)")
            bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
            if not method and target in _WITH_BIAS and bias is not None:
                self.check(node, "block", "adds a bias to the value path, a constant no pixel accounts for")
            for a in inputs:
                if self.kind(a) == CONST:
                    self.check(node, "scale", self.sources.get(a, set()))
            return VALUE
        if any_of(_DIVISIONS, _DIVISION_METHODS):
            divisor = node.args[1] if len(node.args) > 1 else None
            if self.kind(divisor) == VALUE:
                self.check(node, "block", "a division by the value path")
            elif isinstance(divisor, fx.Node) and self.kind(divisor) == CONST:
                self.check(node, "scale", self.sources.get(divisor, set()))
            return VALUE
        if target is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode == "constant" and value not in (0, 0.0, None):
                self.check(node, "block", f"pads the value path with {value}, a constant no pixel accounts for")
            return VALUE
        self.check(node, "block", "an operation bcosify has no exact form for on the value path")
        return VALUE

    def _gate_a_factor(self, node: fx.Node) -> None:
        """In a product of value-path tensors, make one factor that is an activation's output, used only there, the
        gate (a gated linear unit)."""
        for factor in _flat_args(node):
            if self.kind(factor) != VALUE or len(factor.users) != 1:
                continue
            is_activation = (factor.op == "call_module" and
                             isinstance(self.children.get(str(factor.target)), _ACTIVATION_MODULES)) or \
                            ("activation", None) in self.pending.get(factor, [])
            if is_activation:
                self.pending[factor] = [c for c in self.pending.get(factor, []) if c[0] != "activation"]
                self.kinds[factor] = GATE
                self.gate_sources.append(factor)
                return

    def _additive(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        """Constants added to the value path are declared; gates and plain numbers added to it are refused."""
        additive = (node.target in _ADDITIVE_FUNCTIONS) or (node.op == "call_method" and
                                                            node.target in _ADDITIVE_METHODS)
        if not additive:
            return
        for a in inputs:
            if self.kind(a) == GATE:
                self.check(node, "block", "adds a gate (a nonlinear function of the input) to the value path")
            elif self.kind(a) == CONST:
                names = self.sources.get(a, set())
                if names:
                    self.check(node, "constant", names)
                else:
                    self.check(node, "block", "adds a tensor computed from no parameter to the value path")
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0]
        if numbers and node.target not in _JOINS:
            self.check(node, "block", f"adds the number {numbers[0]} to the value path, a constant no pixel "
                                      "accounts for")


def _pure(node: fx.Node) -> bool:
    """Whether ``node`` is an operation without side effects (an unused one is dead code, not a side effect)."""
    if node.op == "call_method":
        return node.target in (_LINEAR_METHODS | _META_METHODS) and not str(node.target).endswith("_")
    return node.op == "call_function" and node.target in (_LINEAR_FUNCTIONS | _META_FUNCTIONS) and \
        node.target not in (operator.iadd, operator.isub)


#: checks with no result (torch's and the ones torch.fx inserts for arguments fixed while tracing)
_ASSERTIONS = {"_assert", "_assert_is_none"}
_JOINS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_ADDITIVE_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
                       torch.subtract} | _JOINS
_ADDITIVE_METHODS = {"add", "add_", "sub", "sub_"}


#: helpers libraries register as untraceable (timm's autowrapped functions) that only move values around
_LINEAR_HELPERS = {"window_partition", "window_reverse", "window_partition_nchw", "window_reverse_nchw",
                   "grid_partition", "grid_reverse", "grid_partition_nchw", "grid_reverse_nchw", "blockify",
                   "deblockify", "reshape_pre_pool", "reshape_post_pool", "scale_image"}


def _is_linear_helper(target: Any) -> bool:
    return getattr(target, "__name__", None) in _LINEAR_HELPERS and \
        (getattr(target, "__module__", "") or "").startswith("timm.")


def _flat_args(node: fx.Node) -> list[fx.Node]:
    """Every node among ``node``'s arguments, repeats included (``y * y`` has two)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


# --- rewriting: make gates and functional activations detachable -----------------------------------


class _Functional(nn.Module):
    """``fn(x, *args, **kwargs)`` as a module (for a functional activation read from a graph)."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, name: str) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs, self.name = fn, args, kwargs, name

    def forward(self, x):
        if isinstance(self.fn, str):
            return getattr(x, self.fn)(*self.args, **self.kwargs)
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return self.name


def _normalize_gate(args: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.normalize(x, ...)`` is ``x * g(x)`` with ``g = 1 / max(||x||_p, eps)`` along ``dim`` (one factor per
    vector, zeros included): the gate of its gated form."""
    bound = inspect.signature(F.normalize).bind(None, *args, **kwargs).arguments
    p, dim, eps = bound.get("p", 2.0), bound.get("dim", 1), bound.get("eps", 1e-12)
    return lambda x: 1 / x.norm(p, dim, keepdim=True).clamp_min(eps)


def _keep_argument_names(module: nn.Module, graph: fx.Graph) -> None:
    """Give the graph's inputs the names of the forward's arguments (tracing renames one that clashes with a name
    in the forward), so that the rewritten forward takes the same keyword arguments."""
    try:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(names):
        for node, name in zip(placeholders, names):
            node.target = name


def rewrite(module: nn.Module, reading: Reading) -> nn.Module:
    """``module`` with its gates detached and its functional activations gated in explanation mode: an
    ``fx.GraphModule`` that keeps every child, parameter and buffer under its own name."""
    if not reading.rewrites:
        return module
    graph = reading.graph
    _keep_argument_names(module, graph)
    new_modules: dict[str, nn.Module] = {}
    for i, node in enumerate(reading.gate_nodes):
        name = f"bcos_gate_{i}"
        new_modules[name] = ExplanationDetach()
        with graph.inserting_after(node):
            detached = graph.call_module(name, (node,))
        node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
    for j, (producer, consumer) in enumerate(reading.gate_edges):
        name = f"bcos_gate_{len(reading.gate_nodes) + j}"
        new_modules[name] = ExplanationDetach()
        with graph.inserting_before(consumer):
            detached = graph.call_module(name, (producer,))
        consumer.replace_input_with(producer, detached)
    for i, node in enumerate(reading.activation_nodes):
        name = f"bcos_act_{i}"
        fn = node.target
        label = _ACTIVATIONS.get(fn) or _ACTIVATION_METHODS.get(fn, str(fn))
        if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            raise ValueError(f"{_name(node)} at {_where(node)}: activation arguments computed in the forward")
        act = _Functional(fn, tuple(node.args[1:]), dict(node.kwargs), label)
        gate = _normalize_gate(node.args[1:], node.kwargs) if fn is F.normalize else ratio_gate(act)
        new_modules[name] = GatedActivation(act, gate, label)
        with graph.inserting_after(node):
            gated = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(gated)
        graph.erase_node(node)
    for name, new in new_modules.items():
        module.add_module(name, new)
    rebuilt = fx.GraphModule(module, graph, class_name=f"{type(module).__name__}Read")
    # the original children, parameters and buffers, all of them under their own names (fx copies only what
    # the graph uses, and dotted targets as bare containers)
    for name, child in module.named_children():
        rebuilt.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        rebuilt.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        rebuilt.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    for name, value in vars(module).items():  # plain attributes other code may read (num_heads, q_stride, ...)
        if not name.startswith("_") and name not in vars(rebuilt):
            setattr(rebuilt, name, value)
    rebuilt.train(module.training)
    return rebuilt
