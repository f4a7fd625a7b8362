"""Retrieval with an embedding model, and why each match was retrieved.

Images are embedded in batches (L2-normalised), a query is ranked against a gallery by
exact cosine similarity, and each (query, match) pair is explained as a same-class
pair: its maps show what makes the two images similar to the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .attribution import EmbeddingAttribution
from .errors import InputError
from .layers import embedding_matrix
from .maps import scale_maps, upsample_maps
from .preprocess import ImageLike, Preprocessing, preprocess_images
from .state import preserved_state
from .viz import plot_retrieval
from .weights import l2_normalize

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "embed_images",
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


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


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
    device = _model_device(model)
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


def rank_gallery(queries: Tensor, gallery: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Exact cosine ranking: the ``top_k`` gallery rows most similar to each query row.

    Args:
        queries: ``(Q, d)`` L2-normalised embeddings.
        gallery: ``(G, d)`` L2-normalised embeddings.
        top_k: matches per query; at most ``G`` are returned.

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
    similarities = queries @ gallery.T
    return similarities.topk(min(top_k, gallery.shape[0]), dim=1)


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
    device = _model_device(attribution.model)
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
