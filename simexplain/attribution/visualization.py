"""Drawing one map with captum's ``visualize_image_attr``, all-zero maps included.

``visualize_image_attr`` wants a numpy ``(H, W, 1)`` array and fails on a map that is zero
everywhere: :func:`to_image_attr` and :func:`visualize_map` bridge both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
from torch import Tensor

from ..engine.maps import upsample_maps
from ..errors import InputError

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["to_image_attr", "visualize_map"]

# The colormap captum's visualize_image_attr uses for each ``sign`` when none is given, and
# where a zero value sits on it (``sign="all"`` spans [-1, 1], the others [0, 1]).
_DEFAULT_CMAPS = {"positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}
_METHODS = ("heat_map", "blended_heat_map", "original_image", "masked_image", "alpha_scaling")


def to_image_attr(map_: Tensor, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """One map as the ``(H, W, 1)`` float numpy array ``visualize_image_attr`` takes.

    Args:
        map_: one map, ``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)``, on any device.
        size: ``(H, W)`` to upsample to (bilinear), e.g. the image's size; ``None``
            keeps the map's size.

    Example:
        >>> import torch
        >>> to_image_attr(torch.rand(1, 1, 4, 4), size=(32, 32)).shape
        (32, 32, 1)
    """
    if not isinstance(map_, Tensor) or map_.dim() < 2 or any(s != 1 for s in map_.shape[:-2]):
        shape = tuple(map_.shape) if isinstance(map_, Tensor) else type(map_).__name__
        raise InputError(
            f"expected one map (h, w), (1, h, w) or (1, 1, h, w), got {shape}; "
            "select one tuple and slot first, e.g. maps[k][b]"
        )
    grid = map_.detach().reshape(1, 1, *map_.shape[-2:]).float()
    if size is not None:
        grid = upsample_maps(grid, tuple(size))
    return grid[0].permute(1, 2, 0).cpu().numpy()


def visualize_map(
    map_: Tensor,
    original_image: Union[None, Tensor, np.ndarray] = None,
    method: Optional[str] = None,
    sign: str = "positive",
    **kwargs: Any,
) -> tuple["Figure", "Axes"]:
    """Draw one map with captum's ``visualize_image_attr``, all-zero maps included.

    The map is upsampled to the image's size. captum cannot normalise a map that is
    zero everywhere (it divides by its largest value); such a map is drawn as what it
    means, nothing highlighted: the heat map in the colour of zero everywhere, nothing
    of the image kept by ``masked_image`` (black) or ``alpha_scaling`` (blank).

    Args:
        map_: one map, ``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)``.
        original_image: the image, ``(C, H, W)`` tensor (as fed to the model, values in
            [0, 1]) or ``(H, W, C)`` numpy array; required by every ``method`` except
            ``"heat_map"``.
        method: captum's method; default ``"blended_heat_map"`` with an image, else
            ``"heat_map"``.
        sign: captum's ``sign``; ``"positive"`` suits ReLU-ed maps.
        **kwargs: passed to ``visualize_image_attr`` (``plt_fig_axis``, ``cmap``,
            ``alpha_overlay``, ``title``, ``use_pyplot``, ...).

    Returns:
        ``(figure, axis)`` as ``visualize_image_attr`` returns them.
    """
    from captum.attr import visualization

    image = _image_array(original_image)
    method = method or ("heat_map" if image is None else "blended_heat_map")
    if method not in _METHODS:
        raise InputError(f"unknown method {method!r}; expected one of {_METHODS}")
    size = None if image is None else image.shape[:2]
    attr = to_image_attr(map_, size)
    if _shown_values(attr, sign).any():
        return visualization.visualize_image_attr(attr, image, method, sign, **kwargs)
    # Nothing to show: draw a constant map that captum can normalise, made to look like zero.
    ones = np.ones_like(attr)
    if method in ("heat_map", "blended_heat_map"):
        kwargs["cmap"] = _zero_colormap(sign, kwargs.get("cmap"))
    elif method == "masked_image" and image is not None:
        image = np.zeros_like(image)
    elif method == "alpha_scaling" and image is not None:
        image = np.full_like(image, 255, dtype=np.uint8)  # fully transparent over white
    return visualization.visualize_image_attr(ones, image, method, sign, **kwargs)


def _image_array(image: Union[None, Tensor, np.ndarray]) -> Optional[np.ndarray]:
    if image is None or isinstance(image, np.ndarray):
        return image
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise InputError(
            "original_image must be a (C, H, W) tensor or an (H, W, C) numpy array, "
            f"got {tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}"
        )
    return image.detach().permute(1, 2, 0).float().cpu().numpy()


def _shown_values(attr: np.ndarray, sign: str) -> np.ndarray:
    """The values captum keeps for ``sign`` (it raises on an unknown sign itself)."""
    if sign == "positive":
        return np.maximum(attr, 0)
    if sign == "negative":
        return np.minimum(attr, 0)
    return attr


def _zero_colormap(sign: str, cmap: Any) -> Any:
    """A one-colour colormap in the colour a zero value gets for ``sign`` and ``cmap``."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if cmap is None:
        if sign == "all":
            return ListedColormap(["white"])  # the middle of captum's red-white-green
        cmap = _DEFAULT_CMAPS.get(sign, "Blues")
    colormap = colormaps[cmap] if isinstance(cmap, str) else cmap
    position = 0.5 if sign == "all" else 0.0
    return ListedColormap([colormap(position)])
