"""Reading a model's output as embeddings, and the errors of models that do not embed.

The model must return one finite embedding vector per image; these checks say what is
wrong otherwise. A model that returns more than that is read through ``output=``
(:mod:`simexplain.engine.outputs`). Every part of simexplain that runs a model runs it with
:func:`run_model` and reads its output here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import LayerError, ModelForwardError, ModelOutputError, SimExplainError
from .outputs import OUTPUT_KINDS, OutputSpec, describe_output, select_output, suggest_output

__all__ = [
    "check_model",
    "channel_hint",
    "run_model",
    "embedding_matrix",
    "finite_embeddings",
    "layer_not_on_path",
]

_NOT_FINITE = (
    "the model produced NaN or Inf embeddings for finite inputs; check the model's weights "
    "and numerics (e.g. run it in float32)"
)


def check_model(model: Any) -> None:
    """Raise :class:`TypeError` unless ``model`` is an ``nn.Module`` (what gradient methods
    hook), saying what to do with a function that wraps one."""
    if isinstance(model, nn.Module):
        return
    hint = ""
    if callable(model):
        hint = (
            "; gradient methods need a PyTorch module: they hook the network's layers, so "
            "pass the network itself, and if it returns more than the embedding (a dict, a "
            "tuple, a Hugging Face output), pick the embedding with output= "
            f"({OUTPUT_KINDS}) instead of wrapping the model in a function. The black-box "
            "methods, method='rise' or method='sbsm', take any callable images -> embeddings"
        )
    raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def _first_convolution(model: Any) -> Optional[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        return None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Conv1d)):
            return name, module
    return None


def channel_hint(model: Any, images: Tensor) -> str:
    """Advice when ``images`` have another number of channels than the model's first
    convolution (or patch embedding) takes; ``""`` when they match or it cannot tell."""
    first = _first_convolution(model)
    if first is None or images.dim() != 4:
        return ""
    name, conv = first
    given, expected = int(images.shape[1]), int(conv.in_channels)
    if given == expected:
        return ""
    where = f"the model's first convolution ({name or 'the model'}) takes {expected}"
    if given == 1 and expected == 3:
        fix = ("repeat the grey channel: x.repeat(1, 3, 1, 1) (or x.expand(-1, 3, -1, -1), "
               "without a copy), or load the images as RGB")
    elif given == 4 and expected == 3:
        fix = "drop the alpha channel: x[:, :3], or load the images as RGB"
    else:
        fix = f"give the images {expected} channels"
    plural = "" if given == 1 else "s"
    return f"The images have {given} channel{plural} but {where}: {fix}"


def run_model(
    model: Any, images: Tensor, forward_args: tuple = (), output: OutputSpec = None
) -> Any:
    """``model(images, *forward_args)``, read through ``output=``
    (:func:`~simexplain.engine.outputs.select_output`).

    An exception the model raises comes back as a
    :class:`~simexplain.errors.ModelForwardError` that says what was passed to it (and, for
    images with the wrong number of channels, how to fix them), with the model's exception
    as its cause (simexplain's own errors pass as they are)."""
    try:
        value = model(images, *forward_args)
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
        advice = channel_hint(model, images) or (
            "Check that the images match what the model expects (channels, size, dtype, "
            "device and normalisation) and that extra forward arguments are right"
        )
        raise ModelForwardError(
            f"the model raised {type(error).__name__} on what simexplain passed it ({passed}): "
            f"{error}. {advice}"
        ) from error
    return select_output(value, output, images.shape[0])


def embedding_matrix(output: Any, num_images: int) -> Tensor:
    """Check that a model output is one embedding vector per image and return it as (N, d)."""
    if not isinstance(output, Tensor):
        suggestion = suggest_output(output, num_images)
        example = f"e.g. {suggestion}: " if suggestion else ""
        raise ModelOutputError(
            f"the model returned {describe_output(output)}, not a tensor of embeddings. "
            f"Pick the embedding with output= ({example}{OUTPUT_KINDS}), or build timm "
            "models with num_classes=0"
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


