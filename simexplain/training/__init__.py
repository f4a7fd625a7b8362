"""Training with the maps: similarity mining (METHOD.md section 2).

:class:`SAMLoss` adds the mining term to any metric-learning loss; it takes tuples of
images, or a batch with labels and a pytorch-metric-learning miner (which chooses the
tuples) or ``indices_tuple``. The term erases or drops what the maps show
(:mod:`~simexplain.training.mining_terms`), or the maps choose crops
(:mod:`~simexplain.training.map_crops`).
"""

from . import batch_norm, loss, loss_parts, masking, mining_terms
from .loss import *  # noqa: F403
from .loss_parts import *  # noqa: F403
from .mining_terms import *  # noqa: F403
from .masking import *  # noqa: F403
from .batch_norm import *  # noqa: F403

__all__ = [*loss.__all__, *loss_parts.__all__, *mining_terms.__all__, *masking.__all__,
           *batch_norm.__all__]
