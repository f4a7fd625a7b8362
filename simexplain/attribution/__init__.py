"""The captum face: :class:`EmbeddingAttribution` and bridges to captum's other tools."""

from . import embedding_attribution, tuple_score, visualization
from .embedding_attribution import *  # noqa: F403
from .tuple_score import *  # noqa: F403
from .visualization import *  # noqa: F403

__all__ = [*embedding_attribution.__all__, *tuple_score.__all__, *visualization.__all__]
