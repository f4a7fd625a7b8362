"""Reading a model's output as embeddings, and the errors of models that do not embed.

The model must return one finite embedding vector per image; these checks say what is
wrong otherwise. Every part of simexplain that runs a model reads its output here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import LayerError, ModelForwardError, ModelOutputError, SimExplainError

__all__ = ["run_model", "embedding_matrix", "finite_embeddings", "layer_not_on_path"]

_NOT_FINITE = (
    "the model produced NaN or Inf embeddings for finite inputs; check the model's weights "
    "and numerics (e.g. run it in float32)"
)


def run_model(model: Any, images: Tensor, forward_args: tuple = ()) -> Any:
    """``model(images, *forward_args)``; an exception the model raises comes back as a
    :class:`~simexplain.errors.ModelForwardError` that says what was passed to it, with
    the model's exception as its cause (simexplain's own errors pass as they are)."""
    try:
        return model(images, *forward_args)
    except SimExplainError:
        raise
    except Exception as error:
        passed = f"a {str(images.dtype).removeprefix('torch.')} tensor of shape " \
                 f"{tuple(images.shape)} on {images.device}"
        if forward_args:
            extra = ", ".join(
                f"{tuple(a.shape)} tensor" if isinstance(a, Tensor) else type(a).__name__
                for a in forward_args
            )
            passed += f", then {extra}"
        raise ModelForwardError(
            f"the model raised {type(error).__name__} on what simexplain passed it ({passed}): "
            f"{error}. Check that the images match what the model expects (channels, size, "
            "dtype, device and normalisation) and that extra forward arguments are right"
        ) from error


def embedding_matrix(output: Any, num_images: int) -> Tensor:
    """Check that a model output is one embedding vector per image and return it as (N, d)."""
    if not isinstance(output, Tensor):
        raise ModelOutputError(
            f"the model returned {type(output).__name__}, not a tensor of embeddings. "
            "Wrap it so that forward returns a (N, d) tensor, e.g. "
            "`lambda x: model(x)[0]`, or build timm models with num_classes=0"
        )
    if output.dim() > 2 and all(s == 1 for s in output.shape[2:]):
        output = output.flatten(1)
    if output.dim() != 2 or output.shape[0] != num_images:
        raise ModelOutputError(
            f"the model returned shape {tuple(output.shape)} for {num_images} images; "
            "it must return one embedding vector per image, shape (N, d). Pool and "
            "flatten spatial outputs, e.g. with timm.create_model(..., num_classes=0) or "
            "by ending the model in nn.AdaptiveAvgPool2d(1) + nn.Flatten()"
        )
    if not output.is_floating_point():
        raise ModelOutputError(f"the model returned {output.dtype} embeddings; expected floats")
    return output



def finite_embeddings(output: Any, num_images: int, problem: str = _NOT_FINITE) -> Tensor:
    """:func:`embedding_matrix`, also checking that every value is finite.

    ``problem`` is the message of the :class:`~simexplain.errors.ModelOutputError` raised
    otherwise (by default: the model is at fault for finite inputs).
    """
    embeddings = embedding_matrix(output, num_images)
    if not torch.isfinite(embeddings).all():
        raise ModelOutputError(problem)
    return embeddings


def layer_not_on_path() -> LayerError:
    """The error for a score whose gradient does not reach the explained layer."""
    return LayerError(
        "the embedding does not depend on the chosen layer's output; choose a layer on the "
        "path to the embedding"
    )
