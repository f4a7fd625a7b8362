"""Which location of one image the model matched with which location of the other: a
pair's similarity as a sum over pairs of locations.

For a head that globally average pools the layer and applies a linear layer (or none),
the cosine splits exactly over pairs of locations: Zhu et al. 2021's point-to-point
intensity, :meth:`~simexplain.methods.PointSpecific.point_to_point`, which this module
runs (one implementation). For any other head, each location ``p``'s share of each
embedding coordinate ``k`` is estimated by gradient times activation through the head,

    ``R[k, p] = sum_c (d f_k / d A[c, p]) A[c, p]``,

and the two images' shares are joined over the coordinates,

    ``M(p, q) = sum_k R1[k, p] R2[k, q] / (|f1| |f2|)``,

the second-order form of BiLRP (Eberle et al., TPAMI 2022) with gradient times activation
as the relevance. It equals the exact intensity for a pooled linear head without bias,
and ``M`` does not change when the embedding is rotated (``R`` turns with it). ``R`` takes
one backward pass of the head per coordinate, or one forward-mode derivative per location
(:mod:`~simexplain.methods._forward_shares`), whichever is fewer (and possible), batched as
copies of the head; when backward passes are used and ``d`` is large, ``projections=r``
first maps the embedding by ``P``, ``r`` orthonormal random directions scaled by
``sqrt(d / r)``, so that ``E[P^T P] = I`` and the estimate of ``M`` stays unbiased, with
a spread that falls as ``1 / sqrt(r)`` (docs/correspondence.rst measures it).

Both paths run on the head-only path of a split model
(:mod:`~simexplain.engine.head_split`): the trunk runs once per image without a graph,
and only the head after the layer is differentiated; a model that cannot be split is
differentiated through a full forward pass instead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.head_split import HeadSplit
from ..engine.layouts import FeatureLayer
from ..engine.state import preserved_state
from ..engine.stored import head_embeddings, head_split, run_trunk, stored_chunks
from ..engine.target_layer import LayerSpec
from ..errors import InputError, LayerError
from ._location_shares import LocationShares, PendingShares
from .decomposition import HeadSpec, PointSpecific, pair_intensity

__all__ = ["PairCorrespondence", "CorrespondenceMatrices", "LocationShares",
           "AUTO_COORDINATES", "AUTO_PROJECTIONS"]

#: ``projections="auto"`` differentiates every embedding coordinate up to this ``d``...
AUTO_COORDINATES = 512
#: ... and this many random directions above it.
AUTO_PROJECTIONS = 256

Projections = Union[int, None, str]


@dataclass
class CorrespondenceMatrices:
    """Location-by-location matrices of a batch of ``B`` pairs.

    Attributes:
        matrix: ``(B, h1 * w1, h2 * w2)``: ``matrix[b, p, q]`` is what the pair of cells
            ``p`` of image 1 and ``q`` of image 2 (row-major on the layer's grids) puts
            into the pair's score.
        scores: ``(B,)`` the pairs' cosine similarity, measured from the reference's mean
            when there is one: the default method's pair score.
        grids: the layer's ``(h, w)`` grid on each image.
        exact: whether ``matrix[b].sum()`` equals ``scores[b]`` (a pooled linear head);
            otherwise the matrix is the gradient-times-activation estimate.
        projections: the random directions the estimate used (``None``: every coordinate).
        layer: the layer's name.
    """

    matrix: Tensor
    scores: Tensor
    grids: tuple[tuple[int, int], tuple[int, int]]
    exact: bool
    projections: Optional[int]
    layer: str


class PairCorrespondence:
    """Location-by-location matrices of pairs of images under an embedding model.

    Args:
        model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``.
        layer: the spatial layer whose locations are matched (default: found as for the
            maps, the last spatial layer).
        reference: embeddings ``(N, d)`` or images ``(N, C, H, W)``: measure the
            embeddings from their mean, as the default method does (``None``: from the
            origin).
        head: the exact path's linear head, as for :class:`~simexplain.methods.Stylianou`.
        projections: for the estimate (heads that are not a pooled linear layer): ``None``
            differentiates every embedding coordinate (exact ``R``), an int ``r`` uses
            ``r`` random directions (``r >= d`` is the same as ``None``), ``"auto"``
            every coordinate up to ``d =`` :data:`AUTO_COORDINATES`, else
            :data:`AUTO_PROJECTIONS` directions. A grid with fewer cells than directions
            gets every coordinate, by forward-mode derivatives, where the head allows.
        seed: seeds the random directions.
        chunk_size: pairs per head pass (default: the head-only path's).
        **layer_options: the engine's options (``layout=``, ``output=``, ...).

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=16).eval()
        >>> x1, x2 = torch.randn(2, 1, 3, 64, 64)
        >>> result = PairCorrespondence(model, layer="layer4").matrices(x1, x2)
        >>> tuple(result.matrix.shape), result.exact   # 2x2 grids; fc after the pooling
        ((1, 4, 4), True)
        >>> torch.allclose(result.matrix.sum(dim=(1, 2)), result.scores, atol=1e-5)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        *,
        reference: Optional[Tensor] = None,
        head: HeadSpec = "auto",
        projections: Projections = "auto",
        seed: int = 0,
        chunk_size: Optional[int] = None,
        **layer_options: Any,
    ) -> None:
        if not (projections is None or projections == "auto"
                or (isinstance(projections, int) and not isinstance(projections, bool)
                    and projections > 0)):
            raise InputError(
                f"projections must be None, 'auto' or a positive number of random "
                f"directions; got {projections!r}"
            )
        self.decomposition = PointSpecific(model, layer, head=head, reference=reference,
                                           **layer_options)
        self.engine = self.decomposition.engine
        self.model = model
        self.projections = projections
        self.seed = seed
        self.chunk_size = chunk_size
        #: Heads found to lack a forward-mode derivative (not tried again).
        self.without_forward_mode: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def matrices(self, images1: Tensor, images2: Tensor) -> CorrespondenceMatrices:
        """The matrices of the pairs ``(images1[b], images2[b])``, each batch ``(B, C, H,
        W)`` (the two sides may differ in size). The model's mode, hooks and gradients
        are left as they were."""
        _check_pairs(images1, images2)
        with preserved_state(self.model, eval_mode=True):
            if images1.shape == images2.shape:
                side1, side2 = self._split_sides(self._sides(torch.cat([images1, images2])),
                                                 images1.shape[0])
            else:
                side1, side2 = self._sides(images1).resolve(), self._sides(images2).resolve()
        return self.join(side1, side2)

    # --------------------------------------------------------------- shares of a side

    def _sides(self, images: Tensor) -> "PendingShares":
        layer = self.engine.feature_layer(images[:2])
        image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        split = head_split(self.engine, images)[1] if self.engine.eval_mode else None
        if isinstance(split, HeadSplit):
            embeddings, crossing = run_trunk(split, self.model, images, self.engine.output)
            return PendingShares(self, layer, image_hw, embeddings, split=split, crossing=crossing)
        with self.engine.session():
            activation, embeddings = self.engine.forward(images, layer)
        return PendingShares(self, layer, image_hw, embeddings, activation=activation)

    @staticmethod
    def _split_sides(pending: PendingShares, count: int) -> tuple[LocationShares, LocationShares]:
        both = pending.resolve()
        return both[:count], both[count:]

    def shares_from_crossing(
        self, split: HeadSplit, layer: FeatureLayer, crossing: Sequence[Tensor],
        image_hw: tuple[int, int], embeddings: Optional[Tensor] = None,
    ) -> "LocationShares":
        """One side's shares from the values crossing the cut (stored by a
        :class:`~simexplain.GalleryIndex`, or from :func:`~simexplain.engine.run_trunk`),
        and its raw embeddings ``(N, d)`` (computed by the head when not given)."""
        crossing = tuple(crossing)
        if embeddings is None:
            with preserved_state(self.model, eval_mode=True), torch.no_grad():
                embeddings = torch.cat([
                    head_embeddings(split.head(*values), stop - start, self.engine.output)
                    for start, stop, values in stored_chunks(self.model, split, [crossing],
                                                             self.chunk_size)])
            crossing = tuple(c.to(embeddings.device, embeddings.dtype) for c in crossing)
        return PendingShares(self, layer, image_hw, embeddings, split=split,
                        crossing=crossing).resolve()

    def basis(self, dim: int, device: torch.device) -> Optional[Tensor]:
        """The estimate's directions ``(r, d)`` (``None``: every coordinate)."""
        count = self.projections
        if count == "auto":
            count = None if dim <= AUTO_COORDINATES else AUTO_PROJECTIONS
        if count is None or count >= dim:
            return None
        generator = torch.Generator().manual_seed(self.seed)
        gaussian = torch.randn(dim, count, generator=generator, dtype=torch.float64)
        orthonormal, upper = torch.linalg.qr(gaussian)
        # signs fixed so the directions are uniformly (Haar) distributed
        orthonormal = orthonormal * torch.sign(torch.diagonal(upper))
        return (orthonormal.T * (dim / count) ** 0.5).to(device, torch.float32)

    # --------------------------------------------------------------- the matrix

    def join(self, side1: "LocationShares", side2: "LocationShares") -> CorrespondenceMatrices:
        """The matrices of pairs whose sides' shares are given (:meth:`matrices` computes
        them from images, :meth:`shares_from_crossing` from stored values)."""
        if side1.exact != side2.exact:
            raise LayerError("the two images' layers gave different kinds of shares")
        basis = side1.basis if side1.basis is not None else side2.basis
        side1, side2 = side1.in_basis(basis), side2.in_basis(basis)
        located = [self.decomposition.centred_shares(side.shares[None],
                                                     side.embeddings.float()[None], basis)
                   for side in (side1, side2)]
        (shares1, embeddings1), (shares2, embeddings2) = located
        intensity = pair_intensity(shares1[0], shares2[0], embeddings1[0], embeddings2[0])
        batch, h1, w1, h2, w2 = intensity.shape
        scores = (F.normalize(embeddings1[0], dim=-1) * F.normalize(embeddings2[0], dim=-1)).sum(-1)
        count = None if basis is None else int(basis.shape[0])
        return CorrespondenceMatrices(
            matrix=intensity.reshape(batch, h1 * w1, h2 * w2).detach(),
            scores=scores.detach(),
            grids=((h1, w1), (h2, w2)),
            exact=side1.exact,
            projections=count,
            layer=side1.layer,
        )


def _check_pairs(images1: Any, images2: Any) -> None:
    for name, images in (("images1", images1), ("images2", images2)):
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"{name} must be a batch of images (B, C, H, W); got {shape}")
        if not images.is_floating_point():
            raise InputError(f"{name} holds {images.dtype} values; pass float images, "
                             "normalised as the model expects")
    if images1.shape[0] != images2.shape[0] or images1.shape[1] != images2.shape[1]:
        raise InputError(
            f"the pairs' two sides must hold as many images with as many channels: got "
            f"{tuple(images1.shape)} and {tuple(images2.shape)}"
        )
