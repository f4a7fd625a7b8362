"""What the black-box methods share: any callable model, the tuple's criterion, the run.

A black-box method reads no layer and takes no gradient: it hides parts of each image,
embeds the perturbed images with the model used as a plain function, and scores each
against the image's partners with the criterion the gradient methods explain
(:mod:`~simexplain.methods.blackbox.criterion`). Image ``i``'s map says how much its
criterion drops when each part of it is hidden, the partners held fixed.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...engine.engine import TupleResult
from ...engine.outputs import OutputSpec, check_output
from ...errors import InputError
from ..base import SimilarityMethod, TensorTuple
from ..centre import reference_centre
from .criterion import HeldPartners, ImageRows, TupleGroup
from .masks import MaskSet
from .runner import (
    Accumulator, check_batch_size, check_embedder, default_batch_size, embed_batches, embedder,
    model_session, run_perturbations,
)

__all__ = ["BlackBoxMethod"]

Fill = Union[float, Sequence[float]]


def _checked_fill(fill: Any) -> Tensor:
    values = [fill] if isinstance(fill, numbers.Real) else fill
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    if tensor is None or isinstance(fill, bool) or tensor.numel() == 0 or \
            not bool(torch.isfinite(tensor).all()):
        raise InputError(
            f"fill must be a number, or one number per channel, that hidden pixels take "
            f"(0: the dataset's mean colour for normalised images), got {fill!r}"
        )
    return tensor


class BlackBoxMethod(SimilarityMethod):
    """Base class of the perturbation methods (``"sbsm"``, ``"rise"``).

    Args:
        model: any callable ``images (N, C, H, W) -> embeddings (N, d)``: a PyTorch module
            (used under ``no_grad``, without hooks), an ONNX Runtime model wrapped as a
            function, a function calling a service.
        layer: must be ``None``: black-box methods read no layer.
        reference: embeddings ``(N, d)`` or images ``(N, C, H, W)``: measure the
            embeddings from their mean normalised embedding, as ``"contribution"`` does
            with it (:func:`~simexplain.methods.reference_centre`). ``None``: from the origin.
        fill: the value hidden pixels take, one number or one per channel (default 0: the
            dataset's mean colour for images normalised with its mean and std).
        batch_size: perturbed images per forward pass (default: 64; on a CPU as many as
            hold about six 224 px images, or 24 where the process keeps freed memory).
        progress: show a progress bar on stderr; ``None``: when stderr is a terminal.
        output: how to pick the embedding from a model that returns more (a key, an index
            or a callable), as for :class:`~simexplain.engine.SimilarityEngine`.
        eval_mode: put a PyTorch module in eval mode during each call (restored after).

    Subclasses set ``name`` and make their masks (:meth:`perturbations`) and their maps
    from the scores (:meth:`accumulator`).
    """

    blackbox: ClassVar[bool] = True
    rotation_invariant: ClassVar[bool] = True
    base_options: ClassVar[tuple[str, ...]] = (
        "reference", "fill", "batch_size", "progress", "output", "eval_mode",
    )

    def __init__(
        self,
        model: Any,
        layer: None = None,
        *,
        reference: Optional[Tensor] = None,
        fill: Fill = 0.0,
        batch_size: Optional[int] = None,
        progress: Optional[bool] = None,
        output: OutputSpec = None,
        eval_mode: bool = True,
    ) -> None:
        check_embedder(model)
        if layer is not None:
            raise InputError(
                f"method {self.name!r} is a black-box method: it hides parts of the images "
                "and reads no layer, so it takes no layer=; drop it, or choose a gradient "
                "method to explain a layer"
            )
        self.model = model
        self.engine = None
        self.reference = reference
        self.fill = _checked_fill(fill)
        self.batch_size = check_batch_size(batch_size)
        self.progress = progress
        self.output = check_output(output)
        self.eval_mode = bool(eval_mode)
        self.options: dict[str, Any] = dict(
            reference=reference, fill=fill, batch_size=batch_size, progress=progress,
            output=output, eval_mode=eval_mode)
        self._centre: Optional[Tensor] = None

    # ------------------------------------------------------------------ what subclasses add

    def perturbations(self, image_size: tuple[int, int]) -> MaskSet:
        """The masks for images of ``image_size`` ``(H, W)``."""
        raise NotImplementedError

    def accumulator(self, masks: MaskSet, scores: Tensor) -> Accumulator:
        """What keeps the perturbations' scores, for images whose unperturbed scores are
        ``scores`` ``(U,)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def forwards(self, image_size: tuple[int, int]) -> int:
        """Forward passes per explained image for images of ``image_size``: the cost."""
        return self.perturbations(image_size).count

    def embed(self, images: Tensor) -> Tensor:
        """The model's embeddings ``(N, d)`` of ``images``, in float32 or wider."""
        size = self.batch_size or default_batch_size(images)
        with model_session(self.model, self.eval_mode):
            return embed_batches(embedder(self.model, self.output), images, size)

    @property
    def centre(self) -> Optional[Tensor]:
        """The reference's mean normalised embedding ``(d,)``, or ``None`` without one."""
        if self._centre is None and self.reference is not None:
            self._centre = reference_centre(self.model, self.reference, self.embed)
        return self._centre

    def explain(
        self,
        tuples: TensorTuple,
        same_class: Any = None,
        coefficients: Optional[Any] = None,
        relu: bool = True,
    ) -> Tensor:
        """Maps ``(B, T, h, w)`` at the masks' resolution; ``same_class=False`` for pairs
        explains their dissimilarity, ``coefficients`` as for
        :class:`~simexplain.methods.CosineScore`, ``relu`` keeps the parts whose hiding
        lowers the criterion only."""
        return self.run(tuples, same_class, coefficients=coefficients, relu=relu).maps

    def run(
        self,
        tuples: TensorTuple,
        target: Any = None,
        *,
        coefficients: Optional[Any] = None,
        relu: Optional[bool] = None,
    ) -> TupleResult:
        """Maps, scores (each image's criterion, unperturbed) and normalised embeddings of
        ``tuples``; ``relu=None`` keeps the positive part, as GradCAM does."""
        slots = self.checked_tuples(tuples)
        members = torch.arange(len(slots) * slots[0].shape[0]).reshape(len(slots), -1)
        group = TupleGroup(members, target, coefficients)
        return self.run_shared(torch.cat(slots), [group], relu=relu)[0]

    def run_shared(
        self, images: Tensor, groups: Sequence[TupleGroup], *, relu: Optional[bool] = None,
        partners: Optional[Tensor] = None,
    ) -> list[TupleResult]:
        """The results of groups of tuples whose images come from the pool ``images``
        ``(U, C, H, W)``, one per group: each image is perturbed once and scored for every
        tuple it is in (a retrieval query for each of its matches), so an image costs
        its forward passes once however many tuples hold it. Members ``U`` and above are
        ``partners`` ``(P, d)``, images given by their embeddings alone (a text query):
        they are held fixed, never perturbed, and their maps are NaN.

        >>> import torch
        >>> from simexplain.methods.blackbox import SBSM
        >>> embed = lambda x: x.mean(dim=(2, 3))
        >>> pool = torch.rand(3, 3, 8, 8)               # a query and two matches
        >>> pairs = TupleGroup(torch.tensor([[0, 0], [1, 2]]), target=True)
        >>> (result,) = SBSM(embed, window=4).run_shared(pool, [pairs])
        >>> result.kind, tuple(result.maps.shape)
        ('same_pair', (2, 2, 4, 4))
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise InputError("the pool of images must be a tensor (U, C, H, W)")
        fill = self._fill_for(images)
        masks = self.perturbations(tuple(images.shape[-2:]))
        size = self.batch_size or default_batch_size(images)
        centre = self.centre
        embed = embedder(self.model, self.output)
        with model_session(self.model, self.eval_mode):
            embeddings = embed_batches(embed, images, size)
            known = embeddings if partners is None else \
                torch.cat([embeddings, _checked_partners(partners, embeddings)])
            helds = [HeldPartners.of_tuples(known[g.members.to(known.device)], g.target,
                                            g.coefficients, centre) for g in groups]
            rows = ImageRows(helds, [g.members for g in groups], images.shape[0])
            accumulator = self.accumulator(masks, rows.unperturbed(embeddings))
            run_perturbations(embed, images, rows, masks, fill, accumulator, batch_size=size,
                              progress=self.progress, name=self.name)
        unit = F.normalize(known, dim=-1)
        return [_result(held, group.members, maps, unit, relu)
                for held, group, maps in zip(helds, groups, rows.split(accumulator.maps()))]

    def _fill_for(self, images: Tensor) -> Tensor:
        channels = images.shape[1]
        if self.fill.numel() not in (1, channels):
            raise InputError(
                f"fill has {self.fill.numel()} values for images of {channels} channels; "
                "give one number, or one per channel"
            )
        return self.fill.to(images.device).reshape(1, -1, 1, 1)

    def for_model(self, model: Any) -> "BlackBoxMethod":
        if model is self.model:
            return self
        return type(self)(model, **self.options)


def _checked_partners(partners: Tensor, embeddings: Tensor) -> Tensor:
    if not isinstance(partners, Tensor) or partners.dim() != 2 or \
            partners.shape[1] != embeddings.shape[1]:
        shape = tuple(partners.shape) if isinstance(partners, Tensor) else type(partners)
        raise InputError(f"partners must be embeddings (P, {embeddings.shape[1]}) like the "
                         f"model's, got {shape}")
    return partners.detach().to(embeddings)


def _result(held: HeldPartners, members: Tensor, maps: Tensor, unit: Tensor,
            relu: Optional[bool]) -> TupleResult:
    """One group's result from its rows' maps ``(T * B, h, w)`` (slot-major)."""
    count, batch = members.shape
    maps = maps.to(held.values.dtype).reshape(count, batch, *maps.shape[-2:]).transpose(0, 1)
    return TupleResult(
        maps=torch.relu(maps) if relu is not False else maps,
        scores=held.values,
        weights=None,
        embeddings=unit[members.to(unit.device)].transpose(0, 1),
        kind=held.kind,
        layer="",
    )
