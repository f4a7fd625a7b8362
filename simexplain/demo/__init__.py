"""The offline demo: a small embedding network trained on Fashion-MNIST or generated shapes,
then a pair, a triplet and a quadruplet explained (``simexplain demo``)."""

from . import network, training
from .network import *  # noqa: F403
from .training import *  # noqa: F403

__all__ = [*network.__all__, *training.__all__]
