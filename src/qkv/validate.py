"""Argument checks shared across the package, each raising an error that names the argument."""

from __future__ import annotations


def positive_int(name: str, value) -> int:
    """``value`` if it is an int ``> 0`` (not a bool), else ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
