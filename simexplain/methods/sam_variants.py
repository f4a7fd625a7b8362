"""Two changes to paper SAM's weights that keep its per-dimension form (measured, not the
default; docs/method.rst and ``benchmarks/results/discriminative.md`` compare them).

* ``sam_rescaled``: the paper's ``w`` with each ``|f_a - f_j|`` rescaled to ``[0, 1]``
  (:func:`~simexplain.methods.criteria.rescaled_weights`), so that the partner changes
  ``w`` by order one whatever the dimension.
* ``sam_contrib``: the criterion split over dimensions, ``c_k = 1/2 sum_ij C_ij z_ik z_jk``
  (pair: ``z1_k z2_k``; triplet: ``za_k (zp_k - zn_k)``), keeping the dimensions that
  support it (``c_k > 0``, or weighted by ``max(c_k, 0)``), and scoring image ``i`` by
  its contribution to the criterion on them, partners and norms fixed. Keeping every
  dimension gives ``contribution`` exactly.

Both weigh coordinates one by one, so their maps change when the embedding space is
rotated (no distance does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..engine.score import Scores
from ..errors import InputError
from .base import SimilarityMethod, TensorTuple, register_method
from .centre import CentredMethod
from .cosine import CosineScore, unit_directions
from .sam import SAMScore

__all__ = ["SupportingDimensionsScore", "SAMRescaled", "SAMContributions"]

SELECTIONS = ("hard", "soft")


@dataclass(frozen=True)
class SupportingDimensionsScore(CosineScore):
    """``s_i = sum_k m_k z_ik (sum_j c_ij z_jk)`` with partners, norms and ``m`` held
    fixed; ``m`` keeps the dimensions whose contribution to the criterion is positive
    (``"hard"``) or weighs them by it (``"soft"``, ``max(c_k, 0) / max_k c_k``).

    >>> import torch
    >>> f = torch.tensor([[[1.0, 1.0, 0.0]], [[1.0, -1.0, 0.0]]])   # a pair, (T, B, d)
    >>> SupportingDimensionsScore().bind(2, 1)(f).values          # only dimension 0 agrees
    tensor([[0.5000, 0.5000]])
    """

    selection: str = "hard"

    def bind(self, num_slots: int, batch: int) -> "SupportingDimensionsScore":
        if self.selection not in SELECTIONS:
            raise InputError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        return super().bind(num_slots, batch)

    def __call__(self, embeddings: Tensor) -> Scores:
        unit = unit_directions(embeddings, self.centre, norms_fixed=True)
        coefficients = self.matrix.to(unit)[:, :, None]  # (T, T, 1)
        if self.sign is not None:
            coefficients = coefficients * self.sign.to(unit)  # (T, T, B)
        partners = torch.einsum("ijb,jbd->ibd", coefficients.expand(-1, -1, unit.shape[1]),
                                unit.detach())
        contribution = 0.5 * (unit.detach() * partners).sum(dim=0)  # (B, d), sums to c
        if self.selection == "hard":
            keep = (contribution > 0).to(unit)
        else:
            positive = contribution.clamp_min(0)
            keep = positive / positive.amax(dim=-1, keepdim=True).clamp_min(
                torch.finfo(unit.dtype).tiny)
        return Scores((unit * partners * keep).sum(dim=-1).t())


@register_method
class SAMRescaled(SimilarityMethod):
    """Paper SAM with its ``|f_a - f_j|`` rescaled to ``[0, 1]`` per tuple (module docs).

    ``explain(tuples, same_class=None)``, options as for
    :class:`~simexplain.methods.SAMMethod`.
    """

    name = "sam_rescaled"

    def score(self, target: Any = None, detach_weights: bool = True) -> SAMScore:
        return SAMScore(target, detach_weights=detach_weights, rescale=True)

    def explain(
        self,
        tuples: TensorTuple,
        same_class: Any = None,
        *,
        relu_attributions: bool = True,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        return self.gradcam(tuples, self.score(same_class), relu_attributions, chunk_size)


@register_method
class SAMContributions(CentredMethod):
    """The criterion's supporting dimensions, each image scored by its contribution to
    them (:class:`SupportingDimensionsScore`); ``reference=`` as for
    :class:`~simexplain.methods.Contribution`.

    ``explain(tuples, same_class=None, selection="hard", coefficients=None, relu=True)``.
    """

    name = "sam_contrib"

    def score(
        self, target: Any = None, coefficients: Optional[Any] = None, selection: str = "hard"
    ) -> SupportingDimensionsScore:
        return SupportingDimensionsScore(coefficients, target, self.centre, selection=selection)

    def explain(
        self,
        tuples: TensorTuple,
        same_class: Any = None,
        selection: str = "hard",
        coefficients: Optional[Any] = None,
        relu: bool = True,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        score = self.score(same_class, coefficients, selection)
        return self.gradcam(tuples, score, relu, chunk_size)
