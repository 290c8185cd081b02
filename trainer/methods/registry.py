"""Methods registered by name."""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable by `cls.name`."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}") from None


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a method with hyper-parameters; an unknown option names the key.

    A field whose default is None ("chosen from the other options") is not type-checked here.
    """
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    options = dict(options or {})
    for key, value in options.items():
        if key not in fields:
            raise ValueError(
                f"method_args.{key}: not an option of method {name!r} (options: {', '.join(fields) or 'none'})"
            )
        default = fields[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            options[key] = float(value)
        elif default not in (dataclasses.MISSING, None) and not isinstance(value, type(default)):
            raise ValueError(f"method_args.{key}: expected {type(default).__name__}, got {value!r}")
    return cls(cls.Config(**options))
