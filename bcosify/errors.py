"""Exceptions raised by bcosify."""

from __future__ import annotations


class BcosifyError(Exception):
    """Base class of all bcosify errors."""


class ConversionError(BcosifyError, ValueError):
    """A model (or some of its modules) cannot be converted exactly."""


class CheckpointError(BcosifyError, ValueError):
    """A weight file is missing, unreadable, unsafe or does not fit the model."""
