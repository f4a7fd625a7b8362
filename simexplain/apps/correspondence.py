"""``explain_correspondence``: which part of one image the model matched with which part of
the other, and the :class:`Correspondence` it returns (docs/correspondence.rst).

The matrices come from :class:`~simexplain.methods.PairCorrespondence`:
exact for a globally average pooled linear head, a gradient-times-activation estimate for
any other head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..data.preprocessing import ImageLike, preprocess_images, resolve_preprocessing
from ..engine.embeddings import check_model
from ..engine.inputs import integer_images_error
from ..engine.maps import upsample_maps
from ..engine.state import model_device, model_dtype
from ..engine.target_layer import LayerSpec
from ..errors import InputError
from ..methods.correspondence import CorrespondenceMatrices, PairCorrespondence, Projections
from .onnx_model import is_onnx_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Correspondence", "explain_correspondence"]

PairImage = Union[Tensor, ImageLike]


@dataclass
class Correspondence:
    """What each location of image 1 and each location of image 2 put into the pair's
    score, at the layer's resolution.

    Attributes:
        matrix: ``(h1 * w1, h2 * w2)``; ``matrix[p, q]`` is the share of the score of
            cell ``p`` of image 1 with cell ``q`` of image 2, cells numbered row by row
            on the layer's grids ``grids``.
        score: the pair's cosine similarity (measured from the reference's mean when one
            was given): the default method's pair score, which the matrix decomposes.
        grids: the layer's ``(h, w)`` on each image.
        sizes: each image's ``(H, W)`` in input pixels (the two may differ).
        exact: ``matrix.sum()`` equals ``score`` (a pooled linear head); otherwise it is
            the gradient-times-activation estimate and sums to the part of the score
            that passes through the layer's locations.
        image1, image2: the model inputs ``(C, H, W)``, for :meth:`plot` (``None`` where
            they were not kept, e.g. a gallery's images:
            :meth:`RetrievalResult.correspondence <simexplain.RetrievalResult.correspondence>`
            reads them).
        projections: the number of random directions of the estimate, ``None`` for all.
        layer: the layer's name.
        mean, std: the normalisation of the images, used to display them.

    Example:
        >>> import torch, torchvision
        >>> from simexplain import explain_correspondence
        >>> model = torchvision.models.resnet18(num_classes=16)
        >>> pair = explain_correspondence(model, torch.randn(3, 96, 96), torch.randn(3, 96, 96))
        >>> tuple(pair.matrix.shape), pair.exact
        ((9, 9), True)
        >>> points1, points2, scores = pair.matches(3)
        >>> tuple(points1.shape), tuple(pair.map_for(points1[0], side=1).shape)
        ((3, 2), (96, 96))
    """

    matrix: Tensor
    score: float
    grids: tuple[tuple[int, int], tuple[int, int]]
    sizes: tuple[tuple[int, int], tuple[int, int]]
    exact: bool
    image1: Optional[Tensor] = None
    image2: Optional[Tensor] = None
    projections: Optional[int] = None
    layer: str = ""
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def matches(self, n: int = 20) -> tuple[Tensor, Tensor, Tensor]:
        """The ``n`` strongest pairs of locations, best first: ``(points1, points2,
        scores)``, the ``(n, 2)`` integer (row, column) input-pixel centres of the cells
        in image 1 and image 2, and their ``(n,)`` entries of :attr:`matrix`."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"n must be a positive number of matches, got {n!r}")
        n = min(n, self.matrix.numel())
        scores, order = self.matrix.flatten().topk(n)
        cells2 = self.matrix.shape[1]
        return (self._centres(order // cells2, 1), self._centres(order % cells2, 2), scores)

    def map_for(self, point: Any, side: int = 1) -> Tensor:
        """For a ``(row, column)`` input-pixel ``point`` of image ``side`` (1 or 2), the
        map ``(H, W)`` of what matches it on the other image, at that image's size:
        the point's cell's row (side 1) or column (side 2) of :attr:`matrix`,
        bilinearly upsampled (signed, in the matrix's units)."""
        if side not in (1, 2):
            raise InputError(f"side must be 1 or 2 (the image the point lies on), got {side!r}")
        cell = self._cell(point, side)
        other = 2 if side == 1 else 1
        line = self.matrix[cell] if side == 1 else self.matrix[:, cell]
        return upsample_maps(line.reshape(1, *self.grids[other - 1]), self.sizes[other - 1])[0]

    def plot(self, n: int = 20, cmap: str = "viridis") -> "Figure":
        """The two images side by side, joined by lines for the ``n`` strongest matches,
        coloured by their share of the score."""
        from ..viz.correspondence import plot_correspondence

        if self.image1 is None or self.image2 is None:
            raise InputError("this correspondence keeps no images to draw; for a gallery "
                             "match, get it with RetrievalResult.correspondence(query, match)")
        return plot_correspondence(self, n=n, cmap=cmap)

    def save(self, path: "str | os.PathLike[str]", n: int = 20, dpi: int = 150) -> str:
        """Write :meth:`plot` to ``path`` atomically (format from the extension)."""
        from ..viz.figures import save_figure

        return save_figure(self.plot(n=n), path, dpi=dpi)

    def __repr__(self) -> str:
        kind = "exact" if self.exact else (
            "estimate" + (f", {self.projections} projections" if self.projections else ""))
        return (f"Correspondence(grids={self.grids}, score={self.score:.4f}, {kind}, "
                f"layer={self.layer!r})")

    # ------------------------------------------------------------------ geometry

    def _centres(self, cells: Tensor, side: int) -> Tensor:
        """``(n, 2)`` input-pixel (row, column) centres of row-major cells ``(n,)``."""
        (h, w), (height, width) = self.grids[side - 1], self.sizes[side - 1]
        rows = ((cells // w).double() + 0.5) * height / h
        cols = ((cells % w).double() + 0.5) * width / w
        return torch.stack([rows, cols], dim=1).floor().long()

    def _cell(self, point: Any, side: int) -> int:
        try:
            row, col = (float(v) for v in torch.as_tensor(point).flatten().tolist())
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"point must be (row, column) in input pixels, got {point!r}"
                             ) from None
        (h, w), (height, width) = self.grids[side - 1], self.sizes[side - 1]
        if not (0 <= row < height and 0 <= col < width):
            raise InputError(f"point ({row:g}, {col:g}) lies outside image {side}'s "
                             f"{height}x{width} pixels; give (row, column) with "
                             f"0 <= row < {height} and 0 <= column < {width}")
        return int(row * h // height) * w + int(col * w // width)


def correspondences_of(
    result: CorrespondenceMatrices, images1: Optional[Tensor], images2: Optional[Tensor],
    sizes: tuple[tuple[int, int], tuple[int, int]],
    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
) -> list[Correspondence]:
    """One :class:`Correspondence` per pair of a batch's matrices (``images1``,
    ``images2``: ``(B, C, H, W)`` to keep with them, or ``None``)."""
    return [
        Correspondence(
            matrix=result.matrix[b].cpu(), score=float(result.scores[b]), grids=result.grids,
            sizes=sizes, exact=result.exact,
            image1=None if images1 is None else images1[b].detach().cpu(),
            image2=None if images2 is None else images2[b].detach().cpu(),
            projections=result.projections, layer=result.layer, mean=mean, std=std,
        )
        for b in range(result.matrix.shape[0])
    ]


def explain_correspondence(
    model: nn.Module,
    image1: Union[PairImage, Sequence[ImageLike]],
    image2: Union[PairImage, Sequence[ImageLike]],
    layer: LayerSpec = None,
    *,
    reference: Optional[Tensor] = None,
    transform: Any = None,
    projections: Projections = "auto",
    seed: int = 0,
    chunk_size: Optional[int] = None,
    **layer_options: Any,
) -> Union[Correspondence, list[Correspondence]]:
    """Which locations of ``image1`` the model matched with which locations of ``image2``.

    Args:
        model: a PyTorch embedding model (images ``(N, C, H, W)`` to ``(N, d)``).
        image1, image2: a path, a PIL image, a ``(C, H, W)`` or ``(1, C, H, W)`` tensor
            (one pair), or ``(B, C, H, W)`` tensors or lists of ``B`` paths / PIL images
            (``B`` pairs, explained together). Paths and PIL images are preprocessed as
            :func:`~simexplain.explain` does (``transform``, timm's config or ImageNet's).
        layer: the layer whose locations are matched (default: the last spatial layer).
        reference: embeddings ``(N, d)`` or images to measure the embeddings from, as
            for the default method.
        transform: preprocessing for paths and PIL images.
        projections, seed: the any-head estimate's random directions
            (:class:`~simexplain.methods.PairCorrespondence`).
        chunk_size: pairs per head pass.
        **layer_options: ``head=`` (the exact path's linear head), and the engine's
            options (``layout=``, ``output=``, ...).

    Returns:
        A :class:`Correspondence` for one pair, a list of them for ``B > 1`` pairs.
    """
    if is_onnx_model(model) or not isinstance(model, nn.Module):
        raise InputError(
            "correspondence maps read the model's layer and its gradient, which an ONNX "
            "model or a plain function does not expose; pass the PyTorch model (or its "
            "torch.export program)"
        )
    check_model(model)
    images1, preprocessing1 = _as_images(model, image1, transform, "image1")
    images2, preprocessing2 = _as_images(model, image2, transform, "image2")
    preprocessing = preprocessing1 or preprocessing2
    if images1.shape[0] != images2.shape[0]:
        raise InputError(f"image1 holds {images1.shape[0]} images and image2 "
                         f"{images2.shape[0]}; give one partner per image")
    device = model_device(model) or torch.device("cpu")
    dtype = model_dtype(model) or images1.dtype
    method = PairCorrespondence(model, layer, reference=reference, projections=projections,
                                seed=seed, chunk_size=chunk_size, **layer_options)
    result = method.matrices(images1.to(device, dtype), images2.to(device, dtype))
    sizes = ((int(images1.shape[-2]), int(images1.shape[-1])),
             (int(images2.shape[-2]), int(images2.shape[-1])))
    pairs = correspondences_of(
        result, images1, images2, sizes,
        mean=None if preprocessing is None else preprocessing.mean,
        std=None if preprocessing is None else preprocessing.std,
    )
    return pairs[0] if len(pairs) == 1 else pairs


def _as_images(model: nn.Module, images: Any, transform: Any, name: str) -> tuple[Tensor, Any]:
    """A batch ``(B, C, H, W)`` and the preprocessing used (``None`` for tensors)."""
    if isinstance(images, Tensor):
        if not images.is_floating_point():
            raise integer_images_error(name, images.dtype)
        if images.dim() == 3:
            return images.unsqueeze(0), None
        if images.dim() == 4:
            return images, None
        raise InputError(f"{name} has shape {tuple(images.shape)}; pass one image (C, H, W) "
                         "or a batch (B, C, H, W)")
    files = list(images) if isinstance(images, (list, tuple)) else [images]
    if not files or any(isinstance(f, Tensor) for f in files):
        raise InputError(f"{name} must be a path, a PIL image, a tensor, or a list of paths "
                         "or PIL images")
    preprocessing = resolve_preprocessing(model, transform)
    return preprocess_images(files, preprocessing), preprocessing
