"""``SAMLoss``: training an embedding model with its own similarity maps (similarity mining).

Section 2 of the project's METHOD.md (after Zheng et al., "Visual Similarity Attention"):
each tuple's maps, computed with a graph, soft-mask its images where the maps are high;
the masked images are embedded again and the mining term ``L_sm`` compares them. Which
way it pushes (``direction``: the paper's terms, erasing or dropping) is set out in
:mod:`~simexplain.training.mining_terms`. The total loss is ``L = L_ml + gamma * L_sm``
with any metric-learning loss ``L_ml``. Instead of masking, the maps can choose crops
(``augmentation="crop"``, :mod:`~simexplain.training.map_crops`), with random crops of the
same sizes as the control.

Which activations the maps use: those of the training forward pass itself (train
mode, so BatchNorm normalises with the batch's statistics), the very pass whose
embeddings the metric loss sees. This costs no extra forward, and the maps explain the
network as it is being trained. The masked images go through a second forward, also in
train mode, but with BatchNorm's running statistics frozen for it: masked images are
not the distribution the model will see at test time, so they must not shift the
running mean and variance."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.embeddings import embedding_matrix, run_model
from ..engine.engine import SimilarityEngine
from ..engine.inputs import as_forward_args, check_tuple_inputs
from ..engine.layouts import FeatureLayer
from ..engine.target_layer import LayerSpec
from ..engine.tuples import check_index_tuples, check_labels
from ..errors import InputError
from ..methods.defaults import DEFAULT_METHOD
from ..methods.centre import reference_centre
from .loss_inputs import check_map_options, check_options, pair_flags, tuple_metric
from .masked_pass import check_masked_slots, masked_embeddings, slot_embeddings, slots_to_mask
from .loss_parts import SAMLossParts
from .map_crops import map_crops
from .masking import kept_fraction
from .mining_terms import SimilarityMiningLoss
from .occurrence_maps import mining_directions, occurrence_maps

__all__ = ["SAMLoss"]


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
        method: which maps drive the mask: ``"contribution"`` (the default),
            ``"psam"``, ``"gradcam_cosine"`` or ``"sam"`` (the paper's).
        reference: ``"contribution"`` and ``"psam"``: the reference their maps are
            measured from, embeddings ``(N, d)`` or images ``(N, C, H, W)``
            (:func:`~simexplain.methods.reference_centre`), or ``"batch"``, the mean
            normalised embedding of each training batch; ``None`` for none.
        freeze_norm_statistics: keep BatchNorm running statistics unchanged during the
            masked forward pass (see the module docs).
        masked_slots: which images of each tuple are masked, e.g. ``(1,)`` for a
            triplet's positive; the others enter the mining term unmasked and held fixed.
            ``None`` (the paper's) masks all (:mod:`~simexplain.training.masked_pass`).
        mining_gradient: ``"full"`` (the paper's) trains the network through the maps and
            through the embeddings of the masked images; ``"maps"`` only through the maps;
            ``"embeddings"`` only through the embeddings, the mask held fixed, so no
            gradient reaches the pixels (:mod:`~simexplain.training.masked_pass`).
        direction: which way the mining term pushes: ``"paper"`` (the paper's terms:
            a same-class pair erased, a triplet or quadruplet dropped), ``"erase"``
            (masked tuples should fail their criterion) or ``"drop"`` (they should still
            meet it); :mod:`~simexplain.training.mining_terms` gives the equations.
        mining_margin: ``None`` (the linear terms, the paper's form) or the margin of a
            hinge: the distance within which a masked same-class pair counts as similar,
            or by which a masked anchor must be nearer its positive than its negative.
        augmentation: ``"mask"`` (the paper's mining term on masked tuples), ``"crop"``
            (``L_sm`` is the metric loss on each image cropped to where its map reaches
            ``crop_threshold`` of its maximum, resized to the input size) or
            ``"random_crop"`` (crops of the same sizes at random places: the control).
        crop_threshold: in (0, 1], for cropping (see ``augmentation``).
        **layer_options: ``layout``, ``num_prefix_tokens`` or ``reshape_transform``: how to
            read the layer's output, and ``output``: how to pick the embedding from a
            model that returns more (a key, an index or a callable), as for
            :class:`~simexplain.engine.SimilarityEngine`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from simexplain.training import SAMLoss
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> criterion = SAMLoss(model, nn.TripletMarginLoss(margin=0.2), gamma=0.25, layer="2")
        >>> anchor, positive, negative = torch.randn(3, 4, 3, 16, 16)
        >>> loss = criterion((anchor, positive, negative))
        >>> loss.backward()
        >>> sorted(criterion.last.as_dict())
        ['erased_fraction', 'loss', 'metric_loss', 'mining_loss', 'mining_tuples']
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
        method: str = DEFAULT_METHOD,
        reference: Any = None,
        masked_slots: Optional[Sequence[int]] = None,
        mining_gradient: str = "full",
        direction: str = "paper",
        mining_margin: Optional[float] = None,
        augmentation: str = "mask",
        crop_threshold: float = 0.5,
        **layer_options: Any,
    ) -> None:
        super().__init__()
        check_options(model, metric_loss, gamma, alpha, beta, max_mining_tuples, method,
                      reference, mining_gradient)
        check_map_options(augmentation, direction, mining_margin, crop_threshold)
        self.direction = direction
        self.mining_margin = None if mining_margin is None else float(mining_margin)
        self.augmentation = augmentation
        self.crop_threshold = float(crop_threshold)
        self.masked_slots = check_masked_slots(masked_slots)
        self.mining_gradient = mining_gradient
        self.engine = SimilarityEngine(model, layer, eval_mode=False, **layer_options)
        self.method = method
        self.reference = reference
        self._fixed_centre: Optional[Tensor] = None
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
        return self.engine.model

    def _centre(self, normalized: Tensor) -> Optional[Tensor]:
        """The reference point for this step: none, the batch's, or the reference's."""
        if self.reference is None:
            return None
        if isinstance(self.reference, str):
            return normalized.detach().mean(0)
        if self._fixed_centre is None:
            with torch.inference_mode(False):
                self._fixed_centre = reference_centre(self.model, self.reference,
                                                      self.engine.embed)
        return self._fixed_centre

    def extra_repr(self) -> str:
        options = {"masked_slots": (self.masked_slots, None), "mining_gradient": (
            self.mining_gradient, "full"), "direction": (self.direction, "paper"),
            "mining_margin": (self.mining_margin, None),
            "augmentation": (self.augmentation, "mask")}
        extra = "".join(f", {k}={v!r}" for k, (v, default) in options.items() if v != default)
        return (f"method={self.method!r}, gamma={self.gamma}, alpha={self.alpha}, "
                f"beta={self.beta}{extra}")

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
        args = as_forward_args(additional_forward_args)
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
            same = pair_flags(same_class, slot_labels, batch).to(slots[0].device)
        elif same_class is not None:
            raise InputError("same_class is for pairs only; triplets and quadruplets have roles")
        images = torch.cat(slots)
        positions = [k * batch + torch.arange(batch, device=images.device) for k in range(count)]
        activation, embeddings, layer = self._forward(images, args)
        flat_labels = None if slot_labels is None else slot_labels.t().reshape(-1)

        metric_of = tuple_metric(self.metric_loss, positions, same if count == 2 else None,
                                 flat_labels)
        if count == 2:
            mining_tuples = [positions[0][same], positions[1][same]]
            kind = "same_pair"
        else:
            mining_tuples, kind = positions, ("triplet" if count == 3 else "quadruplet")
        limit = self.max_mining_tuples
        return self._finish(images, activation, embeddings, layer, metric_of, mining_tuples,
                            kind, limit, args)

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

        def metric_of(embeddings: Tensor) -> Tensor:
            return self.metric_loss(embeddings, labels, indices_tuple=indices_tuple)

        if len(indices_tuple) == 3:
            mining_tuples, kind = list(indices_tuple), "triplet"
        else:
            mining_tuples, kind = list(indices_tuple[:2]), "same_pair"
        limit = self.max_mining_tuples or math.ceil(images.shape[0] / len(mining_tuples))
        return self._finish(images, activation, embeddings, layer, metric_of, mining_tuples,
                            kind, limit, args)

    # -- the shared step ---------------------------------------------------------------

    def _forward(
        self, images: Tensor, args: tuple
    ) -> tuple[Optional[Tensor], Tensor, Optional[FeatureLayer]]:
        if self.gamma == 0:  # no maps needed: a plain training forward
            output = run_model(self.model, images, args, self.engine.output)
            return None, embedding_matrix(output, images.shape[0]), None
        if not torch.is_grad_enabled():
            raise InputError(
                "SAMLoss with gamma > 0 differentiates the maps, so it needs gradients; it was "
                "called under torch.no_grad(). For validation, call the metric loss alone"
            )
        layer = self.engine.feature_layer(images)
        activation, embeddings = self.engine.forward(
            images, layer, args, create_graph=True, check_finite=False
        )
        return activation, embeddings, layer

    def _finish(
        self,
        images: Tensor,
        activation: Optional[Tensor],
        embeddings: Tensor,
        layer: Optional[FeatureLayer],
        metric_of: Callable[[Tensor], Tensor],
        mining_tuples: list[Tensor],
        kind: str,
        limit: Optional[int],
        args: tuple,
    ) -> Tensor:
        metric = metric_of(embeddings)
        count = int(mining_tuples[0].numel())
        if limit is not None and count > limit:
            keep = torch.randperm(count, device=mining_tuples[0].device)[:limit]
            mining_tuples = [t[keep] for t in mining_tuples]
            count = limit
        erased = None
        if self.gamma == 0 or count == 0:
            mining = metric.detach().new_zeros(())
            total = metric
            count = 0 if self.gamma == 0 else count
        else:
            mining, erased = self._map_term(images, activation, embeddings, layer,
                                            mining_tuples, kind, args, metric_of)
            total = metric + self.gamma * mining
        self.last = SAMLossParts(total.detach(), metric.detach(), mining.detach(), count, erased)
        return total

    def _map_term(
        self,
        images: Tensor,
        activation: Tensor,
        embeddings: Tensor,
        layer: FeatureLayer,
        mining_tuples: list[Tensor],
        kind: str,
        args: tuple,
        metric_of: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """What the maps add, the mining term on masked tuples or the metric loss on
        crops, and the mean fraction of the images the masks erased or the crops cut
        away (detached)."""
        centre = self._centre(F.normalize(embeddings, dim=-1))
        units, vectors = mining_directions(self.method, embeddings, mining_tuples, kind, centre)
        if self.augmentation != "mask":
            crops, boxes = map_crops(self.engine, activation, layer, units, vectors, images,
                                     torch.cat(mining_tuples), self.relu, self.crop_threshold,
                                     at_random=self.augmentation == "random_crop")
            crop_embeddings = masked_embeddings(self.model, crops, args,
                                                self.freeze_norm_statistics, "full",
                                                self.engine.output)
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            return metric_of(crop_embeddings), 1 - areas.mean()
        slots = slots_to_mask(self.masked_slots, len(mining_tuples), kind)
        count = mining_tuples[0].numel()
        if len(slots) < len(mining_tuples):  # vectors are slot-major
            vectors = vectors.reshape(len(mining_tuples), count, -1)[list(slots)].flatten(0, 1)
        occurrences = torch.cat([mining_tuples[k] for k in slots])  # image of each occurrence
        maps = occurrence_maps(self.engine, activation, units, layer, occurrences, vectors,
                               images.shape[-2:], self.relu,
                               create_graph=self.mining_gradient != "embeddings")
        keep = kept_fraction(maps, images.shape[-2:], self.alpha, self.beta)
        masked = images[occurrences] * keep.unsqueeze(1).to(images.dtype)
        masked_out = masked_embeddings(self.model, masked, args, self.freeze_norm_statistics,
                                       self.mining_gradient, self.engine.output)
        per_slot = slot_embeddings(masked_out, embeddings, mining_tuples, slots)
        term = SimilarityMiningLoss(kind, self.direction, self.mining_margin)
        return term(*per_slot), 1 - keep.detach().float().mean()
