"""Methods registered by name."""
from __future__ import annotations

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
    """Instantiate a method with hyper-parameters; an unknown option or a wrong type names the key."""
    from .args import check_method_args

    cls = method_class(name)
    return cls(cls.Config(**check_method_args(name, options)))
