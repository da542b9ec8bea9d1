"""Explanation: the dynamic linear weights ``W(x)`` and contributions (``explain``), pictures of them
(:mod:`~bcosify.explanation.viz`), captum-shaped attribution methods (:mod:`~bcosify.explanation.attribution`),
the grid pointing game (:mod:`~bcosify.explanation.gridpg`) and the two properties every conversion must have (:mod:`~bcosify.explanation.checks`)."""

from .attribution import Attribution
from .checks import completeness_error, equivalence_error
from .explanation import Explanation, explain, per_sample_constants

__all__ = ["Attribution", "Explanation", "completeness_error", "equivalence_error", "explain",
           "per_sample_constants"]
