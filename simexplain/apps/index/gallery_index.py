"""``GalleryIndex``: a gallery embedded once, with what its maps need kept for later.

Building an index runs every gallery image through the model once, as embedding it for
retrieval does, and keeps each image's L2-normalised embedding and the values crossing
the cut at the explained layer (:mod:`~simexplain.engine.head_split`). Explaining a match
then runs only the head after the layer on the stored values
(:meth:`GalleryIndex.explain`). A model that cannot be split is indexed by its
embeddings alone, with a one-line notice (or on request, ``activations=False``); its
matches are then explained by running the model on the gallery's images again. Building
into a folder that holds an index of another gallery for the same model updates it,
embedding only the new and changed image files (:mod:`~simexplain.apps.index.building`).
A model that is not a PyTorch module (an ONNX model, a function) is indexed by its
embeddings, and its matches are explained by a black-box method
(:mod:`~simexplain.apps.index.blackbox`).

Under ``torchrun`` each rank embeds its own shards of the gallery into the shared
``path``; rank 0 writes the manifest once every shard is there.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._progress import progress_bar
from ...engine.state import model_device
from ...engine.stored import head_split
from ...errors import InputError
from ..gallery import model_fingerprint
from . import distributed
from .blackbox import (
    BLACK_BOX_REASON, BlackBoxEmbedder, Engine, index_engine, index_fingerprint, layer_key,
)
from .building import IndexMismatchError, build_shard, finish_build, plan_build
from .search import EmbeddingSearch
from .sources import GalleryLike, GallerySource, gallery_source
from .storage import RowStore

if TYPE_CHECKING:
    from .result import RetrievalResult

__all__ = ["GalleryIndex"]

_FORMAT = 1


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
        model: Any,
        engine: Engine,
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
        #: Why maps are recomputed with the full model (``None`` when the head runs alone).
        self.fallback_reason: Optional[str] = None
        #: The explained layer; ``None`` for a model that is not a PyTorch module.
        self.layer: Any = None
        self.split: Any = None
        if isinstance(engine, BlackBoxEmbedder):
            self.fallback_reason = BLACK_BOX_REASON
        elif manifest.get("activations", True):
            self.layer, split = head_split(engine, probe)
            self.split = split or None
            self.fallback_reason = None if split else split.reason
        else:
            self.layer, self.split = engine.feature_layer(probe), None
            self.fallback_reason = "the index keeps embeddings only (activations=False)"
        #: Gallery images the build that made this index ran through the model (0 for a
        #: loaded index); the others were taken from the index already there.
        self.rows_embedded = 0
        if self.split is not None and list(self.split.names) != manifest["crossing"]:
            raise IndexMismatchError(
                f"the index stores {manifest['crossing']} at the cut but this model's split "
                f"needs {list(self.split.names)}; build the index again for this model"
            )

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        model: Any,
        gallery: GalleryLike,
        labels: Optional[Sequence[Any]] = None,
        layer: Any = None,
        path: "Union[str, Path, None]" = None,
        dtype: torch.dtype = torch.float16,
        *,
        activations: bool = True,
        transform: Any = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shard_size: int = 1024,
        progress: Optional[bool] = None,
        on_batch: Optional[Callable[[int], None]] = None,
        output: Any = None,
        **layer_options: Any,
    ) -> "GalleryIndex":
        """Embed ``gallery`` once and keep what its maps need.

        Args:
            model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``: a PyTorch
                module, or a ``.onnx`` file, an ONNX Runtime session or any function,
                whose index keeps embeddings only (no ``layer``; kept under ``path`` only
                when it has a fingerprint, as an ONNX model has) and whose matches are
                explained by a black-box method (docs/blackbox.rst).
            gallery: images ``(G, C, H, W)``, a Dataset or DataLoader (items an image
                or ``(image, label)``), a folder of image files (labels from class
                sub-folders) or a list of files and folders.
            labels: one label per gallery image (overrides the source's labels).
            layer: the explained layer, as for :class:`~simexplain.EmbeddingAttribution`.
            path: a folder to keep the index in (memory-mapped shards; atomic and
                resumable: building again into the same folder with the same model and
                gallery skips finished shards). A folder holding the index of another
                gallery built the same way (same model, layer, dtype, image shape and
                shard size) is updated: only new and changed image files (by resolved
                path, size and modification time) are embedded, the rows of the others
                are copied, and the new index replaces the old one once complete (see
                :mod:`~simexplain.apps.index.building`). A tensor gallery is recognised
                by its contents, a Dataset by its length only. Anything else raises
                :class:`IndexMismatchError`. ``None`` keeps the index in memory.
            dtype: how activations are stored: ``torch.float16`` (default, with a
                power-of-two scale per image), ``torch.bfloat16`` or ``torch.float32``
                (maps then equal the full forward's).
            activations: keep the activations crossing the cut; ``False`` keeps the
                embeddings only (matches are then explained by running the model on
                the gallery's images again).
            transform: preprocessing for image files (default: the model's timm config,
                else ImageNet's). One whose description holds a memory address (a
                lambda) cannot be recognised again: an index built with it is rebuilt.
            batch_size, num_workers: how gallery images are read and embedded.
            shard_size: gallery images per shard on disk (the unit of resuming and of
                splitting work between torchrun ranks).
            progress: show a progress bar (``None``: when stderr is a terminal; on rank
                0 only).
            on_batch: called with the number of images of each batch this rank embeds,
                and once with the number it takes from the index already there.
            output: for a model returning more than the embedding: a key, an index or a
                callable picking it (as for :func:`~simexplain.explain`); for an ONNX
                model, the name or index of its embedding output.
            **layer_options: ``layout``, ``num_prefix_tokens``, ``reshape_transform``.

        The index's :attr:`rows_embedded` says how many images were run through the
        model (by every rank), :attr:`rows_reused` how many were taken from the folder.

        Example:
            >>> import tempfile, torchvision
            >>> from PIL import Image
            >>> from torchvision.transforms import ToTensor
            >>> root = Path(tempfile.mkdtemp())
            >>> (root / "gallery").mkdir()
            >>> for i in range(3):
            ...     Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(root / "gallery" / f"{i}.png")
            >>> model = torchvision.models.resnet18(num_classes=8)
            >>> first = GalleryIndex.build(model, root / "gallery", path=root / "index",
            ...                            transform=ToTensor())
            >>> Image.new("RGB", (32, 32), (0, 0, 255)).save(root / "gallery" / "3.png")
            >>> index = GalleryIndex.build(model, root / "gallery", path=root / "index",
            ...                            transform=ToTensor())
            >>> len(index), index.rows_embedded, index.rows_reused
            (4, 1, 3)
        """
        if shard_size < 1:
            raise InputError(f"shard_size must be a positive number of images, got {shard_size}")
        model, engine = index_engine(model, layer, output, layer_options)
        activations = activations and isinstance(model, nn.Module)
        source = gallery_source(gallery, model, transform=transform, batch_size=batch_size,
                                num_workers=num_workers)
        if labels is not None:
            labels = list(labels)
            if len(labels) != len(source):
                raise InputError(f"labels has {len(labels)} entries for {len(source)} gallery "
                                 "images; pass one label per image")
        device = model_device(model) or torch.device("cpu")
        sample = next(source.batches(range(min(2, len(source)))))[0].to(device)
        found, split = None, None  # a black-box model: no layer, embeddings only
        if activations:
            found, split = head_split(engine, sample)
            if not split and distributed.is_main():
                warnings.warn(f"simexplain: the index keeps embeddings only, and explaining "
                              f"a match runs the full model: {split.reason}", stacklevel=2)
        elif not isinstance(engine, BlackBoxEmbedder):
            found = engine.feature_layer(sample)
        store_path = Path(path) if path is not None else None
        rank, world = distributed.rank_and_world()
        if world > 1 and store_path is None:
            raise InputError("under torchrun, build the index with path=: the ranks share "
                             "it through its files")
        identity = source.identity() if store_path is not None else {}
        key = {
            "format": _FORMAT,
            "fingerprint": index_fingerprint(model, store_path),
            **layer_key(found),
            "image_shape": list(sample.shape[1:]),
            "dtype": str(dtype).removeprefix("torch."),
            "activations": activations,
            "crossing": list(split.names) if split else [],
            "shard_size": shard_size,
            "count": len(source),
            "gallery_sha256": hashlib.sha256(
                json.dumps([source.names, identity]).encode()).hexdigest(),
        }
        plan = plan_build(store_path, key, identity, dtype)
        store = RowStore(plan.folder, dtype)
        shards = range(0, -(-len(source) // shard_size))
        mine = [range(n * shard_size, min((n + 1) * shard_size, len(source)))
                for n in shards if n % world == rank]
        bar = progress_bar(len(source), "indexing gallery", "img",
                           progress if distributed.is_main() else False)

        def advance(count: int) -> None:
            bar.update(count * world)
            if on_batch is not None:
                on_batch(count)

        embedded = 0
        with bar:
            todo = [rows for rows in mine if not store.shard_done(rows.start // shard_size)]
            skipped = sum(map(len, mine)) - sum(len(rows) - len(plan.reused(rows))
                                                for rows in todo)
            if skipped:
                advance(skipped)
            for rows in todo:
                embedded += build_shard(store, rows.start // shard_size, rows, plan, source,
                                        engine, split, device, advance)
        distributed.barrier()
        found_labels = labels if labels is not None else _labels(store, shards, source)
        manifest = {**key, **identity,
                    "shard_rows": [store.shard_info(n)["rows"] for n in shards],
                    "names": source.names, "labels": found_labels}
        store = finish_build(plan, store, manifest)
        index = cls(model, engine, store, manifest, source)
        index.rows_embedded = sum(distributed.gathered({rank: embedded}).values())
        return index

    @classmethod
    def load(
        cls,
        path: "Union[str, Path]",
        model: Any,
        gallery: Optional[GalleryLike] = None,
        *,
        transform: Any = None,
        output: Any = None,
        **layer_options: Any,
    ) -> "GalleryIndex":
        """Reopen the index built under ``path`` for ``model`` (``output=`` as it was
        built with).

        Raises :class:`IndexMismatchError` when ``model``'s weights differ from those it
        was built with (for an ONNX model, its file's bytes). ``gallery`` (as given to
        :meth:`build`) lets results show the gallery's images; an index of image files
        finds them by their paths.
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
        model, engine = index_engine(model, manifest["layer"] or None, output, {
            "layout": manifest["layout"], "num_prefix_tokens": manifest["num_prefix_tokens"],
            **layer_options})
        if manifest["fingerprint"] != model_fingerprint(model):
            raise IndexMismatchError(
                f"the index in {folder} was built with other model weights (fingerprint "
                f"{manifest['fingerprint'][:12]}...); load it with the model it was built with, "
                "or build a new index for this model"
            )
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
    def rows_reused(self) -> int:
        """Gallery images taken from the index already there rather than embedded."""
        return len(self) - self.rows_embedded

    @property
    def splits(self) -> bool:
        """Whether matches are explained by the head alone (else the full model)."""
        return self.split is not None

    def disk_bytes(self) -> int:
        """Bytes the index's shards take on disk (0 in memory)."""
        return self.store.disk_bytes()

    @property
    def blackbox(self) -> bool:
        """Whether the model is not a PyTorch module (an ONNX model, a function): the
        index keeps embeddings only and explains matches with a black-box method."""
        return isinstance(self.engine, BlackBoxEmbedder)

    def __repr__(self) -> str:
        if self.blackbox:
            return f"GalleryIndex({len(self)} images, embeddings only, maps by black-box methods)"
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
