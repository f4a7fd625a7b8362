"""The ``simexplain`` command: ``explain``, ``explain-dir``, ``report`` and ``demo``."""

from .main import main

__all__ = ["main"]
