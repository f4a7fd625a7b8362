"""Bridges to captum's metrics for :class:`~simexplain.EmbeddingAttribution`.

``EmbeddingAttribution`` is a captum attribution, so ``NoiseTunnel``,
``captum.metrics.sensitivity_max`` and ``LayerAttribution.interpolate`` take it as it is.
``captum.metrics.infidelity`` wants a forward function returning one number per example
and attributions shaped like the inputs: :class:`TupleScore` and
:func:`maps_to_input_shape`. (Drawing maps with captum:
:mod:`simexplain.attribution.visualization`.)

Per-tuple tensors passed through captum (``target`` for pairs) must have shape ``(B, ...)``
with one row per tuple, so that captum can repeat them along with the noisy or perturbed
copies of the inputs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine.inputs import TensorOrTuple, as_forward_args, is_per_tuple, tuple_forward_args
from ..engine.maps import upsample_maps
from ..errors import InputError
from .embedding_attribution import EmbeddingAttribution

__all__ = ["TupleScore", "maps_to_input_shape"]


class TupleScore:
    r"""Forward function for captum's metrics: the tuple's total explained score.

    For tuple ``b`` it returns ``sum_i s_i``, the sum over the slots of the per-image
    scores that the attribution's method explains, each image's score computed with its
    partners (and anything derived from them, such as paper SAM's ``w``) held at the
    unperturbed ``inputs``. So each slot's map explains its own term of the sum. A call
    may hold ``k`` copies of each tuple in a row (captum's ``repeat_interleave`` layout,
    ``k * B`` rows per slot); tuple ``b`` is held for rows ``b * k`` to ``b * k + k - 1``.

    Args:
        attribution: the attribution whose maps are evaluated; its model, method, mode
            and ``additional_forward_args`` convention are used.
        inputs: the unperturbed tuple, as passed to ``attribution.attribute``.
        target: pairs only: whether each pair is same-class, a bool tensor ``(B,)``.
        additional_forward_args: extra arguments passed unchanged to every model call.
        **score_options: the method's options the maps were computed with (e.g.
            ``weight_fn`` for ``"sam"``).

    Attributes:
        weights: ``(B, d)`` paper SAM's fixed ``w`` (``None`` for other methods).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from simexplain import EmbeddingAttribution
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(1))
        >>> attr = EmbeddingAttribution(model, layer="0")
        >>> anchor, positive, negative = torch.randn(3, 2, 3, 8, 8)
        >>> score = TupleScore(attr, (anchor, positive, negative))
        >>> score(anchor, positive, negative).shape
        torch.Size([2])
    """

    def __init__(
        self,
        attribution: EmbeddingAttribution,
        inputs: TensorOrTuple,
        target: Any = None,
        *,
        additional_forward_args: Any = None,
        **score_options: Any,
    ) -> None:
        result = attribution.attribute_tuples(
            inputs, target, additional_forward_args, **score_options
        )
        self.attribution = attribution
        self.target = target
        self.score_options = score_options
        self.weights: Optional[Tensor] = result.weights
        self.num_slots: int = result.maps.shape[1]
        self.model_args = as_forward_args(additional_forward_args)
        slots = list(inputs)
        # the tuple's own embeddings, as the method's score sees them (not normalised)
        args = tuple_forward_args(self.model_args, slots[0].shape[0], 0, slots[0].shape[0],
                                  len(slots))
        with torch.no_grad():
            held = attribution.engine.embed(torch.cat(slots), args)
        self.embeddings: Tensor = held.reshape(len(slots), slots[0].shape[0], -1)  # (T, B, d)

    def __call__(self, *slots: Tensor) -> Tensor:
        """Score ``(N,)`` of each tuple in ``slots`` (one ``(N, C, H, W)`` batch per slot)."""
        if len(slots) != self.num_slots or not all(isinstance(s, Tensor) for s in slots):
            raise InputError(
                f"TupleScore got {len(slots)} arguments but was built for "
                f"{self.num_slots}-image tuples; pass one image batch per slot, in order"
            )
        rows, tuples = slots[0].shape[0], self.embeddings.shape[1]
        if any(s.shape[0] != rows for s in slots) or rows % tuples != 0:
            raise InputError(
                f"TupleScore got slots with {[s.shape[0] for s in slots]} rows for {tuples} "
                "tuples; each slot must hold k copies of every tuple in a row (k * B rows)"
            )
        copies = rows // tuples

        def copied(x: Any) -> Any:
            return x.repeat_interleave(copies, dim=0) if is_per_tuple(x, tuples) else x

        # per-tuple tensor arguments (B, ...) follow the copies, then every slot
        args = tuple_forward_args(tuple(map(copied, self.model_args)), rows, 0, rows, len(slots))
        score = self.attribution.score(copied(self.target), **self.score_options)
        held = self.embeddings.repeat_interleave(copies, dim=1)
        fixed = score.bind(len(slots), rows).fixed_at(held.to(slots[0].device))
        embeddings = self.attribution.engine.embed(torch.cat(slots), args)
        per_slot = embeddings.reshape(len(slots), rows, -1)
        return sum(fixed(k, per_slot[k]) for k in range(len(slots)))


def maps_to_input_shape(
    maps: Union[Tensor, Sequence[Tensor]],
    inputs: Union[Tensor, Sequence[Tensor]],
    mode: str = "bilinear",
) -> Union[Tensor, tuple[Tensor, ...]]:
    """Resize layer maps ``(B, 1, h, w)`` to their inputs' shape ``(B, C, H, W)``.

    Each map is upsampled to ``(H, W)`` and repeated over the ``C`` channels, which is the
    layout ``captum.metrics.infidelity`` expects for ``attributions``.

    Args:
        maps: one map batch, or a tuple with one per slot (as ``attribute`` returns).
        inputs: the matching image batch, or a tuple of them.
        mode: ``"bilinear"`` (as :func:`simexplain.engine.upsample_maps`) or any mode of
            ``torch.nn.functional.interpolate`` for 4-D tensors, e.g. ``"nearest"``.

    Returns:
        A tensor, or a tuple of tensors when ``maps`` is a tuple.

    Example:
        >>> import torch
        >>> maps_to_input_shape(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """
    single = isinstance(maps, Tensor)
    map_list = [maps] if single else list(maps)
    input_list = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if len(map_list) != len(input_list):
        raise InputError(
            f"got {len(map_list)} map batches for {len(input_list)} input batches; "
            "pass one map batch per slot"
        )
    out = []
    for k, (m, x) in enumerate(zip(map_list, input_list)):
        if m.dim() != 4 or m.shape[1] != 1 or x.dim() != 4 or m.shape[0] != x.shape[0]:
            raise InputError(
                f"slot {k}: maps {tuple(m.shape)} and inputs {tuple(x.shape)} do not match; "
                "expected maps (B, 1, h, w) for inputs (B, C, H, W)"
            )
        if mode == "bilinear":
            resized = upsample_maps(m, x.shape[-2:])
        else:
            resized = torch.nn.functional.interpolate(m, size=tuple(x.shape[-2:]), mode=mode)
        out.append(resized.repeat(1, x.shape[1], 1, 1))
    return out[0] if single else tuple(out)
