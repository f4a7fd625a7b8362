"""Explaining many tuples: stream them from a DataLoader, write the maps to disk as they come.

::

    from simexplain import EmbeddingAttribution
    from simexplain.apps import MapWriter, explain_stream, load_maps

    attr = EmbeddingAttribution(model)
    writer = MapWriter("maps/", shard_size=1024)
    for item in explain_stream(attr, loader, writer=writer):
        print(item.start, item.result.maps.shape)   # (B, T, h, w) for this batch only
    maps = load_maps("maps/")                       # {"index": (N,), "maps": (N, T, h, w), ...}

or, when nothing needs to be done per batch, ``explain_to_disk(attr, loader, "maps/")``.
Any built method streams the same way, a decomposition too:
``explain_stream(get_method("stylianou").build(model), loader)``.

Memory stays bounded however long the stream: each loader batch is explained in chunks
of ``chunk_size`` tuples (one forward pass each, no graph kept), the generator drops its
references to a batch's images before it yields that batch's results and holds nothing of
earlier batches, and the writer keeps at most one shard of results (``shard_size`` tuples)
in memory. Results are small: the maps are at layer resolution, ``T * h * w`` floats per
tuple (147 for a ResNet-50 triplet at 224 px).

Batches the loader may yield (anything else: pass ``unpack=``):

* a tuple or list of 2, 3 or 4 image batches ``(B, C, H, W)``, one per slot:
  ``(anchor, positive, negative)``;
* a tensor ``(B, T, C, H, W)``, the tuple's slots along dim 1;
* ``(images, target)``, with ``images`` one of the two above and ``target`` the per-pair
  same-class flags ``(B,)`` for pairs (``None`` for triplets and quadruplets), or flat,
  ``(x1, x2, target)``, as a dataset of ``(x1, x2, same_class)`` items is collated;
* a mapping with the key ``"images"`` and optionally ``"target"``.

The on-disk format: :mod:`simexplain.apps.map_store`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._progress import progress_bar
from ..attribution.embedding_attribution import EmbeddingAttribution
from ..engine.engine import TupleResult
from ..engine.state import model_device
from ..errors import InputError
from ..methods.base import SimilarityMethod
from .map_store import MapWriter, read_manifest
from .method_runner import run_method

__all__ = ["StreamItem", "explain_stream", "explain_to_disk", "unpack_batch"]

PathLike = Union[str, "os.PathLike[str]"]
Unpack = Callable[[Any], tuple[Sequence[Tensor], Any]]


@dataclass
class StreamItem:
    """The results for one loader batch.

    Attributes:
        index: the batch's number in the stream (0, 1, ...).
        start: the stream position of the batch's first tuple; its tuples are
            ``start .. start + len(result.maps) - 1``.
        result: the :class:`~simexplain.TupleResult` of the batch (maps ``(B, T, h, w)``
            at layer resolution, scores, weights, embeddings), detached.
    """

    index: int
    start: int
    result: TupleResult

    @property
    def stop(self) -> int:
        """One past the stream position of the batch's last tuple."""
        return self.start + int(self.result.maps.shape[0])


def explain_stream(
    attribution: Union[EmbeddingAttribution, SimilarityMethod],
    loader: Iterable[Any],
    *,
    writer: Optional["MapWriter"] = None,
    progress: bool = True,
    total: Optional[int] = None,
    unpack: Optional[Unpack] = None,
    target: Any = None,
    chunk_size: Optional[int] = None,
    additional_forward_args: Any = None,
    relu_attributions: Optional[bool] = None,
    device: Union[None, str, torch.device] = "auto",
    to_cpu: bool = True,
    **score_options: Any,
) -> Iterator[StreamItem]:
    """Explain every tuple ``loader`` yields, one batch at a time; yield each batch's results.

    Args:
        attribution: the :class:`~simexplain.EmbeddingAttribution` to run, or a built
            method of any kind (e.g. ``get_method("stylianou").build(model)``, a
            decomposition: its scores are each map's sum, see :func:`~simexplain.explain`).
        loader: any iterable of batches, typically a ``torch.utils.data.DataLoader``;
            see the module docstring for the batch layouts understood.
        writer: a :class:`MapWriter`; each batch's results are written before they are
            yielded. The stream finalises it: ``complete`` when the loader is exhausted,
            incomplete (what was computed is kept) when the stream fails or is stopped.
        progress: show a progress bar on stderr.
        total: number of tuples, for the bar; default ``len(loader.dataset)`` when known.
        unpack: ``batch -> (slots, target)`` for loaders yielding another layout.
        target: the pair target used for batches that carry none (e.g. ``True`` when
            every pair is same-class); batch targets take precedence.
        chunk_size: tuples per forward pass; each loader batch is split into forward
            passes of at most that many tuples (default: see
            :func:`~simexplain.engine.default_chunk_size`). A decomposition runs each
            loader batch in one pass.
        additional_forward_args: as for :meth:`EmbeddingAttribution.attribute`.
        relu_attributions: keep only positive evidence; ``None``: the method's own
            choice (ReLU for GradCAM-style methods, signed maps for decompositions).
        device: where to move the images: ``"auto"`` (the model's device), ``None`` (leave
            them where the loader put them) or a device.
        to_cpu: move each result to the CPU before yielding it, so results kept by the
            caller do not hold accelerator memory.
        **score_options: the method's options when it runs (e.g. ``weight_fn`` for
            ``"sam"``, ``coefficients`` for a cosine method or a decomposition), as for
            :meth:`EmbeddingAttribution.attribute_tuples`.

    Yields:
        :class:`StreamItem` per loader batch, as soon as it is computed. The generator
        holds no reference to earlier batches (images or results) and drops the current
        batch's images before yielding; memory is bounded by one batch and one shard.
    """
    if isinstance(attribution, EmbeddingAttribution):
        attribution = attribution.method
    if not isinstance(attribution, SimilarityMethod):
        raise TypeError(
            "attribution must be an EmbeddingAttribution or a built method (e.g. "
            f"get_method(name).build(model)), got {type(attribution).__name__}"
        )
    return _stream(
        attribution,
        loader,
        writer=writer,
        progress=progress,
        total=_stream_total(loader) if total is None else int(total),
        unpack=unpack or unpack_batch,
        default_target=target,
        options=dict(chunk_size=chunk_size, relu=relu_attributions, **score_options),
        args=additional_forward_args,
        device=model_device(attribution.model) if device == "auto" else device,
        to_cpu=to_cpu,
    )


def _stream(
    method: SimilarityMethod,
    loader: Iterable[Any],
    *,
    writer: Optional["MapWriter"],
    progress: bool,
    total: Optional[int],
    unpack: Unpack,
    default_target: Any,
    options: dict,
    args: Any,
    device: Union[None, str, torch.device],
    to_cpu: bool,
) -> Iterator[StreamItem]:
    bar = progress_bar(total, "explaining", "tuple", enabled=True) if progress else None
    iterator = iter(loader)
    index = start = 0
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            slots, batch_target = unpack(batch)
            del batch  # references to the batch end here: only ``slots`` stays, until below
            slots = tuple(_to_device(s, device) for s in slots)
            result = run_method(
                method,
                slots,
                default_target if batch_target is None else batch_target,
                forward_args=args,
                **options,
            )
            count = int(slots[0].shape[0])
            del slots, batch_target
            item = StreamItem(index, start, result.to("cpu") if to_cpu else result)
            del result
            if writer is not None:
                writer.write(item.result, start=item.start)
            if bar is not None:
                bar.update(count)
            index += 1
            start += count
            yield item
            del item
    except BaseException:  # also GeneratorExit: the caller stopped early
        if writer is not None:
            writer._abort()
        raise
    else:
        if writer is not None:
            writer.close()
    finally:
        if bar is not None:
            bar.close()


def explain_to_disk(
    attribution: Union[EmbeddingAttribution, SimilarityMethod],
    loader: Iterable[Any],
    path: PathLike,
    *,
    shard_size: int = 1024,
    fields: Sequence[str] = ("maps", "scores"),
    file_format: str = "npz",
    dtype: Optional[str] = None,
    overwrite: bool = False,
    **stream_options: Any,
) -> dict:
    """Explain every tuple of ``loader`` into the directory ``path``; return its manifest.

    ``stream_options`` are those of :func:`explain_stream` (``progress``, ``chunk_size``,
    ``target``, the method's options, ...). Read the result with :func:`load_maps`.
    """
    writer = MapWriter(
        path,
        shard_size=shard_size,
        fields=fields,
        file_format=file_format,
        dtype=dtype,
        overwrite=overwrite,
    )
    for _ in explain_stream(attribution, loader, writer=writer, **stream_options):
        pass
    return read_manifest(path)


def unpack_batch(batch: Any) -> tuple[tuple[Tensor, ...], Any]:
    """Split a loader batch into the tuple's image batches and an optional pair target."""
    if isinstance(batch, Mapping):
        if "images" not in batch:
            raise InputError(
                f"a mapping batch needs the key 'images' (and optionally 'target'); got keys "
                f"{sorted(map(str, batch))}. Pass unpack= for other layouts"
            )
        return _slots(batch["images"]), batch.get("target")
    if isinstance(batch, Tensor):
        return _slots(batch), None
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        *head, last = batch
        if len(batch) == 2 and _is_images(batch[0]) and not _is_image_batch(last):
            return _slots(batch[0]), last  # (images, target)
        if len(head) >= 2 and all(map(_is_image_batch, head)) and not _is_image_batch(last):
            return tuple(head), last  # (x1, x2, target), flat
        return _slots(batch), None
    raise InputError(
        f"cannot read a loader batch of type {type(batch).__name__}; yield (anchor, positive, "
        "negative) image batches, a (B, T, C, H, W) tensor, (images, target) or "
        "{'images': ..., 'target': ...}, or pass unpack="
    )


def _is_image_batch(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dim() == 4


def _is_images(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.dim() == 5
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_image_batch(s) for s in x)


def _slots(images: Any) -> tuple[Tensor, ...]:
    if isinstance(images, Tensor):
        if images.dim() != 5:
            raise InputError(
                f"a tensor batch must be (B, T, C, H, W), the tuple's slots along dim 1; got "
                f"shape {tuple(images.shape)}"
            )
        return tuple(images.unbind(1))
    if isinstance(images, (list, tuple)):
        return tuple(images)
    raise InputError(f"images must be a sequence of image batches, got {type(images).__name__}")


def _to_device(x: Any, device: Union[None, str, torch.device]) -> Any:
    if device is None or not isinstance(x, Tensor):
        return x
    device = torch.device(device)
    # non_blocking only host -> device: a device -> host copy must be complete when used
    return x.to(device, non_blocking=device.type != "cpu")


def _stream_total(loader: Any) -> Optional[int]:
    """Tuples a loader will yield, when it can tell (for the progress bar only)."""
    batch_size = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "sampler", None)
    try:
        if batch_size is not None and sampler is not None:  # a DataLoader batching by itself
            count = len(sampler)
            return count - count % batch_size if getattr(loader, "drop_last", False) else count
        dataset = getattr(loader, "dataset", None)
        return None if dataset is None else len(dataset)
    except TypeError:  # iterable datasets and samplers without a length
        return None
