"""Partner-aware SAM: each image weighted by its partners' embeddings, optionally centred.

Paper SAM scores image ``i`` by ``w . f_i`` with one ``w`` for the whole tuple; for
L2-normalised high-dimensional embeddings ``w`` is nearly constant, so the score hardly
depends on the partner (docs/method.rst derives this). Keeping the paper's form, a score
that is linear in image ``i``'s own normalised embedding with a weight vector from the
tuple, and asking that the maps (1) change with the partner, (2) not change when the
embedding space is rotated, and (3) add up to the tuple's criterion, leaves one choice:
image ``i``'s weight vector is its partners' embeddings,

    ``w_i = sum_j c_ij z_j``,  ``s_i = w_i . z_i``  (partners held fixed),

with ``c`` the criterion's coefficients (:func:`~simexplain.methods.cosine_coefficients`).
``w_i`` is large exactly along the directions in which image ``i`` agrees with its
positives and small along those it shares with its negatives. With ``z`` the normalised
embedding this is GradCAM of the cosine (``gradcam_cosine``). Pooled post-activation
features share one dominant direction, so most of any two images' cosine is that
direction: measured from a *reference* point, ``z = normalise(f_hat - m)`` with ``m`` the
mean normalised embedding of reference images (a gallery, a few hundred images of the
domain), the weights keep only what sets the partners apart from images in general.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.embeddings import finite_embeddings
from ..engine.state import model_device
from ..engine.target_layer import LayerSpec
from ..errors import InputError
from .base import SimilarityMethod, TensorTuple, register_method
from .cosine import CosineScore

__all__ = ["reference_centre", "PartnerSAM"]

#: Images per forward pass when a reference is given as images.
_REFERENCE_BATCH = 32


def reference_centre(
    model: nn.Module, reference: Tensor, embed: Optional[Any] = None
) -> Tensor:
    """The mean L2-normalised embedding ``(d,)`` of ``reference``.

    Args:
        model: the embedding model.
        reference: embeddings ``(N, d)`` (the model's outputs for reference images), or
            images ``(N, C, H, W)``, embedded here without a graph, ``_REFERENCE_BATCH``
            at a time.
        embed: ``embed(images) -> (N, d)``, how to run the model (default: ``model(x)``).

    >>> import torch
    >>> reference_centre(torch.nn.Identity(), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    tensor([0.3000, 0.9000])
    """
    if not isinstance(reference, Tensor) or reference.dim() not in (2, 4):
        shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference)
        raise InputError(
            f"reference must be embeddings (N, d) or images (N, C, H, W) as a tensor, got "
            f"{shape}; e.g. the embeddings of a gallery, or a few hundred images like the "
            "ones explained"
        )
    if reference.shape[0] < 2:
        raise InputError("reference needs at least two images or embeddings to average")
    if reference.dim() == 4:
        run = embed or model
        device = model_device(model) or reference.device
        parts = []
        with torch.no_grad():
            for start in range(0, reference.shape[0], _REFERENCE_BATCH):
                images = reference[start : start + _REFERENCE_BATCH].to(device)
                parts.append(finite_embeddings(run(images), images.shape[0]))
        reference = torch.cat(parts)
    elif not bool(torch.isfinite(reference).all()):
        raise InputError("reference embeddings contain NaN or Inf values")
    return F.normalize(reference.detach().float(), dim=-1).mean(0)


@register_method
class PartnerSAM(SimilarityMethod):
    """Partner-aware SAM: image ``i``'s score is ``w_i . z_i`` with ``w_i = sum_j c_ij z_j``,
    its partners' embeddings held fixed (see the module docs for why this form).

    Args:
        model: the embedding model.
        layer: as for :class:`~simexplain.methods.SimilarityMethod`.
        reference: optional embeddings ``(N, d)`` or images ``(N, C, H, W)`` like the ones
            explained (e.g. a gallery); ``z`` is then measured from their mean normalised
            embedding (:func:`reference_centre`). Without one ``z`` is the normalised
            embedding and the maps equal ``gradcam_cosine``'s.
        **layer_options: as for :class:`~simexplain.methods.SimilarityMethod`.

    ``explain(tuples, same_class=None, coefficients=None, relu=True)``: pairs explain
    their similarity, or their dissimilarity where ``same_class`` is ``False``; triplets
    the margin ``cos(a, p) - cos(a, n)``, quadruplets both margins. Maps are unchanged
    when the embedding is rotated (also with a reference embedded by the same model).

    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(num_classes=16)
    >>> method = PartnerSAM(model, layer="layer4", reference=torch.randn(8, 16))
    >>> method.explain(tuple(torch.randn(2, 1, 3, 64, 64))).shape
    torch.Size([1, 2, 2, 2])
    """

    name = "psam"
    rotation_invariant = True

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        reference: Optional[Tensor] = None,
        **layer_options: Any,
    ) -> None:
        super().__init__(model, layer, **layer_options)
        self.reference = reference
        self._centre: Optional[Tensor] = None

    def _rebuild_options(self) -> dict[str, Any]:
        return {**super()._rebuild_options(), "reference": self.reference}

    @property
    def centre(self) -> Optional[Tensor]:
        """The reference's mean normalised embedding, or ``None`` without a reference."""
        if self._centre is None and self.reference is not None:
            self._centre = reference_centre(self.model, self.reference, self.engine.embed)
        return self._centre

    def score(self, target: Any = None, coefficients: Optional[Any] = None) -> CosineScore:
        return CosineScore(coefficients, target, self.centre)

    def explain(
        self,
        tuples: TensorTuple,
        same_class: Any = None,
        coefficients: Optional[Any] = None,
        relu: bool = True,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        return self.gradcam(tuples, self.score(same_class, coefficients), relu, chunk_size)
