"""Retrieval with an embedding model, and why each match was retrieved.

Images are embedded in batches (L2-normalised), optionally through an on-disk cache of
gallery embeddings (:func:`embed_gallery`); a query is ranked against a gallery by exact
cosine similarity (with faiss when it is installed, else torch); and each (query, match)
pair is explained as a same-class pair: its maps show what makes the two images similar
to the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .attribution import EmbeddingAttribution
from .errors import InputError
from .layers import embedding_matrix
from .maps import scale_maps, upsample_maps
from .preprocess import ImageLike, Preprocessing, preprocess_images
from .state import model_device, preserved_state
from .viz import plot_retrieval
from .weights import l2_normalize

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "list_labelled_images",
    "embed_images",
    "embed_gallery",
    "model_fingerprint",
    "faiss_available",
    "rank_gallery",
    "RetrievalExplanation",
    "explain_matches",
]

#: File extensions :func:`list_images` treats as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(directory: "str | os.PathLike[str]") -> list[Path]:
    """The image files directly inside ``directory``, sorted by name.

    Raises:
        InputError: the directory does not exist or holds no image file.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InputError(
            f"no image files in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_labelled_images(
    sources: "Sequence[str | os.PathLike[str]] | str | os.PathLike[str]",
) -> tuple[list[Path], list[Optional[str]]]:
    """Image files and their labels, taken from the names of class folders.

    Each source is an image file (no label) or a folder: the images directly inside it
    have no label, and the images in each of its sub-folders are labelled with that
    sub-folder's name (``gallery/cat/1.jpg`` is a ``cat``). Images are sorted by path.

    Raises:
        InputError: a source does not exist, is not an image, or no image was found.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("cat/1.png", "dog/2.png", "3.png"):
        ...     (root / name).parent.mkdir(exist_ok=True)
        ...     Image.new("RGB", (8, 8)).save(root / name)
        >>> paths, labels = list_labelled_images(root)
        >>> [p.relative_to(root).as_posix() for p in paths], labels
        (['3.png', 'cat/1.png', 'dog/2.png'], [None, 'cat', 'dog'])
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[tuple[Path, Optional[str]]] = []
    for source in map(Path, sources):
        if source.is_file():
            if source.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(
                    f"{source} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
                )
            found.append((source, None))
        elif source.is_dir():
            for entry in sorted(source.iterdir()):
                if _is_image(entry):
                    found.append((entry, None))
                elif entry.is_dir():
                    found += [(p, entry.name) for p in sorted(entry.iterdir()) if _is_image(p)]
        else:
            raise InputError(f"image file or folder not found: {source}")
    if not found:
        names = ", ".join(str(s) for s in sources) or "(nothing given)"
        raise InputError(
            f"no image files in {names} or its class sub-folders "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return [p for p, _ in found], [label for _, label in found]


def embed_images(
    model: nn.Module,
    images: Sequence[ImageLike],
    preprocessing: Preprocessing,
    batch_size: int = 32,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """L2-normalised embeddings ``(N, d)`` of image files or PIL images, on the CPU.

    Images are loaded and embedded ``batch_size`` at a time in eval mode without
    gradients; the model's modes are restored afterwards. ``on_batch(n)`` is called
    after each batch with the number of images it held (for progress bars).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive number of images, got {batch_size}")
    device = model_device(model) or torch.device("cpu")
    parts = []
    with preserved_state(model, eval_mode=True), torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = preprocess_images(images[start : start + batch_size], preprocessing)
            output = model(batch.to(device))
            parts.append(l2_normalize(embedding_matrix(output, batch.shape[0]).float()).cpu())
            if on_batch is not None:
                on_batch(batch.shape[0])
    if not parts:
        raise InputError("no images to embed")
    return torch.cat(parts)


# --------------------------------------------------------------------------- gallery cache

_CACHE_FORMAT = 1
_CACHE_METADATA_KEY = "simexplain_gallery_cache"


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the model's state dict (names, dtypes, shapes and values).

    Two models with the same fingerprint compute the same embeddings; used to tell
    whether cached embeddings still belong to a model (random weights change per run).

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(a)
        True
        >>> model_fingerprint(a) == model_fingerprint(b)
        False
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_key(model: nn.Module, preprocessing: Preprocessing, model_spec: str) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "model_spec": model_spec,
        "weights_sha256": model_fingerprint(model),
        # A transform's repr names its sizes and statistics; a lambda's repr holds its
        # address, so caching is simply off for transforms that cannot be described.
        "preprocessing": repr(preprocessing.transform),
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
    }


def _read_cache(path: Path, key: dict[str, Any]) -> dict[tuple, Tensor]:
    """Cached embeddings by file entry, or nothing if the cache is absent or stale."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            manifest = json.loads((handle.metadata() or {})[_CACHE_METADATA_KEY])
            embeddings = handle.get_tensor("embeddings")
    except Exception:  # unreadable or foreign file: rebuilt from scratch
        return {}
    files = manifest.get("files", [])
    if manifest.get("key") != key or len(files) != embeddings.shape[0]:
        return {}
    return {(f["path"], f["size"], f["mtime_ns"]): row for f, row in zip(files, embeddings)}


def _write_cache(
    path: Path, key: dict[str, Any], entries: list[dict[str, Any]], embeddings: Tensor
) -> None:
    from safetensors.torch import save

    from .files import atomic_write

    manifest = json.dumps({"key": key, "files": entries})
    data = save(
        {"embeddings": embeddings.contiguous()}, metadata={_CACHE_METADATA_KEY: manifest}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(data))


def embed_gallery(
    model: nn.Module,
    images: Sequence["str | os.PathLike[str]"],
    preprocessing: Preprocessing,
    *,
    cache: "str | os.PathLike[str] | None" = None,
    model_spec: str = "",
    batch_size: int = 32,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """:func:`embed_images` of image files, reusing embeddings cached in a file.

    The cache is a safetensors file holding the embeddings and, in its metadata, a
    manifest: each file's absolute path, size and modification time, the model spec,
    a fingerprint of the weights (:func:`model_fingerprint`) and the preprocessing.
    Files whose path, size and modification time are unchanged are not read again;
    new or changed files are embedded and the cache rewritten (atomically). A cache
    written for other weights or preprocessing is ignored and replaced. Nothing is
    unpickled, so a cache from elsewhere is safe to open.

    Args:
        model, images, preprocessing, batch_size: as for :func:`embed_images`.
        cache: the cache file (e.g. ``gallery.safetensors``); ``None`` for no cache.
        model_spec: how the model was named (e.g. ``"timm:resnet50"``), kept in the
            manifest and part of its key.
        on_batch: called with the number of images of each embedded batch, and once
            with the number of images taken from the cache.

    Example:
        >>> import tempfile, torchvision
        >>> from PIL import Image
        >>> from torchvision import transforms as T
        >>> folder = Path(tempfile.mkdtemp())
        >>> files = [folder / f"{i}.png" for i in range(3)]
        >>> for i, f in enumerate(files):
        ...     Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(f)
        >>> prep = Preprocessing(T.ToTensor(), (0.0,) * 3, (1.0,) * 3)
        >>> model = torchvision.models.resnet18(num_classes=8)
        >>> first = embed_gallery(model, files, prep, cache=folder / "cache.safetensors")
        >>> again = embed_gallery(model, files, prep, cache=folder / "cache.safetensors")
        >>> torch.equal(first, again), tuple(first.shape)
        (True, (3, 8))
    """
    if cache is None:
        return embed_images(model, images, preprocessing, batch_size, on_batch)
    cache_path = Path(cache)
    if cache_path.is_dir():
        raise InputError(f"cache {cache_path} is a folder; give a file such as gallery.safetensors")
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
    entries = [_file_entry(p) for p in paths]
    key = _cache_key(model, preprocessing, model_spec)
    cached = _read_cache(cache_path, key)
    rows: list[Optional[Tensor]] = [
        cached.get((e["path"], e["size"], e["mtime_ns"])) for e in entries
    ]
    missing = [i for i, row in enumerate(rows) if row is None]
    reused = len(paths) - len(missing)
    if reused and on_batch is not None:
        on_batch(reused)
    if missing:
        todo = [paths[i] for i in missing]
        fresh = embed_images(model, todo, preprocessing, batch_size, on_batch)
        for i, row in zip(missing, fresh):
            rows[i] = row
    embeddings = torch.stack([row for row in rows if row is not None]).float()
    if missing or len(cached) != len(paths):
        _write_cache(cache_path, key, entries, embeddings)
    return embeddings


# --------------------------------------------------------------------------- ranking


def faiss_available() -> bool:
    """Whether ``import faiss`` works (the optional ``faiss`` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


_BACKENDS = ("auto", "torch", "faiss")


def rank_gallery(
    queries: Tensor, gallery: Tensor, top_k: int, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Exact cosine ranking: the ``top_k`` gallery rows most similar to each query row.

    Args:
        queries: ``(Q, d)`` L2-normalised embeddings.
        gallery: ``(G, d)`` L2-normalised embeddings.
        top_k: matches per query; at most ``G`` are returned.
        backend: ``"torch"`` (a matrix product), ``"faiss"`` (an exact inner-product
            index, ``faiss.IndexFlatIP``, on the CPU; needs the ``faiss`` extra), or
            ``"auto"``: faiss when it is installed and the embeddings are on the CPU,
            else torch. Both give the same matches (up to the order of exact ties).

    Returns:
        ``similarities`` and ``indices``, both ``(Q, min(top_k, G))``, best first.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> g = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
        >>> sims, idx = rank_gallery(q, g, top_k=2)
        >>> idx.tolist(), sims.tolist()
        ([[2, 1]], [[1.0, 0.6000000238418579]])
    """
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputError(
            f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} must be "
            "(Q, d) and (G, d) embeddings of the same dimension d"
        )
    if backend not in _BACKENDS:
        raise InputError(f"backend must be one of {', '.join(_BACKENDS)}; got {backend!r}")
    count = min(top_k, gallery.shape[0])
    on_cpu = queries.device.type == "cpu" and gallery.device.type == "cpu"
    if backend == "faiss" or (backend == "auto" and on_cpu and faiss_available()):
        return _rank_with_faiss(queries, gallery, count)
    similarities = queries @ gallery.T
    return similarities.topk(count, dim=1)


def _rank_with_faiss(queries: Tensor, gallery: Tensor, count: int) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError:
        from .errors import MissingExtraError

        raise MissingExtraError(
            "backend='faiss' needs faiss: pip install 'simexplain[faiss]' (or faiss-cpu)"
        ) from None
    import numpy as np

    def as_array(x: Tensor) -> "np.ndarray":
        return np.ascontiguousarray(x.detach().float().cpu().numpy())

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(as_array(gallery))
    similarities, indices = index.search(as_array(queries), count)
    return (
        torch.from_numpy(similarities).to(queries.device, queries.dtype),
        torch.from_numpy(indices).to(queries.device),
    )


@dataclass
class RetrievalExplanation:
    """A query, its top matches, and the maps of each (query, match) pair.

    Attributes:
        query_image: ``(C, H, W)`` the query as the model saw it.
        gallery_images: ``(k, C, H, W)`` the matches, best first.
        query_maps: ``(k, H, W)`` the query's map for each match, in [0, 1].
        gallery_maps: ``(k, H, W)`` each match's map, in [0, 1].
        similarities: ``(k,)`` cosine similarity of each match to the query.
        names: a name per match (e.g. its file name), or empty.
        mean, std: the normalisation of the images, used to display them.
    """

    query_image: Tensor
    gallery_images: Tensor
    query_maps: Tensor
    gallery_maps: Tensor
    similarities: Tensor
    names: tuple[str, ...] = ()
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def plot(self, query_title: str = "query", cmap: str = "jet", alpha: float = 0.5) -> Figure:
        """The query and its matches with their maps (:func:`~simexplain.viz.plot_retrieval`)."""
        return plot_retrieval(
            self.query_image,
            self.gallery_images,
            self.query_maps,
            self.gallery_maps,
            self.similarities,
            mean=self.mean,
            std=self.std,
            gallery_titles=self.names or None,
            query_title=query_title,
            cmap=cmap,
            alpha=alpha,
        )


def explain_matches(
    attribution: EmbeddingAttribution,
    query: Tensor,
    matches: Tensor,
    *,
    names: Sequence[str] = (),
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> RetrievalExplanation:
    """Explain why each of ``matches`` is similar to ``query``.

    Every (query, match) pair is explained as a same-class pair (``target=True``), so
    both maps show the evidence for similarity. Maps are upsampled to the images and
    scaled to [0, 1].

    Args:
        attribution: an :class:`EmbeddingAttribution` of the model (reused across
            queries, so the layer is found once).
        query: ``(C, H, W)`` the preprocessed query.
        matches: ``(k, C, H, W)`` the preprocessed matches.
        names, mean, std: carried into the result for figures.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=16)
        >>> result = explain_matches(
        ...     EmbeddingAttribution(model), torch.randn(3, 64, 64), torch.randn(2, 3, 64, 64)
        ... )
        >>> tuple(result.query_maps.shape), tuple(result.gallery_maps.shape)
        ((2, 64, 64), (2, 64, 64))
    """
    if query.dim() != 3 or matches.dim() != 4 or matches.shape[1:] != query.shape:
        raise InputError(
            f"query {tuple(query.shape)} and matches {tuple(matches.shape)} must be "
            "(C, H, W) and (k, C, H, W) images of the same size"
        )
    count = matches.shape[0]
    device = model_device(attribution.model) or torch.device("cpu")
    queries = query.unsqueeze(0).expand(count, -1, -1, -1).to(device)
    result = attribution.attribute_tuples(
        (queries, matches.to(device)), target=torch.ones(count, dtype=torch.bool)
    )
    size = tuple(query.shape[-2:])
    maps = scale_maps(upsample_maps(result.maps.flatten(0, 1), size)).reshape(count, 2, *size)
    embeddings = result.embeddings.cpu()
    return RetrievalExplanation(
        query_image=query.detach().cpu(),
        gallery_images=matches.detach().cpu(),
        query_maps=maps[:, 0].cpu(),
        gallery_maps=maps[:, 1].cpu(),
        similarities=(embeddings[:, 0] * embeddings[:, 1]).sum(-1),
        names=tuple(names),
        mean=mean,
        std=std,
    )
