"""GradCAM of the cosine: each image's share of its tuple's cosine criterion.

A tuple's criterion is ``sum_{i<j} c_ij cos(f_i, f_j)`` (:func:`cosine_coefficients`);
image ``i``'s score is the part that depends on it, ``sum_j c_ij cos(f_i, f_j)``, with
the other images held fixed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..engine.score import Scores, SimilarityScore
from ..engine.tuples import check_target, tuple_kind
from ..errors import InputError
from .base import SimilarityMethod, TensorTuple, register_method

__all__ = [
    "cosine_coefficients", "check_coefficients", "unit_directions", "CosineScore",
    "GradCAMCosine",
]


def cosine_coefficients(num_slots: int) -> Tensor:
    """The symmetric matrix ``c`` of a tuple's cosine criterion ``sum_{i<j} c_ij cos(f_i, f_j)``.

    Pair: ``cos(f1, f2)``. Triplet: the margin ``cos(a, p) - cos(a, n)``. Quadruplet: the
    sum of the two triplet margins, ``2 cos(a, p) - cos(a, n1) - cos(a, n2)``. Image ``i``'s
    target is the part of the criterion that depends on it, ``sum_j c_ij cos(f_i, f_j)``
    with the other images fixed.

    >>> cosine_coefficients(3)
    tensor([[ 0.,  1., -1.],
            [ 1.,  0.,  0.],
            [-1.,  0.,  0.]])
    """
    upper = {2: [(0, 1, 1.0)], 3: [(0, 1, 1.0), (0, 2, -1.0)]}
    upper[4] = [(0, 1, 2.0), (0, 2, -1.0), (0, 3, -1.0)]
    if num_slots not in upper:
        raise InputError(f"tuples have 2, 3 or 4 images; got {num_slots}")
    coefficients = torch.zeros(num_slots, num_slots)
    for i, j, value in upper[num_slots]:
        coefficients[i, j] = coefficients[j, i] = value
    return coefficients


def check_coefficients(coefficients: Optional[Any], num_slots: int) -> Tensor:
    """The symmetric ``(T, T)`` matrix of a cosine criterion; the default for ``None``."""
    if coefficients is None:
        return cosine_coefficients(num_slots)
    matrix = torch.as_tensor(coefficients, dtype=torch.float32)
    if matrix.shape != (num_slots, num_slots) or not torch.equal(matrix, matrix.T):
        raise InputError(
            f"coefficients must be a symmetric {num_slots}x{num_slots} matrix (one row per "
            f"image of the tuple), got shape {tuple(matrix.shape)}"
        )
    return matrix


@dataclass(frozen=True)
class CosineScore(SimilarityScore):
    """``s_i = sum_j c_ij cos(z_i, z_j)`` with every ``z_j`` (``j != i``) held fixed.

    ``z`` is the L2-normalised embedding, or, with ``centre``, the normalised embedding
    minus ``centre`` (then normalised again): the cosine of the embeddings' departures
    from a reference point, see :class:`~simexplain.methods.PartnerSAM`.

    Args:
        coefficients: the symmetric matrix ``c`` (default :func:`cosine_coefficients`).
        target: pairs only: whether each pair is same-class (a bool per pair, or one for
            all). Different-class pairs explain their dissimilarity: ``c`` changes sign.
            ``None``: every pair explains its similarity.
        centre: ``(d,)`` a point of the unit sphere's neighbourhood to measure from, e.g.
            the mean normalised embedding of a reference set; ``None`` for none.
        norms_fixed: hold the norms of the normalisations fixed (the *contribution*
            reading): the score is then linear in image ``i``'s embedding, its gradient
            is the partners' direction itself, and the map shows what each location
            puts into the score. ``False`` (the *sensitivity* reading) differentiates
            through the normalisation, whose gradient is the partners' component
            orthogonal to ``z_i``: what would make the tuple more similar, zero for an
            identical pair (docs/method.rst). The values are the same either way.

    >>> import torch
    >>> f = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])          # a pair, (T, B, d)
    >>> CosineScore().bind(2, 1)(f).values
    tensor([[0.6000, 0.6000]])
    >>> CosineScore(target=False).bind(2, 1)(f).values
    tensor([[-0.6000, -0.6000]])
    >>> g = f.clone().requires_grad_()
    >>> CosineScore().bind(2, 1)(g).values[0, 0].backward()
    >>> g.grad[0]                                     # sensitivity: orthogonal to f1
    tensor([[0.0000, 0.8000]])
    >>> g.grad = None
    >>> CosineScore(norms_fixed=True).bind(2, 1)(g).values[0, 0].backward()
    >>> g.grad[0]                                     # contribution: the partner itself
    tensor([[0.6000, 0.8000]])
    """

    coefficients: Any = None
    target: Any = None
    centre: Optional[Tensor] = None
    norms_fixed: bool = False
    matrix: Optional[Tensor] = dataclasses.field(default=None, repr=False)
    sign: Optional[Tensor] = dataclasses.field(default=None, repr=False)

    def bind(self, num_slots: int, batch: int) -> "CosineScore":
        same = None if self.target is None else check_target(self.target, num_slots, batch)
        sign = None if same is None else torch.where(same, 1.0, -1.0)
        matrix = check_coefficients(self.coefficients, num_slots)
        return dataclasses.replace(self, matrix=matrix, sign=sign)

    def chunk(self, start: int, stop: int) -> "CosineScore":
        if self.sign is None:
            return self
        return dataclasses.replace(self, sign=self.sign[start:stop])

    def kind(self, num_slots: int) -> str:
        return tuple_kind(num_slots, None if self.sign is None else self.sign > 0, False)

    def __call__(self, embeddings: Tensor) -> Scores:
        normalized = unit_directions(embeddings, self.centre, self.norms_fixed)
        cosines = torch.einsum("ibd,jbd->ijb", normalized, normalized.detach())
        targets = (self.matrix.to(cosines)[:, :, None] * cosines).sum(dim=1)  # (T, B)
        if self.sign is not None:
            targets = targets * self.sign.to(targets)
        return Scores(targets.t())


def unit_directions(
    embeddings: Tensor, centre: Optional[Tensor] = None, norms_fixed: bool = False
) -> Tensor:
    """``z``: the embeddings normalised, minus ``centre`` and normalised again when one is
    given; with ``norms_fixed`` the norms divide as constants (no gradient through them),
    so ``z`` is linear in the embedding and equal in value.

    >>> import torch
    >>> unit_directions(torch.tensor([[3.0, 4.0]]), centre=torch.tensor([0.6, 0.0]))
    tensor([[0., 1.]])
    """
    def scale(x: Tensor) -> Tensor:
        norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x / (norm.detach() if norms_fixed else norm)

    unit = scale(embeddings)
    if centre is None:
        return unit
    check_centre(centre, embeddings)
    return scale(unit - centre.to(unit))


def check_centre(centre: Tensor, embeddings: Tensor) -> None:
    """Raise :class:`~simexplain.errors.InputError` unless ``centre`` ``(d,)`` fits the
    model's ``d``-dimensional ``embeddings``."""
    if centre.shape != embeddings.shape[-1:]:
        raise InputError(
            f"the reference has {centre.shape[-1]}-d embeddings but the model gives "
            f"{embeddings.shape[-1]}-d ones; embed the reference with this model"
        )


@register_method
class GradCAMCosine(SimilarityMethod):
    """GradCAM with a cosine-similarity target for each image, the other images fixed.

    Pair: image 1's target is ``cos(f1, f2)`` with ``f2`` a constant, image 2's
    symmetrically (what pytorch-grad-cam's embedding tutorial does). Triplets and
    quadruplets: see :func:`cosine_coefficients`; e.g. the anchor's target is
    ``cos(a, p) - cos(a, n)``, the positive's ``cos(p, a)``, the negative's
    ``-cos(n, a)``. ``explain(tuples, coefficients=None, relu=True)`` takes any symmetric
    matrix as ``coefficients``; ``same_class=False`` for pairs explains their
    dissimilarity. Maps are non-negative with ``relu=True``.

    For pairs this is SAM with ``weight_fn=lambda f1, f2: f1 + f2`` (``f_i . f_i = 1``
    has no gradient).
    """

    name = "gradcam_cosine"
    rotation_invariant = True

    def score(self, target: Any = None, coefficients: Optional[Any] = None) -> CosineScore:
        return CosineScore(coefficients, target)

    def explain(
        self,
        tuples: TensorTuple,
        coefficients: Optional[Any] = None,
        relu: bool = True,
        chunk_size: Optional[int] = None,
        *,
        same_class: Any = None,
    ) -> Tensor:
        return self.gradcam(tuples, self.score(same_class, coefficients), relu, chunk_size)
