"""Indexing a gallery with a model that is not a PyTorch module: an ONNX model (a ``.onnx``
file, an ONNX Runtime session) or any function ``images -> embeddings``.

Such a model has no layer to store activations at, so its index keeps the embeddings
alone, and its matches are explained by a black-box method
(:mod:`~simexplain.apps.index.blackbox_explain`). Its fingerprint is a SHA-256 of the
ONNX model's bytes; a function has none, so its index lives in memory only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from torch import Tensor, nn

from ...engine.embeddings import embedding_matrix, run_model
from ...engine.engine import SimilarityEngine
from ...engine.outputs import OutputSpec, check_output
from ...errors import InputError
from ...methods.blackbox.runner import check_embedder, model_session
from ..gallery import model_fingerprint
from ..onnx_model import as_model, is_onnx_model

if TYPE_CHECKING:
    from ...engine.layouts import FeatureLayer

__all__ = ["BlackBoxEmbedder", "index_engine", "index_fingerprint", "layer_key",
           "BLACK_BOX_REASON"]

#: Why the index of a black-box model keeps no activations.
BLACK_BOX_REASON = ("the model is not a PyTorch module, so it has no layer: the index keeps "
                    "embeddings only and explains matches with a black-box method")


class BlackBoxEmbedder:
    """What an index uses a model that is not a PyTorch module for: its embeddings.

    >>> embedder = BlackBoxEmbedder(lambda x: x.flatten(1))
    >>> import torch
    >>> tuple(embedder.embed(torch.zeros(2, 3, 4, 4)).shape)
    (2, 48)
    """

    def __init__(self, model: Callable[[Tensor], Any], output: OutputSpec = None) -> None:
        check_embedder(model)
        self.model, self.output = model, check_output(output)

    def embed(self, images: Tensor) -> Tensor:
        """The model's embeddings ``(N, d)`` of ``images``, without gradients."""
        with model_session(self.model):
            return embedding_matrix(run_model(self.model, images, (), self.output),
                                    images.shape[0])


Engine = Union[SimilarityEngine, BlackBoxEmbedder]


def index_engine(model: Any, layer: Any, output: OutputSpec,
                 layer_options: dict[str, Any]) -> tuple[Any, Engine]:
    """The model as the index runs it (a ``.onnx`` file or a session as an
    :class:`~simexplain.apps.onnx_model.OnnxModel`, ``output`` naming its embedding
    output) and what runs it: a :class:`SimilarityEngine` for a PyTorch module, else a
    :class:`BlackBoxEmbedder`, which takes no layer."""
    if is_onnx_model(model):
        model, output = as_model(model, output), None
    if isinstance(model, nn.Module):
        return model, SimilarityEngine(model, layer, output=output, **layer_options)
    given = sorted(name for name, value in {"layer": layer, **layer_options}.items()
                   if value is not None)
    if given:
        raise InputError(
            f"the model ({type(model).__name__}) is not a PyTorch module, so it has no "
            f"layers: drop {', '.join(f'{name}=' for name in given)}; its index keeps "
            "embeddings only, and black-box methods explain its matches"
        )
    return model, BlackBoxEmbedder(model, output)


def layer_key(found: Optional["FeatureLayer"]) -> dict[str, Any]:
    """The build key's fields for the explained layer; empty ones for a black-box model."""
    if found is None:
        return {"layer": "", "call_index": -1, "layout": None, "num_prefix_tokens": None}
    return {"layer": found.name, "call_index": found.call_index, "layout": found.layout,
            "num_prefix_tokens": found.num_prefix_tokens}


def index_fingerprint(model: Any, path: Optional[Path]) -> Optional[str]:
    """:func:`~simexplain.apps.gallery.model_fingerprint`, or ``None`` for a model that has
    none (a function, a session made from unknown bytes) when the index is kept in memory
    (``path`` ``None``)."""
    try:
        return model_fingerprint(model)
    except InputError:
        if path is None and not isinstance(model, nn.Module):
            return None
        raise
