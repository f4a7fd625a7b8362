"""Keeping BatchNorm's running statistics out of a forward pass that trains nothing in them
(the masked forward of the mining term): the engine's context manager, for training code."""

from __future__ import annotations

from ..engine.state import frozen_norm_statistics

__all__ = ["frozen_norm_statistics"]
