"""Black-box methods: maps from perturbing the images, for models without gradients.

``"sbsm"`` (:class:`SBSM`) hides one sliding window at a time, ``"rise"`` (:class:`RISE`)
many random smooth masks. Either takes as its model any callable
``images (N, C, H, W) -> embeddings (N, d)``, embeds each image's perturbations once and
scores them against all of the image's partners with the tuple's criterion, the one the
gradient methods explain (:mod:`.criterion`). docs/blackbox.rst gives the equations and
the cost.

>>> import torch
>>> from simexplain.methods import get_method
>>> embed = lambda x: x.mean(dim=(2, 3))                # any function images -> vectors
>>> anchor, positive, negative = torch.rand(3, 1, 3, 16, 16)
>>> get_method("sbsm")(embed).explain((anchor, positive, negative)).shape
torch.Size([1, 3, 8, 8])
"""

from . import base, criterion, masks, rise, sbsm
from .base import *  # noqa: F403
from .criterion import *  # noqa: F403
from .masks import *  # noqa: F403
from .rise import *  # noqa: F403
from .sbsm import *  # noqa: F403

__all__ = [*base.__all__, *criterion.__all__, *masks.__all__, *rise.__all__, *sbsm.__all__]
