"""Embedding image files for retrieval, with the gallery's embeddings kept in a
:class:`~simexplain.GalleryIndex` between runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.preprocessing import ImageLike, Preprocessing, preprocess_images
from ..engine.embeddings import embedding_matrix
from ..engine.state import model_device, preserved_state
from ..errors import InputError

__all__ = ["embed_images", "embed_gallery", "model_fingerprint", "tensor_sha256"]


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


def model_fingerprint(model: Any) -> str:
    """A SHA-256 of the model's state dict (names, dtypes, shapes and values), or of an
    ONNX model's bytes (:meth:`OnnxModel.fingerprint
    <simexplain.apps.onnx_model.OnnxModel.fingerprint>`).

    Two models with the same fingerprint compute the same embeddings; used to tell
    whether stored embeddings still belong to a model (random weights change per run).
    Any other model (a function) has none: :class:`~simexplain.errors.InputError`.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(a)
        True
        >>> model_fingerprint(a) == model_fingerprint(b)
        False
    """
    if not isinstance(model, nn.Module):
        fingerprint = getattr(model, "fingerprint", None)  # an OnnxModel
        if callable(fingerprint):
            return fingerprint()
        raise InputError(
            f"a gallery index on disk is stamped with a fingerprint of the model, so that "
            f"another model is refused; a {type(model).__name__} has none: keep the index in "
            "memory (path=None), or give the PyTorch module or the .onnx file"
        )
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        _add_tensor(digest, f"{name}|", tensor)
    return digest.hexdigest()


def tensor_sha256(tensor: Tensor) -> str:
    """A SHA-256 of a tensor's dtype, shape and values (e.g. to recognise a gallery).

    >>> tensor_sha256(torch.zeros(2)) == tensor_sha256(torch.zeros(2))
    True
    >>> tensor_sha256(torch.zeros(2)) == tensor_sha256(torch.zeros(1, 2))
    False
    """
    digest = hashlib.sha256()
    _add_tensor(digest, "", tensor)
    return digest.hexdigest()


def _add_tensor(digest: "hashlib._Hash", prefix: str, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{prefix}{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def embed_gallery(
    model: nn.Module,
    images: Sequence["str | os.PathLike[str]"],
    preprocessing: Preprocessing,
    *,
    cache: "str | os.PathLike[str] | None" = None,
    batch_size: int = 32,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """:func:`embed_images` of image files, reusing the embeddings kept in a gallery index.

    The cache is a folder holding a :class:`~simexplain.GalleryIndex` of embeddings only
    (``activations=False``), stamped with a fingerprint of the weights
    (:func:`model_fingerprint`), the preprocessing and each file's resolved path, size
    and modification time. Files whose path, size and modification time are unchanged
    are not read again; new or changed files are embedded and the index replaced
    atomically. Another preprocessing embeds every file again; other weights raise
    :class:`~simexplain.apps.index.IndexMismatchError` (choose another folder). The
    index also serves :meth:`GalleryIndex.load <simexplain.GalleryIndex.load>`, and
    nothing in it is unpickled, so a cache from elsewhere is safe to open.

    Args:
        model, images, preprocessing, batch_size: as for :func:`embed_images`; with a
            cache the model must be one whose layer simexplain finds (as for
            :func:`~simexplain.explain`).
        cache: the cache folder; ``None`` for no cache.
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
        >>> first = embed_gallery(model, files, prep, cache=folder / "cache")
        >>> again = embed_gallery(model, files, prep, cache=folder / "cache")
        >>> torch.equal(first, again), tuple(first.shape)
        (True, (3, 8))
    """
    if cache is None:
        return embed_images(model, images, preprocessing, batch_size, on_batch)
    from .index.gallery_index import GalleryIndex

    folder = Path(cache)
    if folder.is_file():
        raise InputError(f"cache {folder} is a file (an older simexplain's gallery cache?); "
                         "the cache is now a folder holding a gallery index: name a folder, "
                         "such as gallery-cache/")
    index = GalleryIndex.build(model, [Path(p) for p in images], path=folder, progress=False,
                               activations=False, transform=preprocessing,
                               batch_size=batch_size, on_batch=on_batch)
    return index.embeddings
