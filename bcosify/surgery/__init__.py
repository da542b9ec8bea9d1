"""The model-surgery engine: one rule table keyed by exact module type, and the walk that applies it."""

from .engine import convert_modules, trace
from .report import ConversionReport, ReportEntry
from .rules import RULES, Context, Rule, fold_input_normalisation, register_rule

__all__ = ["RULES", "Context", "ConversionReport", "ReportEntry", "Rule", "convert_modules",
           "fold_input_normalisation", "register_rule", "trace"]
