"""Errors raised by the data layer; messages name the file, row and field."""
from __future__ import annotations


class DataError(ValueError):
    """Bad or unreadable training data."""


class BadImageError(DataError):
    """An image that does not decode (or is refused); rows with one can be skipped."""
