"""Similarity mining: training an embedding model with its own similarity maps.

Section 2 of the project's METHOD.md (after Zheng et al., "Visual Similarity Attention"):
each tuple's maps, computed with a graph, soft-mask its images where the maps are high;
the masked images are embedded again, and the mining term is small when the masked
tuple no longer meets its criterion (the anchor is no nearer its positive than its
negative), i.e. when the maps have found all of the evidence. The total loss is
``L = L_ml + gamma * L_sm`` with any metric-learning loss ``L_ml``.

Pieces, from small to large: :func:`soft_mask`; the per-tuple mining terms and
:class:`SimilarityMiningLoss` on embeddings of masked images; and :class:`SAMLoss`,
which runs the whole step on tuples of images or on a batch with labels plus a
pytorch-metric-learning miner or ``indices_tuple``.

Which activations the maps use: those of the training forward pass itself (train
mode, so BatchNorm normalises with the batch's statistics), the very pass whose
embeddings the metric loss sees. This costs no extra forward, and the maps explain the
network as it is being trained. The masked images go through a second forward, also in
train mode, but with BatchNorm's running statistics frozen for it: masked images are
not the distribution the model will see at test time, so they must not shift the
running mean and variance.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attribution import EmbeddingAttribution, check_tuple_inputs
from .errors import InputError
from .labels import check_index_tuples, check_labels
from .layers import FeatureLayer, LayerSpec, embedding_matrix
from .maps import scale_maps, upsample_maps
from .weights import l2_normalize, weights_for_kind

__all__ = [
    "soft_mask",
    "triplet_mining_term",
    "same_pair_mining_term",
    "quadruplet_mining_term",
    "SimilarityMiningLoss",
    "SAMLoss",
    "SAMLossParts",
    "frozen_norm_statistics",
]

# A small floor under squared distances: keeps the distance's gradient finite when
# two masked embeddings coincide.
_DISTANCE_EPS = 1e-12


def soft_mask(images: Tensor, maps: Tensor, alpha: float = 10.0, beta: float = 0.5) -> Tensor:
    """Erase each image softly where its map is high: ``x * (1 - sigmoid(alpha (M - beta)))``.

    Args:
        images: ``(N, C, H, W)``.
        maps: ``(N, 1, h, w)`` or ``(N, h, w)`` at any resolution; they are upsampled
            to the images and scaled to [0, 1] (divided by their maximum) first.
        alpha: steepness of the mask (> 0); large values approach a hard threshold.
        beta: the map value (in [0, 1]) at which half of the pixel is erased.

    Example:
        >>> import torch
        >>> images = torch.ones(1, 3, 4, 4)
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> masked = soft_mask(images, maps, alpha=50)
        >>> round(float(masked[0, 0, 0, 3]), 3), round(float(masked[0, 0, 3, 0]), 3)
        (0.0, 1.0)
    """
    _check_mask_parameters(alpha, beta)
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise InputError(f"maps must have one channel, got shape {tuple(maps.shape)}")
        maps = maps[:, 0]
    if maps.dim() != 3 or images.dim() != 4 or maps.shape[0] != images.shape[0]:
        raise InputError(
            f"soft_mask needs images (N, C, H, W) and one map per image, (N, h, w) or "
            f"(N, 1, h, w); got images {tuple(images.shape)} and maps {tuple(maps.shape)}"
        )
    scaled = scale_maps(upsample_maps(maps, (images.shape[-2], images.shape[-1])))
    keep = 1 - torch.sigmoid(alpha * (scaled - beta))
    return images * keep.unsqueeze(1).to(images.dtype)


def _distance(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b).pow(2).sum(dim=-1) + _DISTANCE_EPS).sqrt()


def triplet_mining_term(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """``||fa* - fp*|| - ||fa* - fn*||`` per tuple, on embeddings of masked images."""
    return _distance(anchor, positive) - _distance(anchor, negative)


def same_pair_mining_term(first: Tensor, second: Tensor) -> Tensor:
    """``-||f1* - f2*||`` per same-class pair, on embeddings of masked images."""
    return -_distance(first, second)


def quadruplet_mining_term(
    anchor: Tensor, positive: Tensor, negative1: Tensor, negative2: Tensor
) -> Tensor:
    """The triplet term for each negative, summed, per tuple."""
    return triplet_mining_term(anchor, positive, negative1) + triplet_mining_term(
        anchor, positive, negative2
    )


_MINING_TERMS: dict[str, Callable[..., Tensor]] = {
    "same_pair": same_pair_mining_term,
    "triplet": triplet_mining_term,
    "quadruplet": quadruplet_mining_term,
}


class SimilarityMiningLoss(nn.Module):
    """The mining term ``L_sm`` averaged over tuples, from embeddings of masked images.

    Args:
        kind: ``"same_pair"``, ``"triplet"`` or ``"quadruplet"``. Different-class pairs
            have no mining term.

    ``forward(*embeddings)`` takes one ``(T, d)`` tensor per slot (raw embeddings; they
    are L2-normalised here) and returns a scalar; zero when there are no tuples.

    Example:
        >>> import torch
        >>> loss = SimilarityMiningLoss("triplet")
        >>> a = torch.tensor([[1.0, 0.0]])
        >>> round(float(loss(a, a, torch.tensor([[0.0, 1.0]]))), 4)  # 0 - sqrt(2)
        -1.4142
    """

    def __init__(self, kind: str = "triplet") -> None:
        super().__init__()
        if kind not in _MINING_TERMS:
            raise InputError(
                f"kind must be one of {sorted(_MINING_TERMS)}, got {kind!r} "
                "(different-class pairs add no mining term)"
            )
        self.kind = kind
        self.num_slots = {"same_pair": 2, "triplet": 3, "quadruplet": 4}[kind]

    def forward(self, *embeddings: Tensor) -> Tensor:
        if len(embeddings) != self.num_slots:
            raise InputError(
                f"a {self.kind} mining term takes {self.num_slots} embedding batches, "
                f"got {len(embeddings)}"
            )
        if embeddings[0].shape[0] == 0:
            return embeddings[0].sum() * 0
        # half-precision embeddings (autocast) are compared in float32
        normalized = [l2_normalize(e.float() if e.element_size() < 4 else e) for e in embeddings]
        return _MINING_TERMS[self.kind](*normalized).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


@dataclass
class SAMLossParts:
    """The parts of the last :class:`SAMLoss` call, detached, for logging.

    Attributes:
        total: ``metric + gamma * mining``.
        metric: the metric-learning loss ``L_ml`` on the unmasked embeddings.
        mining: the mining term ``L_sm`` (zero when no tuple was mined or ``gamma=0``).
        mining_tuples: how many tuples the mining term used.
    """

    total: Tensor
    metric: Tensor
    mining: Tensor
    mining_tuples: int

    def as_dict(self) -> dict[str, float]:
        """Plain floats (synchronises with the device)."""
        return {
            "loss": float(self.total),
            "metric_loss": float(self.metric),
            "mining_loss": float(self.mining),
            "mining_tuples": float(self.mining_tuples),
        }


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics (and their counters) unchanged inside the block.

    Train-mode BatchNorm still normalises with the batch's own statistics; only the
    running mean, variance and ``num_batches_tracked`` are left as they were.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            counter = module.num_batches_tracked
            saved.append((module, module.momentum, None if counter is None else counter.clone()))
            module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch statistic
    try:
        yield
    finally:
        for module, momentum, counter in saved:
            module.momentum = momentum
            if counter is not None:
                module.num_batches_tracked.copy_(counter)


ImagesOrTuple = Union[Tensor, Sequence[Tensor]]


class SAMLoss(nn.Module):
    r"""Metric-learning loss plus similarity mining: ``L = L_ml + gamma * L_sm``.

    Args:
        model: the embedding model being trained (maps ``(N, C, H, W)`` to ``(N, d)``);
            may be wrapped in ``DistributedDataParallel``. It is not registered as a
            submodule, so ``SAMLoss.parameters()`` holds only the metric loss's and the
            miner's parameters.
        metric_loss: ``L_ml`` on the unmasked embeddings: a pytorch-metric-learning loss
            (called as ``loss(embeddings, labels, indices_tuple)``) or any callable. For
            tuples of images a plain callable gets one embedding batch per slot
            (``loss(fa, fp, fn)``, e.g. ``torch.nn.TripletMarginLoss()``; pairs:
            ``loss(f1, f2, same_class)``); for a batch with labels it gets
            ``(embeddings, labels, indices_tuple)``.
        gamma: weight of the mining term (>= 0; the paper uses 0.25 for retrieval,
            0.2 for re-identification). ``0`` skips the mining pass entirely.
        layer: the layer whose maps mask the images (as in
            :class:`~simexplain.EmbeddingAttribution`; ``None`` finds it).
        alpha, beta: the soft mask's steepness (> 0) and threshold in [0, 1]
            (:func:`soft_mask`).
        miner: a pytorch-metric-learning miner used when a batch comes with labels but
            no ``indices_tuple``.
        max_mining_tuples: at most this many tuples (sampled at random) enter the mining
            term. For a batch with labels the default is the batch size divided by the
            tuple size, so the masked pass is no larger than the training pass; for
            tuples of images the default is all of them.
        relu: apply ReLU to the maps before masking (GradCAM's choice).
        freeze_norm_statistics: keep BatchNorm running statistics unchanged during the
            masked forward pass (see the module docs).
        layout, num_prefix_tokens, reshape_transform: how to read the layer's output, as
            in :class:`~simexplain.EmbeddingAttribution`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from simexplain.mining import SAMLoss
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> criterion = SAMLoss(model, nn.TripletMarginLoss(margin=0.2), gamma=0.25, layer="2")
        >>> anchor, positive, negative = torch.randn(3, 4, 3, 16, 16)
        >>> loss = criterion((anchor, positive, negative))
        >>> loss.backward()
        >>> sorted(criterion.last.as_dict())
        ['loss', 'metric_loss', 'mining_loss', 'mining_tuples']
    """

    def __init__(
        self,
        model: nn.Module,
        metric_loss: Callable[..., Tensor],
        gamma: float = 0.25,
        layer: LayerSpec = None,
        alpha: float = 10.0,
        beta: float = 0.5,
        *,
        miner: Optional[Callable[..., Any]] = None,
        max_mining_tuples: Optional[int] = None,
        relu: bool = True,
        freeze_norm_statistics: bool = True,
        layout: Optional[str] = None,
        num_prefix_tokens: Optional[int] = None,
        reshape_transform: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise InputError(
                f"gamma must be a finite number >= 0 (the weight of the mining term), got {gamma!r}"
            )
        _check_mask_parameters(alpha, beta)
        if not callable(metric_loss):
            raise InputError(f"metric_loss must be callable, got {type(metric_loss).__name__}")
        if max_mining_tuples is not None and (
            not isinstance(max_mining_tuples, int) or max_mining_tuples < 1
        ):
            raise InputError(f"max_mining_tuples must be a positive int, got {max_mining_tuples!r}")
        self.attribution = EmbeddingAttribution(
            model,
            layer,
            layout=layout,
            num_prefix_tokens=num_prefix_tokens,
            reshape_transform=reshape_transform,
            eval_mode=False,
        )
        self.metric_loss = metric_loss
        self.miner = miner
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.max_mining_tuples = max_mining_tuples
        self.relu = relu
        self.freeze_norm_statistics = freeze_norm_statistics
        self.last: Optional[SAMLossParts] = None

    @property
    def model(self) -> nn.Module:
        return self.attribution.model

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, beta={self.beta}"

    def forward(
        self,
        inputs: ImagesOrTuple,
        labels: Any = None,
        indices_tuple: Optional[Sequence[Tensor]] = None,
        *,
        same_class: Any = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """The loss of one training step.

        Args:
            inputs: a tuple of 2, 3 or 4 image batches ``(B, C, H, W)`` (pairs,
                triplets ``(anchor, positive, negative)``, quadruplets), or one batch
                ``(N, C, H, W)`` with ``labels`` and a miner or ``indices_tuple``.
            labels: for a batch, class labels ``(N,)``. For tuples, optional: one
                label tensor ``(B,)`` per slot, checked against the roles (pairs: their
                equality gives ``same_class``).
            indices_tuple: for a batch, ``(a, p, n)`` triplets or pytorch-metric-
                learning's pairs ``(a1, p, a2, n)``; otherwise ``miner`` is called.
            same_class: pairs of images only: a bool ``(B,)`` (or one bool), whether
                each pair is same-class; only same-class pairs have a mining term.
            additional_forward_args: extra arguments for every forward call of the model.

        Returns:
            The scalar loss; its parts are in :attr:`last`.
        """
        args = () if additional_forward_args is None else additional_forward_args
        if not isinstance(args, tuple):
            args = (args,)
        if isinstance(inputs, Tensor):
            return self._batch_step(inputs, labels, indices_tuple, args)
        if indices_tuple is not None:
            raise InputError(
                "indices_tuple indexes one batch of images; for tuples of image batches "
                "the roles are given by position, so pass indices_tuple=None"
            )
        return self._tuple_step(inputs, labels, same_class, args)

    # -- the two ways of giving tuples -------------------------------------------------

    def _tuple_step(self, inputs: Sequence[Tensor], labels: Any, same_class: Any, args: tuple):
        slots = check_tuple_inputs(inputs)
        count, batch = len(slots), slots[0].shape[0]
        slot_labels = None
        if labels is not None:
            if not isinstance(labels, (tuple, list)) or len(labels) != count:
                raise InputError(
                    f"labels for {count} image batches must be a tuple of {count} label "
                    "tensors (B,), one per slot"
                )
            stacked = check_labels(torch.stack([torch.as_tensor(y) for y in labels], 1), batch,
                                   count)
            slot_labels = stacked.to(slots[0].device)
        if count == 2:
            same = _pair_flags(same_class, slot_labels, batch).to(slots[0].device)
        elif same_class is not None:
            raise InputError("same_class is for pairs only; triplets and quadruplets have roles")
        images = torch.cat(slots)
        positions = [k * batch + torch.arange(batch, device=images.device) for k in range(count)]
        activation, embeddings, layer = self._forward(images, args)
        flat_labels = None if slot_labels is None else slot_labels.t().reshape(-1)
        slot_embeddings = list(embeddings.reshape(count, batch, -1).unbind(0))

        if _is_pml_loss(self.metric_loss):
            if count == 2:
                pml_tuple = (positions[0][same], positions[1][same],
                             positions[0][~same], positions[1][~same])
            elif count == 3:
                pml_tuple = tuple(positions)
            else:  # a quadruplet is two triplets sharing anchor and positive
                a, p, n1, n2 = positions
                pml_tuple = (torch.cat([a, a]), torch.cat([p, p]), torch.cat([n1, n2]))
            metric = self.metric_loss(embeddings, flat_labels, indices_tuple=pml_tuple)
        elif count == 2:
            metric = self.metric_loss(slot_embeddings[0], slot_embeddings[1], same)
        else:
            metric = self.metric_loss(*slot_embeddings)

        if count == 2:
            mining_tuples = [positions[0][same], positions[1][same]]
            kind = "same_pair"
        else:
            mining_tuples, kind = positions, ("triplet" if count == 3 else "quadruplet")
        limit = self.max_mining_tuples
        return self._finish(images, activation, embeddings, layer, metric, mining_tuples, kind,
                            limit, args)

    def _batch_step(self, images: Tensor, labels: Any, indices_tuple: Any, args: tuple):
        check_tuple_inputs((images, images))
        if labels is None:
            raise InputError(
                "a batch of images needs labels (N,) to form tuples; or pass a tuple of "
                "image batches, e.g. (anchor, positive, negative)"
            )
        labels = torch.as_tensor(labels, device=images.device)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise InputError(
                f"labels must be integer class labels of shape ({images.shape[0]},), one per "
                f"image; got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if indices_tuple is None and self.miner is None:
            raise InputError(
                "a batch of images with labels needs tuples: pass indices_tuple=(a, p, n) "
                "or construct SAMLoss(..., miner=...) with a pytorch-metric-learning miner"
            )
        if indices_tuple is not None:
            indices_tuple = check_index_tuples(labels, indices_tuple)
        activation, embeddings, layer = self._forward(images, args)
        if indices_tuple is None:
            indices_tuple = check_index_tuples(labels, self.miner(embeddings, labels))
        metric = self.metric_loss(embeddings, labels, indices_tuple=indices_tuple)
        if len(indices_tuple) == 3:
            mining_tuples, kind = list(indices_tuple), "triplet"
        else:
            mining_tuples, kind = list(indices_tuple[:2]), "same_pair"
        limit = self.max_mining_tuples or math.ceil(images.shape[0] / len(mining_tuples))
        return self._finish(images, activation, embeddings, layer, metric, mining_tuples, kind,
                            limit, args)

    # -- the shared step ---------------------------------------------------------------

    def _forward(
        self, images: Tensor, args: tuple
    ) -> tuple[Optional[Tensor], Tensor, Optional[FeatureLayer]]:
        if self.gamma == 0:  # no maps needed: a plain training forward
            return None, embedding_matrix(self.model(images, *args), images.shape[0]), None
        if not torch.is_grad_enabled():
            raise InputError(
                "SAMLoss with gamma > 0 differentiates the maps, so it needs gradients; it was "
                "called under torch.no_grad(). For validation, call the metric loss alone"
            )
        layer = self.attribution.feature_layer(images)
        activation, embeddings = self.attribution.forward_with_activation(
            images, layer, args, create_graph=True
        )
        return activation, embeddings, layer

    def _finish(
        self,
        images: Tensor,
        activation: Optional[Tensor],
        embeddings: Tensor,
        layer: Optional[FeatureLayer],
        metric: Tensor,
        mining_tuples: list[Tensor],
        kind: str,
        limit: Optional[int],
        args: tuple,
    ) -> Tensor:
        count = int(mining_tuples[0].numel())
        if limit is not None and count > limit:
            keep = torch.randperm(count, device=mining_tuples[0].device)[:limit]
            mining_tuples = [t[keep] for t in mining_tuples]
            count = limit
        if self.gamma == 0 or count == 0:
            mining = metric.detach().new_zeros(())
            total = metric
            count = 0 if self.gamma == 0 else count
        else:
            mining = self._mining_term(images, activation, embeddings, layer, mining_tuples,
                                       kind, args)
            total = metric + self.gamma * mining
        self.last = SAMLossParts(total.detach(), metric.detach(), mining.detach(), count)
        return total

    def _mining_term(
        self,
        images: Tensor,
        activation: Tensor,
        embeddings: Tensor,
        layer: FeatureLayer,
        mining_tuples: list[Tensor],
        kind: str,
        args: tuple,
    ) -> Tensor:
        normalized = l2_normalize(embeddings)
        # w stays in the graph, so the gradient is that of L itself (finite differences agree)
        weights = weights_for_kind(kind)(*[normalized[t] for t in mining_tuples])
        occurrences = torch.cat(mining_tuples)  # image index of every (tuple, slot)
        occurrence_weights = weights.repeat(len(mining_tuples), 1)
        maps = self._occurrence_maps(activation, normalized, layer, occurrences,
                                     occurrence_weights, images.shape[-2:])
        masked = soft_mask(images[occurrences], maps, self.alpha, self.beta)
        with frozen_norm_statistics(self.model) if self.freeze_norm_statistics else nullcontext():
            output = self.model(masked, *args)
        masked_embeddings = embedding_matrix(output, masked.shape[0])
        per_slot = masked_embeddings.reshape(len(mining_tuples), -1, masked_embeddings.shape[-1])
        return SimilarityMiningLoss(kind)(*per_slot.unbind(0))

    def _occurrence_maps(
        self,
        activation: Tensor,
        normalized: Tensor,
        layer: FeatureLayer,
        occurrences: Tensor,
        weights: Tensor,
        image_hw: Sequence[int],
    ) -> Tensor:
        """Differentiable maps of each (tuple, slot) occurrence, ``(len(occurrences), h, w)``.

        One vector-Jacobian product gives the layer gradient of ``w . f`` for every image
        at once, but an image can appear in several tuples (with different ``w``): the
        occurrences are split into rounds in which each image appears at most once.
        """
        sorted_images, order = torch.sort(occurrences, stable=True)
        first = torch.searchsorted(sorted_images, sorted_images)
        rank = torch.empty_like(occurrences)
        rank[order] = torch.arange(len(occurrences), device=occurrences.device) - first
        image_hw = (int(image_hw[0]), int(image_hw[1]))
        maps, positions = [], []
        for r in range(int(rank.max()) + 1):
            chosen = (rank == r).nonzero().squeeze(1)
            rows = occurrences[chosen]
            grad_outputs = torch.zeros_like(normalized).index_put(
                (rows,), weights[chosen].to(normalized.dtype)
            )
            (gradient,) = torch.autograd.grad(
                normalized, activation, grad_outputs, create_graph=True, retain_graph=True
            )
            maps.append(self.attribution.gradient_weighted_maps(
                activation[rows], gradient[rows], layer, image_hw, self.relu
            ))
            positions.append(chosen)
        stacked = torch.cat(maps)
        result = torch.empty_like(stacked)
        result[torch.cat(positions)] = stacked
        return result


def _check_mask_parameters(alpha: Any, beta: Any) -> None:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"alpha must be a finite number > 0 (the mask's steepness), got {alpha!r}")
    if not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise InputError(
            f"beta must be in [0, 1] (the map value where the mask erases half), got {beta!r}"
        )


def _pair_flags(same_class: Any, slot_labels: Optional[Tensor], batch: int) -> Tensor:
    if same_class is None:
        if slot_labels is None:
            raise InputError(
                "pairs need same_class= (a bool per pair) or labels=(labels1, labels2)"
            )
        return slot_labels[:, 0] == slot_labels[:, 1]
    flags = torch.as_tensor(same_class)
    if flags.dtype != torch.bool:
        raise InputError(f"same_class must be booleans, got {flags.dtype}")
    flags = flags.reshape(-1)
    if flags.numel() == 1:
        flags = flags.expand(batch)
    if flags.numel() != batch:
        raise InputError(f"same_class has {flags.numel()} entries for {batch} pairs")
    if slot_labels is not None and bool((flags != (slot_labels[:, 0] == slot_labels[:, 1])).any()):
        raise InputError("same_class disagrees with labels; pass one or the other")
    return flags


def _is_pml_loss(loss: Any) -> bool:
    # A pml loss object implies its module is imported; importing it here would cost
    # seconds on the first call for users of plain losses.
    module = sys.modules.get("pytorch_metric_learning.losses")
    return module is not None and isinstance(loss, module.BaseMetricLossFunction)
