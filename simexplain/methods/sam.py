"""Paper SAM: GradCAM of ``s_i = w . f_i``, with the criterion vector ``w`` from the tuple.

See :mod:`simexplain.methods.criteria` for ``w`` and METHOD.md section 1 for the method.
``w`` is held fixed by default (one backward pass for every image of a chunk);
``detach_weights=False`` also differentiates through it (one pass per slot).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from ..engine.score import Scores, SimilarityScore
from ..engine.tuples import check_target, tuple_kind
from ..errors import InputError
from .base import SimilarityMethod, TensorTuple, register_method
from .criteria import WeightFn, criterion_weights, rescaled_weights, similarity_scores

__all__ = ["SAMScore", "SAMMethod"]


@dataclass(frozen=True)
class SAMScore(SimilarityScore):
    """Paper SAM's score ``s_i = w . f_i`` on L2-normalised embeddings.

    Args:
        target: pairs only: whether each pair is same-class, a bool tensor ``(B,)`` (or
            one bool for all); ``None`` for triplets and quadruplets.
        weight_fn: another criterion, ``weight_fn(*embeddings) -> w``; ``target`` is then
            ignored (see :mod:`simexplain.methods.criteria`).
        detach_weights: hold ``w`` fixed (one backward pass); ``False`` also
            differentiates through ``w``.

    >>> import torch
    >>> f = torch.tensor([[[3.0, 4.0]], [[4.0, 3.0]]])          # a pair, (T, B, d)
    >>> SAMScore(True).bind(2, 1)(f).values                     # w = 1 - |f1 - f2|
    tensor([[1.1200, 1.1200]])
    """

    target: Any = None
    weight_fn: Optional[WeightFn] = None
    detach_weights: bool = True
    rescale: bool = False
    same_class: Optional[Tensor] = dataclasses.field(default=None, repr=False)

    @property
    def partners_fixed(self) -> bool:  # type: ignore[override]
        return self.detach_weights

    def bind(self, num_slots: int, batch: int) -> "SAMScore":
        if self.weight_fn is not None and self.rescale:
            raise InputError("weight_fn= gives w itself; it cannot be rescaled too")
        if self.weight_fn is not None:
            return self
        return dataclasses.replace(self, same_class=check_target(self.target, num_slots, batch))

    def chunk(self, start: int, stop: int) -> "SAMScore":
        if self.same_class is None:
            return self
        return dataclasses.replace(self, same_class=self.same_class[start:stop])

    def kind(self, num_slots: int) -> str:
        return tuple_kind(num_slots, self.same_class, self.weight_fn is not None)

    def weights(self, per_slot: list[Tensor]) -> Tensor:
        """``w`` ``(B, d)`` of a chunk of tuples from their slots' normalised embeddings."""
        if self.rescale:
            return rescaled_weights(per_slot, self.same_class)
        return criterion_weights(per_slot, self.same_class, self.weight_fn)

    def __call__(self, embeddings: Tensor) -> Scores:
        per_slot = list(F.normalize(embeddings, dim=-1).unbind(0))
        weights = self.weights(per_slot)
        if self.detach_weights:
            weights = weights.detach()
        return Scores(similarity_scores(weights, per_slot), weights)

    def fixed_at(self, embeddings: Tensor) -> Callable[[int, Tensor], Tensor]:
        weights = self.weights(list(F.normalize(embeddings, dim=-1).unbind(0))).detach()

        def score(slot: int, f: Tensor) -> Tensor:
            return (weights * F.normalize(f, dim=-1)).sum(dim=-1)

        return score


@register_method
class SAMMethod(SimilarityMethod):
    """SAM, the paper's method: GradCAM of :class:`SAMScore`.

    ``explain(tuples, same_class=None, **options)``: pairs need ``same_class`` (a bool
    per pair); triplets and quadruplets take their roles from position. ``options``:
    ``weight_fn``, ``detach_weights`` (see :class:`SAMScore`), ``relu_attributions``
    and ``chunk_size``. Maps are non-negative (ReLU).
    """

    name = "sam"

    def score(
        self, target: Any = None, weight_fn: Optional[WeightFn] = None,
        detach_weights: bool = True,
    ) -> SAMScore:
        return SAMScore(target, weight_fn=weight_fn, detach_weights=detach_weights)

    def explain(
        self,
        tuples: TensorTuple,
        same_class: Any = None,
        *,
        weight_fn: Optional[WeightFn] = None,
        detach_weights: bool = True,
        relu_attributions: bool = True,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        score = self.score(same_class, weight_fn, detach_weights)
        return self.gradcam(tuples, score, relu_attributions, chunk_size)
