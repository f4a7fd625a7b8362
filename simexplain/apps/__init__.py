"""Applications of the maps: the one call ``explain``, retrieval, the HTML report,
segmentation, streaming many tuples to disk, and loading models from a spec.

Names load on first use, so ``import simexplain.apps`` is light.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "explain": ".explanation",
    "Explanation": ".explanation",
    "embed_images": ".gallery",
    "embed_gallery": ".gallery",
    "model_fingerprint": ".gallery",
    "rank_gallery": ".retrieval",
    "faiss_available": ".retrieval",
    "explain_matches": ".retrieval",
    "RetrievalExplanation": ".retrieval",
    "GalleryIndex": ".index",
    "RetrievalResult": ".index",
    "RetrievalFailures": ".index",
    "retrieval_report": ".report",
    "RetrievalReport": ".report",
    "segment": ".segmentation",
    "similarity_cue": ".segmentation",
    "grabcut_mask": ".segmentation",
    "binary_iou": ".segmentation",
    "SegmentationResult": ".segmentation",
    "explain_stream": ".stream",
    "explain_to_disk": ".stream",
    "StreamItem": ".stream",
    "MapWriter": ".map_store",
    "load_maps": ".map_store",
    "iter_shards": ".map_store",
    "read_manifest": ".map_store",
    "load_model": ".models",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
