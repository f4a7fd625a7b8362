"""Exception types. All derive from :class:`ValueError`, so ``except ValueError`` catches them."""

from __future__ import annotations

__all__ = [
    "SimExplainError",
    "InputError",
    "LayerError",
    "ModelOutputError",
    "ModelForwardError",
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


class ModelForwardError(InputError):
    """The model raised during a forward pass simexplain ran; the model's own exception is
    the ``__cause__``, and the message says what was passed to the model."""


class ModelLoadError(InputError):
    """A model spec, checkpoint or pretrained download could not be turned into a model, or
    the model is one whose layers cannot be hooked (TorchScript)."""


class MissingExtraError(InputError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
