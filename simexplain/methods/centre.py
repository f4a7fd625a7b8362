"""The point embeddings are measured from: a reference's mean, or one the method finds itself.

Pooled features of natural images share a large common component, so much of any two
images' cosine is that component, whichever images they are. Cosine-family methods
measure the embeddings from a centre ``m``, ``z = normalise(f / |f| - m)``: the mean
normalised embedding of *reference* images (a gallery, a few hundred images of the
domain). Centres that need no reference (generated noise images, the tuple's own images
shuffled in blocks, the tuple's average location) were measured in an exploration on
the discriminative benchmark's scenes (its table is in docs/method.rst; the script was
not kept) and did not do better than none, so without a reference the methods measure
from the origin.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.embeddings import finite_embeddings
from ..engine.state import model_device
from ..engine.target_layer import LayerSpec
from ..errors import InputError
from .base import SimilarityMethod

__all__ = ["reference_centre", "CentredMethod"]

#: Images per forward pass when a reference is given as images.
_REFERENCE_BATCH = 32

Embed = Callable[[Tensor], Tensor]


def reference_centre(
    model: nn.Module, reference: Tensor, embed: Optional[Embed] = None
) -> Tensor:
    """The mean L2-normalised embedding ``(d,)`` of ``reference``.

    Args:
        model: the embedding model (any callable when ``embed`` is given).
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
        reference = _embed_all(embed or model, reference, model_device(model))
    elif not bool(torch.isfinite(reference).all()):
        raise InputError("reference embeddings contain NaN or Inf values")
    return F.normalize(reference.detach().float(), dim=-1).mean(0)


def _embed_all(embed: Embed, images: Tensor, device: Optional[torch.device]) -> Tensor:
    parts = []
    with torch.no_grad():
        for start in range(0, images.shape[0], _REFERENCE_BATCH):
            batch = images[start : start + _REFERENCE_BATCH].to(device or images.device)
            parts.append(finite_embeddings(embed(batch), batch.shape[0]))
    return torch.cat(parts)



class CentredMethod(SimilarityMethod):
    """A cosine-family method whose embeddings can be measured from a reference's mean.

    Args:
        model: the embedding model.
        layer: as for :class:`~simexplain.methods.SimilarityMethod`.
        reference: embeddings ``(N, d)`` or images ``(N, C, H, W)`` like the ones
            explained (e.g. a gallery, a few hundred images of the domain): ``z`` is then
            measured from their mean normalised embedding (:func:`reference_centre`).
            ``None``: from the origin.
        **layer_options: as for :class:`~simexplain.methods.SimilarityMethod`.
    """

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
        """The reference's mean normalised embedding ``(d,)``, or ``None`` without one."""
        if self._centre is None and self.reference is not None:
            self._centre = reference_centre(self.model, self.reference, self.engine.embed)
        return self._centre
