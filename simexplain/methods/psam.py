"""Partner-aware SAM: the sensitivity reading of the contribution score, measured from a
reference's mean (docs/method.rst derives both readings).

Image ``i``'s score is ``s_i = w_i . z_i`` with ``w_i = sum_j c_ij z_j`` and the partners
held fixed, as for :class:`~simexplain.methods.Contribution`, but differentiated through
the normalisation: its gradient is the part of ``w_i`` orthogonal to ``z_i``, so the map
shows what would make the tuple more similar. For a near-identical pair that part is small
and holds only the pair's differences; for an identical pair it is zero. ``z`` is measured
from the mean of a reference's normalised embeddings; from the origin this would be
``gradcam_cosine``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..engine.target_layer import LayerSpec
from ..errors import InputError
from .base import register_method
from .centre import reference_centre  # noqa: F401 (its earlier home)
from .contribution import Contribution

__all__ = ["PartnerSAM"]


@register_method
class PartnerSAM(Contribution):
    """Partner-aware SAM, the sensitivity reading: how image ``i``'s score ``w_i . z_i``
    would change, every ``z`` measured from a reference's mean (see the module docs).

    Args:
        model: the embedding model.
        layer: as for :class:`~simexplain.methods.SimilarityMethod`.
        reference: embeddings ``(N, d)`` or images ``(N, C, H, W)`` like the ones
            explained (e.g. a gallery): ``z`` is measured from their mean normalised
            embedding (:func:`~simexplain.methods.reference_centre`). Without one the maps
            are ``gradcam_cosine``'s.
        **layer_options: as for :class:`~simexplain.methods.SimilarityMethod`.

    ``explain(tuples, same_class=None, coefficients=None, relu=True)``, as for
    :class:`~simexplain.methods.Contribution`.

    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(num_classes=16)
    >>> method = PartnerSAM(model, layer="layer4", reference=torch.randn(8, 16))
    >>> method.explain(tuple(torch.randn(2, 1, 3, 64, 64))).shape
    torch.Size([1, 2, 2, 2])
    """

    name = "psam"
    norms_fixed = False

    def __init__(
        self, model: nn.Module, layer: LayerSpec = None, *, reference: Tensor, **layer_options: Any
    ) -> None:
        if reference is None:
            raise InputError(
                "method 'psam' needs reference=, embeddings (N, d) or images (N, C, H, W) "
                "like the ones explained (e.g. a gallery); without one its maps are "
                "method='gradcam_cosine''s"
            )
        super().__init__(model, layer, reference, **layer_options)
