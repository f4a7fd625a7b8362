"""How good are the maps? Localisation, faithfulness and sanity metrics for similarity maps.

Every metric takes maps as tensors, so it works with any method: ``(B, T, h, w)`` (one map
per slot of each tuple), ``(B, 1, h, w)``, ``(B, h, w)``, or the tuple of ``T`` tensors
``(B, 1, h, w)`` that :meth:`simexplain.EmbeddingAttribution.attribute` returns. Maps at
layer resolution are upsampled bilinearly where pixels are needed.

* Localisation against ground truth: :func:`pointing_game`, :func:`energy_in_box`.
* Faithfulness: :func:`deletion_auc` and :func:`insertion_auc` delete (or reveal) an
  image's pixels in the order its map ranks them and track the tuple's similarity.
* Sanity: :func:`randomization_sanity` compares the maps of a model with those of a copy
  whose top layers are re-initialised (:func:`randomize_top_layers`); a method whose maps
  barely change does not explain the model.

Per-map results have shape ``(B,)`` for single-slot maps and ``(B, T)`` for ``T > 1``.

And how good is the embedding: :func:`recall_at_k`, the retrieval benchmarks' Recall@K.
"""

from . import agreement, faithfulness, localisation, retrieval, sanity
from ._maps import MapsLike
from .localisation import *  # noqa: F403
from .faithfulness import *  # noqa: F403
from .agreement import *  # noqa: F403
from .sanity import *  # noqa: F403
from .retrieval import *  # noqa: F403

__all__ = [
    "MapsLike",
    *localisation.__all__,
    *faithfulness.__all__,
    *agreement.__all__,
    *sanity.__all__,
    *retrieval.__all__,
]
