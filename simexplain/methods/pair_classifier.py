"""A same/different classifier on pairs of embeddings, and GradCAM of its logit.

This is the baseline of the paper's Table 1: a similarity model given a classification
head only so that GradCAM has a logit to explain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.score import Scores, SimilarityScore
from ..engine.state import preserved_state
from ..engine.target_layer import LayerSpec
from ..errors import InputError
from .base import SimilarityMethod, TensorTuple, register_method

__all__ = ["PairClassifierHead", "train_pair_head", "PairClassifierScore", "BCEGradCAM"]


class PairClassifierHead(nn.Module):
    """Same/different classifier on a pair of embeddings: a logit from ``[|f1 - f2|, f1 * f2]``
    of the L2-normalised embeddings (symmetric in the two images).

    Args:
        dim: embedding dimension ``d``.
        hidden: width of one hidden ReLU layer, or ``None`` for a linear classifier.

    >>> head = PairClassifierHead(8)
    >>> head(torch.randn(5, 8), torch.randn(5, 8)).shape
    torch.Size([5])
    """

    def __init__(self, dim: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        if hidden is None:
            self.classifier: nn.Module = nn.Linear(2 * dim, 1)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        """The logit of "same class" for each pair, shape ``(B,)``."""
        f1, f2 = F.normalize(f1, dim=-1), F.normalize(f2, dim=-1)
        return self.classifier(torch.cat([(f1 - f2).abs(), f1 * f2], dim=1)).squeeze(1)


PairBatches = Union[tuple[Tensor, Tensor, Tensor], Iterable[tuple[Tensor, Tensor, Tensor]]]


def train_pair_head(
    model: nn.Module,
    pairs: PairBatches,
    epochs: int = 1,
    *,
    head: Optional[PairClassifierHead] = None,
    hidden: Optional[int] = None,
    lr: float = 1e-2,
    batch_size: int = 32,
    train_backbone: bool = False,
) -> PairClassifierHead:
    """Train a :class:`PairClassifierHead` with BCE on same/different pairs.

    Args:
        model: the embedding model. Frozen and in eval mode unless ``train_backbone``,
            which trains it too, in train mode; its modes and ``requires_grad`` flags
            are restored afterwards (its weights keep the training).
        pairs: ``(x1, x2, same)`` tensors (``same``: bool ``(N,)``), split into batches
            of ``batch_size``; or an iterable (e.g. a DataLoader) of such batches.
        epochs: passes over ``pairs``.
        head: a head to keep training (default: a new one, ``hidden`` wide).
        lr: Adam's learning rate.

    Returns:
        The trained head, in eval mode, on the embeddings' device and dtype.
    """
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    optimizer: Optional[torch.optim.Optimizer] = None
    with torch.inference_mode(False), torch.enable_grad(), preserved_state(model, eval_mode=True):
        for _ in range(epochs):
            for x1, x2, same in _pair_batches(pairs, batch_size):
                if train_backbone:
                    model.train()
                    f1, f2 = model(x1), model(x2)
                else:
                    with torch.no_grad():
                        f1, f2 = model(x1), model(x2)
                if head is None:
                    head = PairClassifierHead(f1.shape[1], hidden).to(f1.device, f1.dtype)
                if optimizer is None:
                    parameters = list(head.parameters())
                    if train_backbone:
                        parameters += [p for p in model.parameters() if p.requires_grad]
                    optimizer = torch.optim.Adam(parameters, lr=lr)
                head.train()
                logits = head(f1, f2)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, same.to(logits))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    if head is None:
        raise InputError("pairs held no batches to train on")
    return head.eval()


def _pair_batches(pairs: PairBatches, batch_size: int) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    if isinstance(pairs, (tuple, list)) and len(pairs) == 3 and isinstance(pairs[0], Tensor):
        x1, x2, same = pairs
        if not (x1.shape[0] == x2.shape[0] == torch.as_tensor(same).shape[0]):
            raise InputError("x1, x2 and same must hold the same number of pairs")
        same = torch.as_tensor(same)
        return [
            (x1[i : i + batch_size], x2[i : i + batch_size], same[i : i + batch_size])
            for i in range(0, x1.shape[0], batch_size)
        ]
    return pairs

@dataclass(frozen=True)
class PairClassifierScore(SimilarityScore):
    """Image 1's score is ``head(f1, f2)`` with ``f2`` fixed, image 2's ``head(f1, f2)``
    with ``f1`` fixed; negated for pairs whose ``same_class`` is ``False``."""

    head: nn.Module
    same_class: Any = None
    sign: Optional[Tensor] = dataclasses.field(default=None, repr=False)

    def bind(self, num_slots: int, batch: int) -> "PairClassifierScore":
        sign = torch.ones(batch)
        if self.same_class is not None:
            flags = torch.as_tensor(self.same_class).reshape(-1).bool()
            sign = torch.where(flags, 1.0, -1.0).expand(batch)
        return dataclasses.replace(self, sign=sign)

    def chunk(self, start: int, stop: int) -> "PairClassifierScore":
        return dataclasses.replace(self, sign=self.sign[start:stop])

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.head,)

    def __call__(self, embeddings: Tensor) -> Scores:
        f1, f2 = embeddings.unbind(0)
        logits = torch.stack([self.head(f1, f2.detach()), self.head(f1.detach(), f2)])
        return Scores((logits * self.sign.to(logits)).t())


@register_method
class BCEGradCAM(SimilarityMethod):
    """GradCAM of a same/different classifier's logit (the paper's Table 1 baseline).

    Image 1's target is ``head(f1, f2)`` with ``f2`` fixed, image 2's the same with
    ``f1`` fixed. ``explain(tuples, same_class=None)``: pass ``same_class`` (bools) to
    explain "different" (the negated logit) for pairs marked ``False``. Maps are
    non-negative (ReLU). Pairs only.

    Args:
        model: the embedding model.
        head: a trained :class:`PairClassifierHead` (see :func:`train_pair_head`).
        layer: as for :class:`SimilarityMethod`.
    """

    name = "bce_gradcam"
    tuple_sizes = (2,)

    def __init__(
        self, model: nn.Module, head: nn.Module, layer: LayerSpec = None, **layer_options: Any
    ) -> None:
        if not isinstance(head, nn.Module):
            raise InputError(
                "bce_gradcam needs head=: a trained PairClassifierHead (see train_pair_head)"
            )
        super().__init__(model, layer, **layer_options)
        self.head = head

    def _rebuild_options(self) -> dict[str, Any]:
        return {**super()._rebuild_options(), "head": self.head}

    def score(self, target: Any = None) -> PairClassifierScore:
        return PairClassifierScore(self.head, target)

    def explain(
        self, tuples: TensorTuple, same_class: Any = None, chunk_size: Optional[int] = None
    ) -> Tensor:
        return self.gradcam(tuples, self.score(same_class), True, chunk_size)
