"""``GalleryIndex``: a gallery embedded once, with what its maps need kept for later.

Building an index runs every gallery image through the model once, as embedding it for
retrieval does, and keeps each image's L2-normalised embedding and the values crossing
the cut at the explained layer (:mod:`~simexplain.engine.head_split`). Explaining a match
then runs only the head after the layer on the stored values
(:meth:`GalleryIndex.explain`). A model that cannot be split is indexed by its
embeddings alone, with a one-line notice; its matches are then explained by running the
model on the gallery's images again.

Under ``torchrun`` each rank embeds its own shards of the gallery into the shared
``path``; rank 0 writes the manifest once every shard is there.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._progress import progress_bar
from ...engine.engine import SimilarityEngine
from ...engine.state import model_device
from ...engine.stored import head_split, run_trunk
from ...errors import InputError
from ..gallery import model_fingerprint
from . import distributed
from .search import EmbeddingSearch
from .sources import GalleryLike, GallerySource, gallery_source
from .storage import RowStore

if TYPE_CHECKING:
    from .result import RetrievalResult

__all__ = ["GalleryIndex", "IndexMismatchError"]

_FORMAT = 1


class IndexMismatchError(InputError):
    """An index on disk was built with another model, layer or gallery."""


class GalleryIndex:
    """A gallery's embeddings and stored activations, searchable and explainable.

    Build one with :meth:`build`, reopen one with :meth:`load`. ``len(index)`` is the
    number of gallery images; ``index.labels`` and ``index.names`` have one entry each.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=16)
        >>> gallery = torch.randn(12, 3, 64, 64)
        >>> index = GalleryIndex.build(model, gallery, labels=[i % 3 for i in range(12)])
        >>> result = index.explain(gallery[:2], top_k=3, labels=[0, 1])
        >>> tuple(result.indices.shape), tuple(result.gallery_maps.shape)
        ((2, 3), (2, 3, 2, 2))
    """

    def __init__(
        self,
        model: nn.Module,
        engine: SimilarityEngine,
        store: RowStore,
        manifest: dict,
        source: Optional[GallerySource],
    ) -> None:
        self.model, self.engine, self.store = model, engine, store
        self.manifest, self.source = manifest, source
        self.embeddings = store.embeddings(len(manifest["shard_rows"]))
        self._search = EmbeddingSearch(self.embeddings)
        image_shape = tuple(manifest["image_shape"])
        probe = torch.zeros(2, *image_shape, device=model_device(model))
        self.layer, split = head_split(engine, probe)
        self.split = split or None
        #: Why maps are recomputed with the full model (``None`` when the head runs alone).
        self.fallback_reason: Optional[str] = None if split else split.reason
        if self.split is not None and list(self.split.names) != manifest["crossing"]:
            raise IndexMismatchError(
                f"the index stores {manifest['crossing']} at the cut but this model's split "
                f"needs {list(self.split.names)}; build the index again for this model"
            )

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        model: nn.Module,
        gallery: GalleryLike,
        labels: Optional[Sequence[Any]] = None,
        layer: Any = None,
        path: "Union[str, Path, None]" = None,
        dtype: torch.dtype = torch.float16,
        *,
        transform: Any = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shard_size: int = 1024,
        progress: Optional[bool] = None,
        output: Any = None,
        **layer_options: Any,
    ) -> "GalleryIndex":
        """Embed ``gallery`` once and keep what its maps need.

        Args:
            model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``.
            gallery: images ``(G, C, H, W)``, a Dataset or DataLoader (items an image
                or ``(image, label)``), a folder of image files (labels from class
                sub-folders) or a list of files and folders.
            labels: one label per gallery image (overrides the source's labels).
            layer: the explained layer, as for :class:`~simexplain.EmbeddingAttribution`.
            path: a folder to keep the index in (memory-mapped shards; atomic and
                resumable: building again into the same folder with the same model and
                gallery skips finished shards). ``None`` keeps it in memory.
            dtype: how activations are stored: ``torch.float16`` (default, with a
                power-of-two scale per image), ``torch.bfloat16`` or ``torch.float32``
                (maps then equal the full forward's).
            transform: preprocessing for image files (default: the model's timm config,
                else ImageNet's).
            batch_size, num_workers: how gallery images are read and embedded.
            shard_size: gallery images per shard on disk (the unit of resuming and of
                splitting work between torchrun ranks).
            progress: show a progress bar (``None``: when stderr is a terminal; on rank
                0 only).
            output: for a model returning more than the embedding: a key, an index or a
                callable picking it (as for :func:`~simexplain.explain`).
            **layer_options: ``layout``, ``num_prefix_tokens``, ``reshape_transform``.
        """
        if shard_size < 1:
            raise InputError(f"shard_size must be a positive number of images, got {shard_size}")
        engine = SimilarityEngine(model, layer, output=output, **layer_options)
        source = gallery_source(gallery, model, transform=transform, batch_size=batch_size,
                                num_workers=num_workers)
        if labels is not None:
            labels = list(labels)
            if len(labels) != len(source):
                raise InputError(f"labels has {len(labels)} entries for {len(source)} gallery "
                                 "images; pass one label per image")
        device = model_device(model) or torch.device("cpu")
        sample = next(source.batches(0, min(2, len(source))))[0].to(device)
        found, split = head_split(engine, sample)
        if not split and distributed.is_main():
            warnings.warn(f"simexplain: the index keeps embeddings only, and explaining a "
                          f"match runs the full model: {split.reason}", stacklevel=2)
        store_path = Path(path) if path is not None else None
        rank, world = distributed.rank_and_world()
        if world > 1 and store_path is None:
            raise InputError("under torchrun, build the index with path=: the ranks share "
                             "it through its files")
        key = {
            "format": _FORMAT,
            "fingerprint": model_fingerprint(model),
            "layer": found.name,
            "call_index": found.call_index,
            "layout": found.layout,
            "num_prefix_tokens": found.num_prefix_tokens,
            "image_shape": list(sample.shape[1:]),
            "dtype": str(dtype).removeprefix("torch."),
            "crossing": list(split.names) if split else [],
            "count": len(source),
            "names_sha256": hashlib.sha256("\n".join(source.names).encode()).hexdigest(),
            "shard_size": shard_size,
        }
        store = RowStore(store_path, dtype)
        if store_path is not None:
            _claim(store_path, key)
        shards = range(0, -(-len(source) // shard_size))
        mine = [n for n in shards if n % world == rank]
        bar = progress_bar(len(source), "indexing gallery", "img",
                           progress if distributed.is_main() else False)
        with bar:
            for number in mine:
                start, stop = number * shard_size, min((number + 1) * shard_size, len(source))
                if not store.shard_done(number):
                    _index_shard(store, number, source, start, stop, engine, split, device,
                                 bar, world)
                else:
                    bar.update((stop - start) * world)
        distributed.barrier()
        found_labels = labels if labels is not None else _labels(store, shards, source)
        manifest = {**key, "shard_rows": [store.shard_info(n)["rows"] for n in shards],
                    "names": source.names, "labels": found_labels}
        if distributed.is_main():
            store.write_manifest(manifest)
        distributed.barrier()
        return cls(model, engine, store, manifest, source)

    @classmethod
    def load(
        cls,
        path: "Union[str, Path]",
        model: nn.Module,
        gallery: Optional[GalleryLike] = None,
        *,
        transform: Any = None,
        output: Any = None,
        **layer_options: Any,
    ) -> "GalleryIndex":
        """Reopen the index built under ``path`` for ``model`` (``output=`` as it was
        built with).

        Raises :class:`IndexMismatchError` when ``model``'s weights differ from those it
        was built with. ``gallery`` (as given to :meth:`build`) lets results show the
        gallery's images; an index of image files finds them by their paths.
        """
        folder = Path(path)
        manifest_file = folder / "index.json"
        if not manifest_file.is_file():
            raise InputError(f"no complete index in {folder} (no index.json); build it with "
                             "GalleryIndex.build(model, gallery, path=...) or `simexplain index`")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != _FORMAT:
            raise IndexMismatchError(f"{folder} holds an index of format "
                                     f"{manifest.get('format')}; this simexplain reads {_FORMAT}")
        if manifest["fingerprint"] != model_fingerprint(model):
            raise IndexMismatchError(
                f"the index in {folder} was built with other model weights (fingerprint "
                f"{manifest['fingerprint'][:12]}...); load it with the model it was built with, "
                "or build a new index for this model"
            )
        engine = SimilarityEngine(model, manifest["layer"], layout=manifest["layout"],
                                  num_prefix_tokens=manifest["num_prefix_tokens"],
                                  output=output, **layer_options)
        dtype = getattr(torch, manifest["dtype"])
        source = None
        if gallery is not None:
            source = gallery_source(gallery, model, transform=transform)
        elif all(Path(name).is_file() for name in manifest["names"][:1]):
            source = gallery_source([Path(n) for n in manifest["names"]], model,
                                    transform=transform)
        if source is not None and len(source) != manifest["count"]:
            raise IndexMismatchError(f"the gallery has {len(source)} images but the index "
                                     f"was built from {manifest['count']}")
        return cls(model, engine, RowStore(folder, dtype), manifest, source)

    # ------------------------------------------------------------------ facts

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def labels(self) -> Optional[list[Any]]:
        """One label per gallery image, or ``None``."""
        return self.manifest["labels"]

    @property
    def names(self) -> list[str]:
        """One name per gallery image (file paths, or row numbers)."""
        return self.manifest["names"]

    @property
    def splits(self) -> bool:
        """Whether matches are explained by the head alone (else the full model)."""
        return self.split is not None

    def disk_bytes(self) -> int:
        """Bytes the index's shards take on disk (0 in memory)."""
        return self.store.disk_bytes()

    def __repr__(self) -> str:
        how = "head only" if self.splits else f"full model ({self.fallback_reason})"
        return (f"GalleryIndex({len(self)} images, layer {self.layer.name!r}, "
                f"{self.manifest['dtype']}, maps by {how})")

    # ------------------------------------------------------------------ use

    def search(self, query_embeddings: Tensor, top_k: int = 5, *,
               approximate: bool = False) -> tuple[Tensor, Tensor]:
        """``(similarities, indices)`` ``(Q, k)`` of the gallery images closest to each
        query embedding (normalised here), best first; faiss when it is installed
        (``approximate=True``: an HNSW graph, for large galleries), else torch."""
        queries = F.normalize(query_embeddings.detach().float().cpu(), dim=-1)
        return self._search(queries, top_k, approximate=approximate)

    def crossing(self, rows: Tensor) -> tuple[Tensor, ...]:
        """The stored crossing values of gallery ``rows``, in float32."""
        return self.store.crossing(rows, self.manifest["shard_rows"])

    def gallery_images(self, rows: Sequence[int]) -> Tensor:
        """The gallery's images of ``rows``; needs the gallery (see :meth:`load`)."""
        if self.source is None:
            raise InputError("the index was loaded without its gallery; pass gallery= to "
                             "GalleryIndex.load to show or recompute its images")
        return self.source.images(rows)

    def explain(self, queries: Any = None, top_k: int = 5, method: Optional[str] = None,
                labels: Optional[Sequence[Any]] = None, **options: Any) -> "RetrievalResult":
        """Search and explain: see :func:`~simexplain.apps.index.explain.explain_queries`."""
        from .explain import explain_queries

        return explain_queries(self, queries, top_k, method, labels, **options)


def _claim(path: Path, key: dict) -> None:
    """Record what is built under ``path``, or refuse a folder holding another index."""
    build_file = path / "build.json"
    if build_file.is_file():
        existing = json.loads(build_file.read_text())
        if existing != key:
            changed = sorted(k for k in key if existing.get(k) != key[k])
            raise IndexMismatchError(
                f"{path} holds an index built with another {', '.join(changed)}; choose "
                "another path, or delete that folder to rebuild"
            )
        return
    distributed.barrier()  # every rank reads the folder before rank 0 writes into it
    if distributed.is_main():
        path.mkdir(parents=True, exist_ok=True)
        from ..._files import atomic_write

        text = json.dumps(key).encode()
        atomic_write(build_file, lambda handle: handle.write(text))
    distributed.barrier()


def _index_shard(store: RowStore, number: int, source: GallerySource, start: int, stop: int,
                 engine: SimilarityEngine, split: Any, device: torch.device, bar: Any,
                 world: int) -> None:
    embeddings, crossing, labels = [], [], []
    for images, batch_labels in source.batches(start, stop):
        images = images.to(device)
        if split:
            raw, values = run_trunk(split, engine.model, images, engine.output)
            crossing.append([v.cpu() for v in values])
        else:
            raw = engine.embed(images)
        embeddings.append(F.normalize(raw.detach().float(), dim=-1).cpu())
        labels.extend(batch_labels or [None] * images.shape[0])
        bar.update(images.shape[0] * world)
    joined = [torch.cat(parts) for parts in zip(*crossing)] if crossing else []
    info = {"labels": labels} if any(x is not None for x in labels) else {}
    store.write_shard(number, torch.cat(embeddings), joined, info)


def _labels(store: RowStore, shards: range, source: GallerySource) -> Optional[list[Any]]:
    if source.labels is not None:
        return list(source.labels)
    found: list[Any] = []
    for number in shards:
        info = store.shard_info(number)
        if "labels" not in info:
            return None
        found.extend(info["labels"])
    return found
