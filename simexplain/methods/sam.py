"""Paper SAM: GradCAM of ``s_i = w . f_i``, with the criterion vector ``w`` from the tuple.

See :mod:`simexplain.methods.criteria` for ``w`` and METHOD.md section 1 for the method.
``w`` is held fixed by default (one backward pass for every image of a chunk);
``detach_weights=False`` also differentiates through it (one pass per slot).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.score import Scores, SimilarityScore
from ..errors import InputError
from .base import SimilarityMethod, TensorTuple, register_method
from .criteria import WeightFn, criterion_weights, similarity_scores

__all__ = ["SAMScore", "SAMMethod", "check_target", "tuple_kind"]


def tuple_kind(num_slots: int, same_class: Optional[Tensor], custom: bool) -> str:
    """Name the kind of tuple explained from its size and, for pairs, ``same_class``."""
    if custom:
        return "custom"
    if num_slots == 2:
        if same_class is None:
            return "pair"
        if bool(same_class.all()):
            return "same_pair"
        return "different_pair" if not bool(same_class.any()) else "pair"
    return "triplet" if num_slots == 3 else "quadruplet"


def check_target(target: Any, num_slots: int, batch: int) -> Optional[Tensor]:
    """Pairs' same-class flags ``(B,)`` from ``target``; ``None`` for larger tuples."""
    if num_slots != 2:
        if target is not None:
            raise InputError(
                f"target is only used for pairs (same-class or not); a {num_slots}-image "
                "tuple has its roles fixed by position, so pass target=None"
            )
        return None
    if target is None:
        raise InputError(
            "pairs need target: a bool tensor (B,) saying whether each pair is same-class "
            "(True) or different-class (False); or pass weight_fn= for another criterion"
        )
    try:
        flags = torch.as_tensor(target).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"target must hold booleans (same-class or not), got {target!r}") from None
    if flags.dtype != torch.bool:
        if flags.is_floating_point() or not bool(((flags == 0) | (flags == 1)).all()):
            raise InputError(f"target must hold booleans (same-class or not), got {target!r}")
        flags = flags.bool()
    if flags.numel() == 1:
        flags = flags.expand(batch)
    if flags.numel() != batch:
        raise InputError(
            f"target has {flags.numel()} entries for {batch} pairs; pass one bool per pair"
        )
    return flags


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

    >>> f = torch.tensor([[[3.0, 4.0]], [[4.0, 3.0]]])          # a pair, (T, B, d)
    >>> SAMScore(True).bind(2, 1)(f).values                     # w = 1 - |f1 - f2|
    tensor([[1.1200, 1.1200]])
    """

    target: Any = None
    weight_fn: Optional[WeightFn] = None
    detach_weights: bool = True
    same_class: Optional[Tensor] = dataclasses.field(default=None, repr=False)

    @property
    def partners_fixed(self) -> bool:  # type: ignore[override]
        return self.detach_weights

    def bind(self, num_slots: int, batch: int) -> "SAMScore":
        if self.weight_fn is not None:
            return self
        return dataclasses.replace(self, same_class=check_target(self.target, num_slots, batch))

    def chunk(self, start: int, stop: int) -> "SAMScore":
        if self.same_class is None:
            return self
        return dataclasses.replace(self, same_class=self.same_class[start:stop])

    def kind(self, num_slots: int) -> str:
        return tuple_kind(num_slots, self.same_class, self.weight_fn is not None)

    def __call__(self, embeddings: Tensor) -> Scores:
        per_slot = list(F.normalize(embeddings, dim=-1).unbind(0))
        weights = criterion_weights(per_slot, self.same_class, self.weight_fn)
        if self.detach_weights:
            weights = weights.detach()
        return Scores(similarity_scores(weights, per_slot), weights)


@register_method
class SAMMethod(SimilarityMethod):
    """SAM, the paper's method: GradCAM of :class:`SAMScore`.

    ``explain(tuples, same_class=None, **options)``: pairs need ``same_class`` (a bool
    per pair); triplets and quadruplets take their roles from position. ``options``:
    ``weight_fn``, ``detach_weights`` (see :class:`SAMScore`), ``relu_attributions``
    and ``chunk_size``. Maps are non-negative (ReLU).
    """

    name = "sam"

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
        score = SAMScore(same_class, weight_fn=weight_fn, detach_weights=detach_weights)
        return self.gradcam(tuples, score, relu_attributions, chunk_size)
