"""The mining term's second pass: which images of a tuple are masked, and what that pass
trains.

Two choices that METHOD.md section 2 fixes one way and that :class:`~simexplain.training.SAMLoss`
exposes as options for studying why mining helps or not:

* ``masked_slots``: the paper masks every image of a tuple. Masking only some slots (say
  the positive of a triplet, slot 1) compares those masked images with the *unmasked*
  embeddings of the others, held fixed: the unmasked embeddings are constants of the
  mining term, or it would pull the clean anchor towards the clean negative.
* ``mining_gradient``: ``"full"`` (the paper's) trains the network through both the maps
  (which decide the mask) and the embedding of the masked images; ``"maps"`` holds the
  network's parameters fixed in the masked pass, so the mining term can only move the
  maps, not teach the network to embed masked images differently; ``"embeddings"`` is
  the converse, WS-DAN's way: the maps choose the mask without a graph, like a data
  augmentation, and the term trains only how masked images are embedded. No gradient
  then has to reach the pixels of the masked images, so the backward of the masked pass
  stops where a plain step's does (at the first trainable layer), and the maps need no
  double backward: the candidate for a cheaper step, which
  ``benchmarks/bench_training.py`` times as variant (d).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional, Sequence

from torch import Tensor, nn
from torch.func import functional_call

from ..engine.embeddings import embedding_matrix, run_model
from ..engine.outputs import OutputSpec
from ..engine.state import frozen_norm_statistics
from ..errors import InputError

__all__ = ["MINING_GRADIENTS", "check_masked_slots", "slots_to_mask", "masked_embeddings",
           "slot_embeddings"]

#: What the mining term trains: everything (the paper), only through the maps, or only
#: through the masked images' embeddings (the mask held fixed).
MINING_GRADIENTS = ("full", "maps", "embeddings")


def check_masked_slots(masked_slots: Any) -> Optional[tuple[int, ...]]:
    """``None`` (every slot) or a sorted tuple of distinct slot indices >= 0."""
    if masked_slots is None:
        return None
    if isinstance(masked_slots, int) and not isinstance(masked_slots, bool):
        masked_slots = (masked_slots,)
    slots = tuple(masked_slots) if isinstance(masked_slots, (tuple, list)) else None
    if (not slots or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in slots)
            or len(set(slots)) != len(slots)):
        raise InputError(
            "masked_slots must be None (mask every image of a tuple) or distinct slot "
            f"indices, e.g. (1,) for a triplet's positive; got {masked_slots!r}"
        )
    return tuple(sorted(slots))


def slots_to_mask(masked_slots: Optional[tuple[int, ...]], count: int, kind: str
                  ) -> tuple[int, ...]:
    """The slots masked in tuples of ``count`` images (``kind`` names them in errors)."""
    if masked_slots is None:
        return tuple(range(count))
    if masked_slots[-1] >= count:
        raise InputError(
            f"masked_slots={masked_slots} names a slot that a {kind} tuple of {count} images "
            f"does not have; use indices 0..{count - 1}"
        )
    return masked_slots


def masked_embeddings(
    model: nn.Module, masked: Tensor, args: tuple, freeze_norm_statistics: bool,
    mining_gradient: str, output: OutputSpec = None,
) -> Tensor:
    """Embeddings ``(n, d)`` of the masked images, with the network's parameters in the
    graph (``"full"``) or held fixed (``"maps"``: gradients reach only the mask), picked
    from the model's output by ``output`` (:func:`~simexplain.engine.outputs.select_output`)."""
    forward: Any = model
    if mining_gradient == "maps":
        # DDP's forward would expect its parameters to receive gradients: call the module
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        fixed = {name: p.detach() for name, p in module.named_parameters()}

        def forward(images: Tensor, *extra: Any) -> Any:
            return functional_call(module, fixed, (images, *extra))

    with frozen_norm_statistics(model) if freeze_norm_statistics else nullcontext():
        embeddings = run_model(forward, masked, args, output)
    return embedding_matrix(embeddings, masked.shape[0])


def slot_embeddings(
    masked: Tensor, embeddings: Tensor, mining_tuples: Sequence[Tensor],
    slots: Sequence[int],
) -> list[Tensor]:
    """One ``(T, d)`` batch per slot: the masked embeddings of the masked slots (``masked``
    holds them slot-major), the unmasked ones, detached, of the others."""
    per_slot = masked.reshape(len(slots), -1, masked.shape[-1]).unbind(0)
    by_slot = dict(zip(slots, per_slot))
    return [by_slot[k] if k in by_slot else embeddings[t].detach()
            for k, t in enumerate(mining_tuples)]
