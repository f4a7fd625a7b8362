"""The offline demos (``simexplain demo``): ImageNet EfficientNet-Lite0 explained on
scikit-image's photos, or (``--train``) a small embedding network trained on Fashion-MNIST
or generated shapes, then explained. The small network and its training are importable
for examples and tests."""

from . import network, training
from .network import *  # noqa: F403
from .training import *  # noqa: F403

__all__ = [*network.__all__, *training.__all__]
