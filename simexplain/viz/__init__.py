"""Figures of explanations, with matplotlib's object API (no pyplot state, no window)."""

from . import figures
from .figures import *  # noqa: F403

__all__ = [*figures.__all__]
