"""Explanation methods for similarity models behind one interface, and a registry of them.

Every method is a :class:`SimilarityMethod`: build it from the model (and optionally the
layer, as for :class:`~simexplain.EmbeddingAttribution`), then
``method.explain(tuples) -> (B, T, h, w)`` gives one raw map per image of each tuple at
the layer's resolution. A method is also an ``explain_fn(model, tuples)`` for
:mod:`simexplain.metrics` (it rebuilds itself for another model, e.g. a randomised copy).

A GradCAM-style method is its per-image score, a
:class:`~simexplain.engine.SimilarityScore`, on the shared engine; adding one is a score
class and a small :class:`SimilarityMethod` that hands it to :meth:`~SimilarityMethod.gradcam`.
Which location matches which across a pair: :class:`PairCorrespondence`.

==================  ==========================================================  ==========
name                what a map shows                                            tuples
==================  ==========================================================  ==========
``contribution``    what each location puts into ``w_i . z_i``, ``w_i`` the     2, 3, 4
                    partners' embeddings (the default: :data:`DEFAULT_METHOD`)
``psam``            how ``w_i . z_i`` would change, measured from a reference   2, 3, 4
``sam``             GradCAM of ``w . f_i`` (Zheng et al., the paper's SAM)      2, 3, 4
``sam_rescaled``    paper SAM with its differences rescaled to [0, 1]           2, 3, 4
``sam_contrib``     contribution on the criterion's supporting dimensions       2, 3, 4
``gradcam_cosine``  GradCAM of the tuple's cosine criterion, others held fixed  2, 3, 4
``stylianou``       each location's share of the cosine (Stylianou et al.)      2, 3, 4
``point_specific``  point-to-point similarity (Zhu et al. 2021)                 2 (3, 4)
``bce_gradcam``     GradCAM of a trained same/different pair classifier         2
``sbsm``            how the criterion drops as each window is hidden            2, 3, 4
                    (black box: any callable model, no layer)
``rise``            how the criterion drops as each pixel is hidden under       2, 3, 4
                    random masks (black box: any callable model, no layer)
==================  ==========================================================  ==========

>>> import torch, torchvision
>>> from simexplain.methods import get_method
>>> model = torchvision.models.resnet18(num_classes=16)
>>> method = get_method("gradcam_cosine")(model, layer="layer4")
>>> x1, x2 = torch.randn(2, 1, 3, 64, 64)
>>> method.explain((x1, x2)).shape
torch.Size([1, 2, 2, 2])
"""

from . import (
    base, centre, contribution, correspondence, cosine, decomposition, defaults,
    pair_classifier, psam, sam, sam_variants,
)
from .base import *  # noqa: F403
from .defaults import *  # noqa: F403
from .sam import *  # noqa: F403
from .centre import *  # noqa: F403
from .psam import *  # noqa: F403
from .contribution import *  # noqa: F403
from .sam_variants import *  # noqa: F403
from .cosine import *  # noqa: F403
from .decomposition import *  # noqa: F403
from .pair_classifier import *  # noqa: F403
from .correspondence import *  # noqa: F403
from .blackbox import RISE, SBSM, BlackBoxMethod  # noqa: F401  (registers "sbsm", "rise")

__all__ = [
    *base.__all__,
    *defaults.__all__,
    *sam.__all__,
    *centre.__all__,
    *psam.__all__,
    *contribution.__all__,
    *sam_variants.__all__,
    *cosine.__all__,
    *decomposition.__all__,
    *pair_classifier.__all__,
    *correspondence.__all__,
]
