"""Embedding image files for retrieval, with an on-disk cache of gallery embeddings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import atomic_write
from ..data.preprocessing import ImageLike, Preprocessing, preprocess_images
from ..engine.embeddings import embedding_matrix
from ..engine.state import model_device, preserved_state
from ..errors import InputError

__all__ = ["embed_images", "embed_gallery", "model_fingerprint"]


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
            embeddings = embedding_matrix(output, batch.shape[0]).float()
            parts.append(F.normalize(embeddings, dim=-1).cpu())
            if on_batch is not None:
                on_batch(batch.shape[0])
    if not parts:
        raise InputError("no images to embed")
    return torch.cat(parts)


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
