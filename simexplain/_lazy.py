"""Package attributes that import their module on first use (PEP 562), as torchcam does.

``import simexplain`` then costs little more than importing torch: captum,
matplotlib, PIL, the report and the command line load only when a name needs them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: each name of ``exports`` is imported from
    the module it maps to (relative to ``package``) when first read, then kept. A name
    that is the module's own last component (``"metrics": ".metrics"``) is that module."""

    def __getattr__(name: str) -> Any:
        try:
            where = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = importlib.import_module(where, package)
        value = module if where.rsplit(".", 1)[-1] == name else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
