"""Reading a layer's output as an ``(N, C, h, w)`` feature map.

A layer's output can be laid out three ways:

* ``"NCHW"``: convolutional feature maps, used as they are;
* ``"NHWC"``: channels-last stage outputs (timm Swin and others), permuted;
* ``"tokens"``: a sequence ``(N, L, C)`` of transformer tokens; the first
  ``num_prefix_tokens`` (class, distillation, register tokens) are dropped and the rest
  are put back on the patch grid.

Model metadata is used where it exists: timm's ``output_fmt`` and ``num_prefix_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from ..errors import LayerError

__all__ = ["LAYOUTS", "FeatureLayer", "infer_layout", "to_spatial", "token_grid"]

LAYOUTS = ("NCHW", "NHWC", "tokens")

# Largest number of prefix (class / distillation / register) tokens tried when a model
# does not declare it; the largest seen in timm is 5 (class + 4 registers).
_MAX_PREFIX_TOKENS = 8
# A map's stride along height and width may differ by rounding (299 px -> 8x8).
_MAX_STRIDE_RATIO = 1.5

@dataclass(frozen=True)
class FeatureLayer:
    """The layer to explain and how to read its output.

    Attributes:
        name: dotted name of the module in the model (``""`` for the model itself).
        module: the module whose forward output is hooked.
        layout: one of ``"NCHW"``, ``"NHWC"``, ``"tokens"``.
        num_prefix_tokens: tokens before the patch grid (``"tokens"`` layout only).
        call_index: which call of the module to hook when it runs more than once per
            forward pass (``-1``: the last).
    """

    name: str
    module: nn.Module
    layout: str = "NCHW"
    num_prefix_tokens: int = 0
    call_index: int = -1


def _strides_agree(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> bool:
    (height, width), (gh, gw) = image_hw, grid_hw
    if not (1 <= gh <= height and 1 <= gw <= width):
        return False
    sh, sw = height / gh, width / gw
    return max(sh, sw) / min(sh, sw) <= _MAX_STRIDE_RATIO


def token_grid(num_tokens: int, image_hw: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The (h, w) patch grid holding ``num_tokens`` tokens for an image of ``image_hw``.

    Among the factorisations ``h * w == num_tokens``, the one whose aspect ratio is
    closest to the image's; ``None`` when no factorisation fits the image.
    """
    if num_tokens < 1:
        return None
    best, best_err = None, math.inf
    for gh in range(1, math.isqrt(num_tokens) + 1):
        if num_tokens % gh:
            continue
        for h, w in ((gh, num_tokens // gh), (num_tokens // gh, gh)):
            err = _aspect_error((h, w), image_hw)
            if err < best_err:
                best, best_err = (h, w), err
    if best is None or not _strides_agree(image_hw, best):
        return None
    return best


def _declared_prefix_tokens(model: nn.Module) -> Optional[int]:
    value = getattr(model, "num_prefix_tokens", None)
    return value if isinstance(value, int) else None


def _declares_nhwc(model: nn.Module, module: nn.Module, channels: int) -> bool:
    if str(getattr(model, "output_fmt", "")).upper() == "NHWC":
        return True
    shape = getattr(module, "normalized_shape", None)
    return isinstance(module, nn.LayerNorm) and tuple(shape or ()) == (channels,)


def infer_layout(
    output: Any,
    image_hw: tuple[int, int],
    model: nn.Module,
    module: Optional[nn.Module] = None,
) -> Optional[tuple[str, int]]:
    """How to read ``output`` as a spatial map: ``(layout, num_prefix_tokens)`` or ``None``."""
    if not isinstance(output, Tensor) or not output.is_floating_point():
        return None
    if output.dim() == 4:
        _, a, b, c = output.shape
        nchw = _strides_agree(image_hw, (b, c))
        nhwc = _strides_agree(image_hw, (a, b))
        if nchw and nhwc:
            return ("NHWC", 0) if _declares_nhwc(model, module, c) else ("NCHW", 0)
        if nchw:
            return "NCHW", 0
        if nhwc:
            return "NHWC", 0
        return None
    if output.dim() == 3:
        length = output.shape[1]
        declared = _declared_prefix_tokens(model)
        candidates = range(min(_MAX_PREFIX_TOKENS, length - 1) + 1)
        if (
            declared is not None
            and 0 <= declared < length
            and token_grid(length - declared, image_hw)
        ):
            return "tokens", declared
        # Otherwise the prefix whose patch grid has the image's aspect most exactly
        # (26 tokens on a 32x48 image: 2 + 4x6, not 1 + 5x5); ties go to fewer tokens.
        fits = [
            (_aspect_error(grid, image_hw), prefix)
            for prefix in candidates
            if 0 <= prefix < length and (grid := token_grid(length - prefix, image_hw))
        ]
        if fits:
            return "tokens", min(fits)[1]
    return None


def _aspect_error(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> float:
    return abs(math.log((image_hw[0] / grid_hw[0]) / (image_hw[1] / grid_hw[1])))


def to_spatial(
    output: Tensor,
    layer: FeatureLayer,
    image_hw: tuple[int, int],
) -> Tensor:
    """Read a layer output as ``(N, C, h, w)`` according to ``layer``'s layout."""
    if layer.layout == "NCHW":
        if output.dim() != 4:
            raise _layout_error(layer, output, "a 4-D (N, C, h, w) tensor")
        return output
    if layer.layout == "NHWC":
        if output.dim() != 4:
            raise _layout_error(layer, output, "a 4-D (N, h, w, C) tensor")
        return output.permute(0, 3, 1, 2)
    if output.dim() != 3:
        raise _layout_error(layer, output, "a 3-D (N, L, C) token tensor")
    patches = output[:, layer.num_prefix_tokens :]
    grid = token_grid(patches.shape[1], image_hw)
    if grid is None:
        raise _layout_error(
            layer,
            output,
            f"{output.shape[1]} tokens = {layer.num_prefix_tokens} prefix tokens + a patch "
            f"grid matching the {image_hw[0]}x{image_hw[1]} input",
        )
    return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], *grid)


def _layout_error(layer: FeatureLayer, output: Any, expected: str) -> LayerError:
    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    return LayerError(
        f"layer {layer.name!r} returned {shape}, but layout={layer.layout!r} expects "
        f"{expected}. Pass layout= ('NCHW', 'NHWC' or 'tokens'), num_prefix_tokens=, "
        "or reshape_transform= to EmbeddingAttribution, or choose another layer="
    )
