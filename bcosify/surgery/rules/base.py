"""What a rule is, and what its builder may read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from ...config import BcosConfig
from ..report import ConversionReport

DESCEND = "descend"
KEEP = "keep"
REPLACE = "replace"
GATE = "gate"
REFUSE = "refuse"
CONSTANT_OUTPUT = "constant"
ACTIONS = (DESCEND, KEEP, REPLACE, GATE, REFUSE, CONSTANT_OUTPUT)


@dataclass
class Context:
    """What a builder may read while converting one model."""

    config: BcosConfig
    report: ConversionReport
    rules: Mapping[type, "Rule"] = field(default_factory=dict)
    convert_child: Callable[[nn.Module, str], nn.Module] | None = None
    path: str = ""


Builder = Callable[[nn.Module, Context], nn.Module]


@dataclass(frozen=True)
class Rule:
    """What happens to modules of one exact type.

    ``descend``: a container whose own forward only composes its children with linear operations
    (sums, concatenation, constant scales, reshapes); its children are converted one by one.
    ``keep``: left as is (linear or dynamic linear: ReLU, pooling, dropout, reshapes).
    ``replace``/``gate``: ``build(module, context)`` returns the replacement.
    ``refuse``: a known type with no exact conversion; ``note`` says why.
    ``constant``: a module that computes, from the input's shape alone, a tensor its caller adds to the value path
    (XCiT's Fourier positional encoding): left as it is, its output explained per sample as a constant.
    ``constants``: for a container, its own parameters that its forward adds to the value path as constants
    (positional embeddings, class/register tokens); explanations account for them per sample.
    ``scales``: a container's own parameters that its forward multiplies the value path by (layer scale).
    A container's own parameter declared in neither is refused.
    ``gate_args``: forward arguments the module uses on its gate path only (a rotary embedding table that acts
    on q, k): a container calling it may compute them from buffers and captured tensors, which then stay off the
    value path.
    """

    action: str
    build: Builder | None = None
    note: str = ""
    constants: tuple[str, ...] = ()
    scales: tuple[str, ...] = ()
    gate_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown rule action {self.action!r}; expected one of {ACTIONS}")
        if self.action in (REPLACE, GATE) and self.build is None:
            raise ValueError(f"a {self.action!r} rule needs a build function")
