"""The surgery engine: replace, in place, every module of a traced model through the rule table."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from ..config import BcosConfig
from ..errors import ConversionError
from .graph import read_forward, rewrite
from .report import CONSTANT, GATED, KEPT, LEFT, READ, REFUSED, REPLACED, UNUSED, ConversionReport
from .rules import CONSTANT_OUTPUT, DESCEND, GATE, KEEP, REFUSE, RULES, Context, Rule
from .trace import Trace


def replace_classifier(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the classifier at ``path`` for a freshly initialised one with ``num_classes`` outputs."""
    old = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    model.set_submodule(path, new)


def _check_own_parameters(module: nn.Module, path: str, rule: Rule, report: ConversionReport, strict: bool) -> None:
    """Report a container's declared constants; refuse its own parameters of unknown use."""
    for name, param in module.named_parameters(recurse=False):
        param_path = f"{path}.{name}" if path else name
        if name in rule.scales:
            continue
        if name in rule.constants:
            if param.dim() < 2 or param.shape[0] != 1:  # (1,) or (C,): a bias, with no batch dimension to explain
                report.add(param_path, param, REFUSED if strict else LEFT,
                           note=f"added to the value path with shape {tuple(param.shape)}: a bias no pixel accounts "
                                "for (a constant needs a leading batch dimension of 1, e.g. (1, tokens, dim))")
                continue
            report.add(param_path, param, CONSTANT, note="added constant, explained as constant_contribution")
        else:
            report.add(param_path, param, REFUSED if strict else LEFT,
                       note="a parameter the container's forward uses in an unknown way")


def convert_modules(model: nn.Module, config: BcosConfig, trace_info: Trace,
                    rules: Mapping[type, Rule] | None = None) -> tuple[nn.Module, ConversionReport]:
    """Replace every module of ``model`` through the rule table (``rules`` extend or override it for this call);
    a container no rule knows is converted when its forward, read from its graph, is exact glue. Returns the
    converted model (``model`` itself unless its own forward had to be rewritten) and the report.

    Raises ``ConversionError`` naming every refused module (and the operation that blocks it) when
    ``config.strict``.
    """
    table = {**RULES, **(rules or {})}
    constant_types = tuple(t for t, r in table.items() if r.action == CONSTANT_OUTPUT)
    report = ConversionReport()
    originals = list(model.modules())  # alive for the whole walk: the ids in trace_info and done stay theirs
    ctx = Context(config=config, report=report, rules=table)
    # module -> its replacement, keyed by id: the original is kept alive in the value, so that its id cannot be
    # reused by a module created later in the walk (a freed replaced module's id often is)
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def used(module: nn.Module) -> bool:
        return any(id(m) in trace_info.executed for m in module.modules())

    gate_args_cache: dict[int, set[str]] = {}

    def gate_args_of(module: nn.Module) -> set[str]:
        """The forward arguments ``module`` uses on its gate path only: its rule's, or read from its graph."""
        if id(module) not in gate_args_cache:
            gate_args_cache[id(module)] = set()  # (while reading it)
            rule = table.get(type(module))
            if rule is not None:
                found = set(rule.gate_args)
            elif used(module):
                found = read_forward(module, trace_info.given.get(id(module)), trace_info.shapes.get(id(module)),
                                     gate_args_of, constant_types).gate_args
            else:
                found = set()
            gate_args_cache[id(module)] = found
        return gate_args_cache[id(module)]

    def convert(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)][1]
        rule = table.get(type(module))
        gate_children: set[str] = set()
        if rule is None and not used(module):
            report.add(path, module, UNUSED, note="unknown type whose forward never runs (a forward that reads its "
                                                "tensors or calls its methods is checked there); left as is")
            new = module
        elif rule is None or rule.action == DESCEND:
            new = module
            if rule is None:  # no rule: read what its forward does between its children
                reading = read_forward(module, trace_info.given.get(id(module)), trace_info.shapes.get(id(module)),
                                       gate_args_of, constant_types)
                if reading.ok:
                    new = rewrite(module, reading)
                    own = {n for n, _ in module.named_parameters(recurse=False)}
                    _check_own_parameters(new, path, Rule(DESCEND, constants=tuple(reading.constants),
                                                          scales=tuple(own - reading.constants)), report,
                                          config.strict)
                    report.add(path, module, READ, note=reading.summary() + ("; forward rewritten as an fx "
                                                                             "GraphModule" if new is not module
                                                                             else ""))
                    gate_children = reading.gate_children
                else:  # its children are still converted (and listed)
                    report.add(path, module, REFUSED if config.strict else LEFT,
                               note="; ".join(reading.blocking) + ("" if config.strict else "; left as is"))
            else:
                _check_own_parameters(module, path, rule, report, config.strict)
            for name, child in list(new.named_children()):
                child_path = f"{path}.{name}" if path else name
                if name in gate_children:
                    report.add(child_path, child, GATED, note="computes a gate; kept as it is (detached in "
                                                              "explanation mode)")
                    continue
                new_child = convert(child, child_path)
                if new_child is not child:
                    setattr(new, name, new_child)
        elif rule.action == KEEP:
            report.add(path, module, KEPT, note=rule.note)
            new = module
        elif rule.action == CONSTANT_OUTPUT:  # kept; explanations take its output as a constant, per sample
            report.add(path, module, CONSTANT, note=rule.note or "computes a constant from the input's shape alone, "
                                                                 "explained as constant_contribution")
            new = module
        elif rule.action == REFUSE:
            report.add(path, module, REFUSED if config.strict else LEFT,
                       note=rule.note + ("" if config.strict else "; left as is"))
            new = module
        else:
            ctx.path = path
            ctx.convert_child = lambda child, name, _path=path: convert(child, f"{_path}.{name}")
            new = rule.build(module, ctx)
            action = GATED if rule.action == GATE else (REPLACED if new is not module else KEPT)
            note = rule.note
            if path in trace_info.first_layer_paths:
                note = f"first layer: [x, 1-x] input, normalization ({config.normalization_from}) folded in"
            report.add(path, module, action, new if new is not module else None, note)
        done[id(module)] = (module, new)
        return new

    top = convert(model, "")
    del originals
    refused = report.refused
    if refused:
        lines = "\n".join(f"  {e.path}: {e.old_type}" + (f" ({e.note})" if e.note else "") for e in refused)
        raise ConversionError(
            f"{len(refused)} module(s) on the value path have no exact conversion:\n{lines}\n"
            "Pass strict=False to leave them as they are (the model is then not guaranteed to be dynamic "
            "linear), or give a rule for their type: convert(..., rules={Type: Rule(...)}).")
    return top, report
