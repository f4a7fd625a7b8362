"""Exception types. All derive from :class:`ValueError`, so ``except ValueError`` catches them."""

from __future__ import annotations

__all__ = [
    "SimExplainError",
    "InputError",
    "LayerError",
    "ModelOutputError",
    "ModelLoadError",
    "MissingExtraError",
]


class SimExplainError(ValueError):
    """Base class of every error simexplain raises on purpose."""


class InputError(SimExplainError):
    """The images, labels or options passed to a call are not usable as given."""


class LayerError(SimExplainError):
    """The target layer does not exist, or its output is not a spatial feature map."""


class ModelOutputError(SimExplainError):
    """The model does not return one finite embedding vector per image."""


class ModelLoadError(InputError):
    """A model spec, checkpoint or pretrained download could not be turned into a model."""


class MissingExtraError(InputError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
