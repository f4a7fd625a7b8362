"""simexplain: visual explanations for similarity (embedding) models.

GradCAM-style maps for pairs, triplets and quadruplets of images under any model that
maps an image to a vector, after Zheng et al., "Visual Similarity Attention".

>>> from simexplain import explain          # the one call most users make
>>> from simexplain import EmbeddingAttribution   # the captum attribution underneath

The names below load on first use: ``import simexplain`` imports torch and nothing
heavier (no captum, matplotlib, PIL, report or command line). The architecture, and
which sub-package may import which: ``docs/architecture.rst``.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # the one call
    "explain": ".apps.explanation",
    "Explanation": ".apps.explanation",
    "check_labels": ".engine.tuples",
    # the engine and its score contract
    "SimilarityEngine": ".engine",
    "SimilarityScore": ".engine",
    "Scores": ".engine",
    "TupleResult": ".engine",
    "FeatureLayer": ".engine",
    "find_feature_layer": ".engine",
    "upsample_maps": ".engine",
    "scale_maps": ".engine",
    "image_maps": ".engine",
    # methods
    "METHODS": ".methods",
    "get_method": ".methods",
    "register_method": ".methods",
    "SAMScore": ".methods",
    "CosineScore": ".methods",
    "same_class_pair_weights": ".methods.criteria",
    "different_class_pair_weights": ".methods.criteria",
    "pair_weights": ".methods.criteria",
    "triplet_weights": ".methods.criteria",
    "quadruplet_weights": ".methods.criteria",
    "similarity_scores": ".methods.criteria",
    # the captum face
    "EmbeddingAttribution": ".attribution",
    "TupleScore": ".attribution",
    "maps_to_input_shape": ".attribution",
    "to_image_attr": ".attribution",
    "visualize_map": ".attribution",
    # training
    "SAMLoss": ".training",
    "SAMLossParts": ".training",
    "SimilarityMiningLoss": ".training",
    "soft_mask": ".training",
    # applications
    "load_model": ".apps.models",
    "embed_images": ".apps.gallery",
    "embed_gallery": ".apps.gallery",
    "rank_gallery": ".apps.retrieval",
    "explain_matches": ".apps.retrieval",
    "RetrievalExplanation": ".apps.retrieval",
    "GalleryIndex": ".apps.index",
    "RetrievalResult": ".apps.index",
    "explain_correspondence": ".apps.correspondence",
    "Correspondence": ".apps.correspondence",
    "retrieval_report": ".apps.report",
    "segment": ".apps.segmentation",
    "explain_stream": ".apps.stream",
    "explain_to_disk": ".apps.stream",
    "load_maps": ".apps.map_store",
    "list_labelled_images": ".data.image_files",
    "plot_retrieval": ".viz.figures",
    # errors
    "SimExplainError": ".errors",
    "InputError": ".errors",
    "LayerError": ".errors",
    "ModelOutputError": ".errors",
    "ModelForwardError": ".errors",
    "ModelLoadError": ".errors",
    # sub-packages, so that ``simexplain.metrics.pointing_game`` works after ``import simexplain``
    "engine": ".engine",
    "methods": ".methods",
    "attribution": ".attribution",
    "training": ".training",
    "metrics": ".metrics",
    "data": ".data",
    "viz": ".viz",
    "apps": ".apps",
    "cli": ".cli",
    "demo": ".demo",
}

__all__ = [name for name in _EXPORTS if not _EXPORTS[name].endswith("." + name)]
__all__.append("__version__")
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static checkers and IDEs see
    from .apps.correspondence import Correspondence, explain_correspondence
    from .apps.explanation import Explanation, explain
    from .apps.gallery import embed_gallery, embed_images
    from .apps.map_store import load_maps
    from .apps.models import load_model
    from .apps.report import retrieval_report
    from .apps.retrieval import RetrievalExplanation, explain_matches, rank_gallery
    from .apps.segmentation import segment
    from .apps.stream import explain_stream, explain_to_disk
    from .attribution import (
        EmbeddingAttribution,
        TupleScore,
        maps_to_input_shape,
        to_image_attr,
        visualize_map,
    )
    from .data.image_files import list_labelled_images
    from .engine import (
        FeatureLayer,
        Scores,
        SimilarityEngine,
        SimilarityScore,
        TupleResult,
        find_feature_layer,
        image_maps,
        scale_maps,
        upsample_maps,
    )
    from .engine.tuples import check_labels
    from .errors import (
        InputError,
        LayerError,
        ModelForwardError,
        ModelLoadError,
        ModelOutputError,
        SimExplainError,
    )
    from .methods import METHODS, CosineScore, SAMScore, get_method, register_method
    from .methods.criteria import (
        different_class_pair_weights,
        pair_weights,
        quadruplet_weights,
        same_class_pair_weights,
        similarity_scores,
        triplet_weights,
    )
    from .training import SAMLoss, SAMLossParts, SimilarityMiningLoss, soft_mask
    from .viz.figures import plot_retrieval
