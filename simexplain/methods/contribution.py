"""What each location puts into the tuple's similarity: the *contribution* reading, the
default (docs/method.rst derives it and compares it with the sensitivity reading).

Paper SAM scores image ``i`` by ``w . f_i`` with one ``w`` for the whole tuple; for
L2-normalised high-dimensional embeddings ``w`` is nearly constant, so the score hardly
depends on the partner. Keeping the paper's form, a score linear in image ``i``'s own
normalised embedding with a weight vector from the tuple, and asking that the maps (1)
change with the partner, (2) not change when the embedding space is rotated, and (3) add
up to the tuple's criterion, leaves one choice: image ``i``'s weight vector is its
partners' embeddings,

    ``w_i = sum_j c_ij z_j``,  ``s_i = w_i . z_i``  (partners held fixed),

with ``c`` the criterion's coefficients (:func:`~simexplain.methods.cosine_coefficients`)
and ``z`` the normalised embedding, optionally measured from a reference's mean. Here the
norms of the normalisation are held fixed too, so the score is linear in image ``i``'s
embedding and its gradient is ``w_i`` itself: GradCAM splits ``w_i . f_i`` over the
layer's locations. For a global-average-pooled linear head the map is each location's
share of the score (Stylianou et al.'s decomposition, up to a constant for the head's
bias and the centre). An identical pair's maps show what the image puts into its own
embedding, an image and its mirror image get mirrored maps, and the maps do not move
under a rotation of the embedding. ``psam`` is the same score differentiated through the
normalisation (the sensitivity reading).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from .base import TensorTuple, register_method
from .centre import CentredMethod
from .cosine import CosineScore

__all__ = ["Contribution"]


@register_method
class Contribution(CentredMethod):
    """Each image's contribution to its tuple's cosine criterion, partners and norms held
    fixed (see the module docs); the default method.

    Args:
        model: the embedding model.
        layer: as for :class:`~simexplain.methods.SimilarityMethod`.
        reference: optional embeddings ``(N, d)`` or images ``(N, C, H, W)`` like the ones
            explained (e.g. a gallery): ``z`` is then measured from their mean normalised
            embedding (:func:`~simexplain.methods.reference_centre`), which keeps what the
            partners share beyond what such images share. ``None``: from the origin.
        **layer_options: as for :class:`~simexplain.methods.SimilarityMethod`.

    ``explain(tuples, same_class=None, coefficients=None, relu=True)``: pairs explain
    their similarity, or their dissimilarity where ``same_class`` is ``False``; triplets
    the margin ``cos(a, p) - cos(a, n)``, quadruplets both margins.

    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(num_classes=16)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> maps = Contribution(model, layer="layer4").explain((x, x))   # identical pair
    >>> maps.shape, bool(maps.amax() > 0)
    (torch.Size([1, 2, 2, 2]), True)
    """

    name = "contribution"
    rotation_invariant = True
    #: Whether the score holds the normalisation's norms fixed (the contribution reading).
    norms_fixed = True

    def score(self, target: Any = None, coefficients: Optional[Any] = None) -> CosineScore:
        return CosineScore(coefficients, target, self.centre, norms_fixed=self.norms_fixed)

    def explain(
        self,
        tuples: TensorTuple,
        same_class: Any = None,
        coefficients: Optional[Any] = None,
        relu: bool = True,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        return self.gradcam(tuples, self.score(same_class, coefficients), relu, chunk_size)
