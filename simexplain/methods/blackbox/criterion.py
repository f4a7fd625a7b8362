"""What a black-box map measures: each image's part of its tuple's cosine criterion, its
partners held fixed, the same value the default method (``contribution``) and
``gradcam_cosine`` explain with gradients.

Image ``i`` of a tuple scores ``s_i = sign * sum_j c_ij cos(z_i, z_j)``
(:class:`~simexplain.methods.CosineScore`: ``c`` from
:func:`~simexplain.methods.cosine_coefficients`, ``sign`` -1 for a different-class pair,
``z`` the normalised embedding, measured from a reference's centre when one is given).
With the partners fixed this is linear in ``z_i``: ``s_i = z_i . w_i + sign * c_ii`` with
``w_i = sign * sum_{j != i} c_ij z_j``, so a perturbed image is scored against all of its
partners by one dot product. :class:`ImageRows` scores an image that is in several tuples
(a query and each of its matches) against all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ...engine.maps import full_precision
from ..cosine import CosineScore, unit_directions

__all__ = ["HeldPartners", "TupleGroup", "ImageRows"]


@dataclass(frozen=True)
class HeldPartners:
    """The criterion of ``U = T * B`` images (slot-major: image ``u`` is slot ``u // B`` of
    tuple ``u % B``), each with its partners held at their unperturbed embeddings.

    Attributes:
        directions: ``(U, d)`` each image's ``w_i``.
        offsets: ``(U,)`` each image's constant ``sign * c_ii``.
        centre: the reference's centre the embeddings are measured from, or ``None``.
        values: ``(B, T)`` the tuples' scores as given (the :class:`CosineScore`'s).
        kind: the tuples' kind, e.g. ``"triplet"``.

    >>> import torch
    >>> f = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])          # a pair, (T, B, d)
    >>> held = HeldPartners.of_tuples(f)
    >>> held.values, held(0, torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    (tensor([[0.6000, 0.6000]]), tensor([0.8000, 0.6000]))
    """

    directions: Tensor
    offsets: Tensor
    centre: Optional[Tensor]
    values: Tensor
    kind: str

    @classmethod
    def of_tuples(
        cls, embeddings: Tensor, target: Any = None, coefficients: Optional[Any] = None,
        centre: Optional[Tensor] = None,
    ) -> "HeldPartners":
        """The criterion of tuples embedded as ``embeddings`` ``(T, B, d)``; ``target``
        (pairs' same-class flags) and ``coefficients`` as for :class:`CosineScore`."""
        count, batch, dim = embeddings.shape
        embeddings = full_precision(embeddings)
        score = CosineScore(coefficients, target, centre).bind(count, batch)
        unit = unit_directions(embeddings, centre)
        matrix = score.matrix.to(unit)
        sign = torch.ones(batch).to(unit) if score.sign is None else score.sign.to(unit)
        partners = matrix - torch.diag(torch.diagonal(matrix))
        directions = torch.einsum("ij,jbd->ibd", partners, unit) * sign[None, :, None]
        offsets = torch.diagonal(matrix)[:, None] * sign[None, :]
        return cls(
            directions=directions.reshape(count * batch, dim),
            offsets=offsets.reshape(count * batch),
            centre=None if centre is None else centre.to(unit),
            values=score(embeddings).values,
            kind=score.kind(count),
        )

    def __call__(self, image: int, embeddings: Tensor) -> Tensor:
        """Scores ``(K,)`` of image ``image`` embedded as ``embeddings`` ``(K, d)``."""
        unit = unit_directions(full_precision(embeddings), self.centre)
        return unit @ self.directions[image].to(unit) + self.offsets[image].to(unit)


@dataclass(frozen=True)
class TupleGroup:
    """Tuples of images taken from a pool: ``members`` ``(T, B)`` the pool's image in each
    slot of each tuple; ``target`` and ``coefficients`` as for :class:`CosineScore`."""

    members: Tensor
    target: Any = None
    coefficients: Optional[Any] = None


class ImageRows:
    """The criteria of several groups of tuples over one pool of ``count`` images, each row
    (an image in one tuple, its partners held) filed under its image, so that an image's
    perturbations are embedded once and scored for every tuple it is in.

    Args:
        helds: each group's criterion.
        owners: for each group, the pool image of each of its rows ``(T * B,)``
            (slot-major, as the rows of :class:`HeldPartners`); ``count`` or more for a
            partner given by its embedding alone, whose row is not perturbed.
        count: the pool's number of images.

    >>> import torch
    >>> f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])   # a pool of three images
    >>> members = torch.tensor([[0, 0], [1, 2]])                 # pairs (0, 1) and (0, 2)
    >>> held = HeldPartners.of_tuples(f[members])
    >>> rows = ImageRows([held], [members.reshape(-1)], 3)
    >>> rows(0, f[:1])                                           # image 0 in both pairs
    tensor([[0.6000],
            [0.0000]])
    """

    def __init__(self, helds: Sequence[HeldPartners], owners: Sequence[Tensor],
                 count: int) -> None:
        owner = torch.cat([o.reshape(-1).long().cpu() for o in owners])
        imaged = owner < count
        # the rows of the pool's images, grouped by image
        self.order = torch.argsort(owner, stable=True)[: int(imaged.sum())]
        self.sizes = [len(o.reshape(-1)) for o in owners]
        self.directions = torch.cat([h.directions for h in helds])[self.order.to(
            helds[0].directions.device)]
        self.offsets = torch.cat([h.offsets for h in helds])[self.order.to(
            helds[0].offsets.device)]
        self.centre = helds[0].centre
        bounds = torch.bincount(owner[imaged], minlength=count).cumsum(0)
        self.bounds = [0, *bounds.tolist()]

    def __call__(self, image: int, embeddings: Tensor) -> Tensor:
        """Scores ``(R, K)`` of image ``image``'s ``R`` rows, the image embedded as
        ``embeddings`` ``(K, d)``."""
        rows = slice(self.bounds[image], self.bounds[image + 1])
        unit = unit_directions(full_precision(embeddings), self.centre)
        return (unit @ self.directions[rows].to(unit).T + self.offsets[rows].to(unit)).T

    def unperturbed(self, embeddings: Tensor) -> Tensor:
        """Every row's score ``(R,)``, in this object's order, for the pool embedded as
        ``embeddings`` ``(count, d)``."""
        return torch.cat([self(u, embeddings[u:u + 1]).reshape(-1)
                          for u in range(len(self.bounds) - 1)])

    def split(self, values: Tensor) -> list[Tensor]:
        """``values`` ``(R, ...)`` in this object's order, back in each group's row order;
        NaN for the rows of partners given by their embeddings."""
        rows = values.new_full((sum(self.sizes), *values.shape[1:]), float("nan"))
        rows[self.order.to(values.device)] = values
        return list(rows.split(self.sizes))
