"""Retrieval at gallery scale: a gallery embedded once, searched and explained by the
head after the layer alone, sharded over ``torchrun`` ranks.

Names load on first use.
"""

from ..._lazy import lazy_exports

_EXPORTS = {
    "GalleryIndex": ".gallery_index",
    "IndexMismatchError": ".building",
    "RetrievalResult": ".result",
    "RetrievalFailures": ".result",
    "explain_queries": ".explain",
    "retrieve_to_disk": ".to_disk",
    "iter_blocks": ".to_disk",
    "gallery_source": ".sources",
    "GallerySource": ".sources",
    "EmbeddingSearch": ".search",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
