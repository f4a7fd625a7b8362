"""The engine: the mechanics every similarity map shares (torch only).

It resolves the target layer, runs the single batched forward in which the trunk before
the layer records no graph (convolutional networks on a CPU get channels-last images),
takes the gradient with respect to the layer output only, combines activations and
gradients as GradCAM does, reads token and channels-last layouts as ``(N, C, h, w)``,
cuts large batches into chunks, checks inputs and leaves the model as it found it.
A method supplies only a :class:`SimilarityScore`.
"""

from . import (
    chunking,
    embeddings,
    engine,
    gradients,
    inputs,
    layouts,
    maps,
    outputs,
    score,
    state,
    target_layer,
    tuples,
)
from .engine import *  # noqa: F403
from .score import *  # noqa: F403
from .target_layer import *  # noqa: F403
from .layouts import *  # noqa: F403
from .maps import *  # noqa: F403
from .chunking import *  # noqa: F403
from .inputs import *  # noqa: F403
from .embeddings import *  # noqa: F403
from .outputs import *  # noqa: F403
from .gradients import *  # noqa: F403
from .tuples import *  # noqa: F403
from .state import *  # noqa: F403
from .input_layout import nchw_only

__all__ = [
    *engine.__all__,
    *score.__all__,
    *target_layer.__all__,
    *layouts.__all__,
    *maps.__all__,
    *chunking.__all__,
    *inputs.__all__,
    *embeddings.__all__,
    *outputs.__all__,
    *gradients.__all__,
    *tuples.__all__,
    *state.__all__,
    "nchw_only",
]
