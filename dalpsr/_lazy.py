"""Lazy package exports (PEP 562): names are imported from their defining module on first access."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, namespace: dict, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `exports[name]` (a module path) on first use and caches the value."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
