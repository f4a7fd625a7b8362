"""The contract between the engine and a GradCAM-style method: the per-image score of a tuple.

A method says what it explains by one scalar ``s_i`` per image of each tuple, computed
from the tuple's embeddings; the engine turns the gradient of ``s_i`` at the explained
layer into image ``i``'s map. Paper SAM scores ``s_i = w . f_i`` with ``w`` from the
tuple; GradCAM of the cosine scores ``s_i = sum_j c_ij cos(f_i, f_j)``.

A new method is a subclass that implements ``__call__``::

    >>> import torch
    >>> import torch.nn.functional as F
    >>> class NormScore(SimilarityScore):
    ...     '''Each image's embedding norm (depends on that image alone).'''
    ...     def __call__(self, embeddings):
    ...         return Scores(embeddings.norm(dim=-1).t())
    >>> NormScore()(torch.ones(3, 2, 4)).values
    tensor([[2., 2., 2.],
            [2., 2., 2.]])
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from torch import Tensor, nn

from .tuples import size_kind

__all__ = ["Scores", "SimilarityScore"]


class Scores(NamedTuple):
    """What a :class:`SimilarityScore` returns for a chunk of ``B`` tuples of ``T`` images:
    ``values`` ``(B, T)``, the score ``s_i`` of every image of every tuple, and ``weights``
    ``(B, d)``, the criterion vector of each tuple for methods that have one (paper SAM's
    ``w``), else ``None``."""

    values: Tensor
    weights: Optional[Tensor] = None


class SimilarityScore:
    """The per-image score of a tuple, whose gradient at the layer makes each image's map.

    Subclasses implement :meth:`__call__`. The other methods have defaults for scores
    without per-tuple options.

    Attributes:
        partners_fixed: whether ``s_i`` depends on image ``i``'s embedding alone, its
            partners' embeddings entering as constants (detached). Then one backward pass
            of ``sum_i s_i`` gives every image's gradient exactly. When ``False`` the engine
            takes one backward pass per slot of the tuple.
    """

    partners_fixed: bool = True

    def __call__(self, embeddings: Tensor) -> Scores:
        """The scores of a chunk of tuples from their raw embeddings ``(T, B, d)``."""
        raise NotImplementedError

    def bind(self, num_slots: int, batch: int) -> "SimilarityScore":
        """This score for ``batch`` tuples of ``num_slots`` images, its per-tuple options
        checked against them (raise :class:`~simexplain.errors.InputError` when they do
        not fit). The default has no such options and returns itself."""
        return self

    def chunk(self, start: int, stop: int) -> "SimilarityScore":
        """This (bound) score for tuples ``start`` to ``stop - 1`` only: per-tuple options
        cut to them. The default has none and returns itself."""
        return self

    def kind(self, num_slots: int) -> str:
        """The name of the tuples explained, e.g. ``"triplet"``."""
        return size_kind(num_slots)

    def modules(self) -> tuple[nn.Module, ...]:
        """Modules the score runs besides the model (e.g. a classifier head); the engine
        puts them in eval mode and restores them as it does the model."""
        return ()

    def fixed_at(self, embeddings: Tensor) -> Callable[[int, Tensor], Tensor]:
        """``score(slot, f)``: the score ``(N,)`` of images embedded as ``f`` ``(N, d)`` in
        slot ``slot``, their partners (and anything computed from them) held at the
        tuple's ``embeddings`` ``(T, N, d)``. The function captum's metrics perturb
        (:class:`~simexplain.attribution.TupleScore`); by default it puts ``f`` in place of
        the slot's embeddings and reads the slot's score."""

        def score(slot: int, f: Tensor) -> Tensor:
            mixed = embeddings.clone()
            mixed[slot] = f
            return self(mixed).values[:, slot]

        return score
