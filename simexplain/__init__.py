"""simexplain: visual explanations for similarity (embedding) models.

GradCAM-style maps for pairs, triplets and quadruplets of images under any model that
maps an image to a vector, after Zheng et al., "Visual Similarity Attention".

>>> from simexplain import explain          # the one call most users make
>>> from simexplain import EmbeddingAttribution   # the captum attribution underneath
"""

from .api import check_labels, explain
from .attribution import EmbeddingAttribution, TupleResult
from .captum_adapters import TupleScore, maps_to_input_shape, to_image_attr, visualize_map
from .errors import InputError, LayerError, ModelLoadError, ModelOutputError, SimExplainError
from .explanation import Explanation
from .layers import FeatureLayer, find_feature_layer
from .maps import scale_maps, upsample_maps
from .methods import METHODS, get_method
from .models import load_model
from .report import retrieval_report
from .retrieval import (
    RetrievalExplanation,
    embed_gallery,
    embed_images,
    explain_matches,
    list_labelled_images,
    rank_gallery,
)
from .viz import plot_retrieval
from .mining import SAMLoss, SAMLossParts, SimilarityMiningLoss, soft_mask
from .weights import (
    different_class_pair_weights,
    l2_normalize,
    pair_weights,
    quadruplet_weights,
    same_class_pair_weights,
    similarity_scores,
    triplet_weights,
)

from . import metrics  # noqa: E402, F401  (simexplain.metrics after a plain import)

__version__ = "0.1.0"

__all__ = [
    "explain",
    "check_labels",
    "Explanation",
    "EmbeddingAttribution",
    "TupleResult",
    "TupleScore",
    "maps_to_input_shape",
    "to_image_attr",
    "visualize_map",
    "FeatureLayer",
    "find_feature_layer",
    "METHODS",
    "get_method",
    "SAMLoss",
    "SAMLossParts",
    "SimilarityMiningLoss",
    "soft_mask",
    "upsample_maps",
    "scale_maps",
    "l2_normalize",
    "same_class_pair_weights",
    "different_class_pair_weights",
    "pair_weights",
    "triplet_weights",
    "quadruplet_weights",
    "similarity_scores",
    "SimExplainError",
    "InputError",
    "LayerError",
    "ModelOutputError",
    "ModelLoadError",
    "load_model",
    "embed_images",
    "embed_gallery",
    "list_labelled_images",
    "retrieval_report",
    "rank_gallery",
    "explain_matches",
    "RetrievalExplanation",
    "plot_retrieval",
    "__version__",
]
