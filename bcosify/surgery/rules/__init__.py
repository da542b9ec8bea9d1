"""The replacement table: exact module type -> what conversion does with it, split by library.

Keys are exact types, never ``isinstance``: timm subclasses ``nn.Conv2d``, ``nn.BatchNorm2d`` and
``nn.LayerNorm`` with different forwards, and a subclass we have not read must be refused, not
converted as if it were its parent. ``core`` holds the ``torch.nn`` rules and the shared builders; the timm
and torchvision rules are added when those libraries import. Extend the table for one call with
``convert(..., rules={MyBlock: Rule("descend")})``, or for the process with :func:`register_rule`.
"""

from __future__ import annotations

import importlib
import warnings

from .base import ACTIONS, CONSTANT_OUTPUT, DESCEND, GATE, KEEP, REFUSE, REPLACE, Builder, Context, Rule
from .core import FIRST_LAYER_TYPES, INPUT_TRANSFORMS, LINEAR_TYPES, PLAIN_CONVS

RULES: dict[type, Rule] = {}
#: the libraries whose rule modules loaded (``bcosify.surgery.rules.<name>``)
LIBRARIES: list[str] = []

for _library in ("core", "timm", "torchvision"):
    try:
        _module = importlib.import_module(f"{__name__}.{_library}")
    except ImportError as _error:  # the library is not installed: its models are read from their graphs
        if _library == "core" or (_error.name or "").split(".")[0] != _library:
            raise
        continue
    except AttributeError as _error:  # a class renamed or removed by a newer release of the library
        if _library == "core":
            raise
        warnings.warn(f"bcosify's {_library} rules do not match the installed {_library} ({_error}); its models "
                      "are converted by reading their forwards (verified) or refused", RuntimeWarning, stacklevel=2)
        continue
    RULES.update(_module.RULES)
    LIBRARIES.append(_library)

CLASSIFIER_TYPES = LINEAR_TYPES  # the classifier is the last linear layer the forward runs


def register_rule(module_type: type, rule: Rule) -> None:
    """Teach the engine a module type of your own (exact type) for every later conversion, e.g.
    ``Rule("descend")`` for a block whose forward only composes its children linearly."""
    if not isinstance(rule, Rule):
        raise TypeError(f"expected a Rule, got {type(rule).__name__}")
    RULES[module_type] = rule


__all__ = ["ACTIONS", "CLASSIFIER_TYPES", "CONSTANT_OUTPUT", "DESCEND", "FIRST_LAYER_TYPES", "GATE", "KEEP", "LIBRARIES",
           "INPUT_TRANSFORMS", "LINEAR_TYPES", "PLAIN_CONVS", "REFUSE", "REPLACE", "RULES", "Builder", "Context", "Rule", "register_rule"]
