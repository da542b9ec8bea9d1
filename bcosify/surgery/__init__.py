"""The model-surgery engine: trace the model, then replace its modules through one rule table keyed by exact
module type (split by library in :mod:`bcosify.surgery.rules`)."""

from .engine import convert_modules
from .report import ConversionReport, ReportEntry
from .rules import RULES, Context, Rule, register_rule
from .trace import Trace, trace

__all__ = ["RULES", "Context", "ConversionReport", "ReportEntry", "Rule", "Trace", "convert_modules",
           "register_rule", "trace"]
