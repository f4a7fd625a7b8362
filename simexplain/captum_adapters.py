"""Helpers for using :class:`~simexplain.EmbeddingAttribution` with captum's other tools.

``EmbeddingAttribution`` is a captum attribution, so ``NoiseTunnel``,
``captum.metrics.sensitivity_max`` and ``LayerAttribution.interpolate`` take it as it is.
Three of captum's tools need a bridge, provided here:

* ``captum.metrics.infidelity`` wants a forward function returning one number per
  example and attributions shaped like the inputs: :class:`TupleScore` and
  :func:`maps_to_input_shape`;
* ``captum.attr.visualization.visualize_image_attr`` wants a numpy ``(H, W, 1)`` array
  and fails on an all-zero map: :func:`to_image_attr` and :func:`visualize_map`.

Per-tuple tensors passed through captum (``target`` for pairs) must have shape ``(B, ...)``
with one row per tuple, so that captum can repeat them along with the noisy or perturbed
copies of the inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .attribution import (
    EmbeddingAttribution,
    TensorOrTuple,
    is_per_tuple,
    tuple_forward_args,
)
from .errors import InputError
from .layers import embedding_matrix
from .maps import upsample_maps
from .state import preserved_state
from .weights import WeightFn, l2_normalize

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["TupleScore", "maps_to_input_shape", "to_image_attr", "visualize_map"]

# The colormap captum's visualize_image_attr uses for each ``sign`` when none is given, and
# where a zero value sits on it (``sign="all"`` spans [-1, 1], the others [0, 1]).
_DEFAULT_CMAPS = {"positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}
_METHODS = ("heat_map", "blended_heat_map", "original_image", "masked_image", "alpha_scaling")


class TupleScore:
    r"""Forward function for captum's metrics: the tuple's total similarity score.

    For the tuple ``b`` of the batch it returns ``sum_i w_b . normalize(f(x_i))``, the sum
    over the slots of the scores that :class:`~simexplain.EmbeddingAttribution` explains.
    ``w`` is computed once, from the unperturbed ``inputs``, and then held fixed, so each
    slot's map explains its own term of the sum. A call may hold ``k`` copies of each tuple
    in a row (captum's ``repeat_interleave`` layout, ``k * B`` rows per slot); tuple ``b``'s
    ``w`` is used for rows ``b * k`` to ``b * k + k - 1``.

    Args:
        attribution: the attribution whose maps are evaluated; its model, mode and
            ``additional_forward_args`` convention are used.
        inputs: the unperturbed tuple, as passed to ``attribution.attribute``.
        target: pairs only: whether each pair is same-class, a bool tensor ``(B,)``.
        weight_fn: the custom criterion, if the maps were computed with one.
        additional_forward_args: extra arguments passed unchanged to every model call.

    Attributes:
        weights: ``(B, d)`` the fixed weight vectors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from simexplain import EmbeddingAttribution
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(1))
        >>> attr = EmbeddingAttribution(model, layer="0")
        >>> anchor, positive, negative = torch.randn(3, 2, 3, 8, 8)
        >>> score = TupleScore(attr, (anchor, positive, negative))
        >>> score(anchor, positive, negative).shape
        torch.Size([2])
    """

    def __init__(
        self,
        attribution: EmbeddingAttribution,
        inputs: TensorOrTuple,
        target: Any = None,
        *,
        weight_fn: Optional[WeightFn] = None,
        additional_forward_args: Any = None,
    ) -> None:
        result = attribution.attribute_tuples(
            inputs, target, additional_forward_args, weight_fn=weight_fn
        )
        self.attribution = attribution
        self.weights: Tensor = result.weights
        self.num_slots: int = result.maps.shape[1]
        if additional_forward_args is None:
            additional_forward_args = ()
        elif not isinstance(additional_forward_args, (tuple, list)):
            additional_forward_args = (additional_forward_args,)
        self.model_args = tuple(additional_forward_args)

    def __call__(self, *slots: Tensor) -> Tensor:
        """Score ``(N,)`` of each tuple in ``slots`` (one ``(N, C, H, W)`` batch per slot)."""
        if len(slots) != self.num_slots or not all(isinstance(s, Tensor) for s in slots):
            raise InputError(
                f"TupleScore got {len(slots)} arguments but was built for "
                f"{self.num_slots}-image tuples; pass one image batch per slot, in order"
            )
        rows, tuples = slots[0].shape[0], self.weights.shape[0]
        if any(s.shape[0] != rows for s in slots) or rows % tuples != 0:
            raise InputError(
                f"TupleScore got slots with {[s.shape[0] for s in slots]} rows for {tuples} "
                "tuples; each slot must hold k copies of every tuple in a row (k * B rows)"
            )
        copies = rows // tuples
        weights = self.weights.repeat_interleave(copies, dim=0)
        # per-tuple tensor arguments (B, ...) follow the copies, then every slot
        args = tuple(
            a.repeat_interleave(copies, dim=0) if is_per_tuple(a, tuples) else a
            for a in self.model_args
        )
        args = tuple_forward_args(args, rows, 0, rows, len(slots))
        model = self.attribution.model
        with preserved_state(model, eval_mode=self.attribution.eval_mode):
            images = torch.cat(slots)
            embeddings = embedding_matrix(model(images, *args), images.shape[0])
        normalized = l2_normalize(embeddings).reshape(len(slots), rows, -1)
        return (weights * normalized).sum(dim=(0, 2))


def maps_to_input_shape(
    maps: Union[Tensor, Sequence[Tensor]],
    inputs: Union[Tensor, Sequence[Tensor]],
    mode: str = "bilinear",
) -> Union[Tensor, tuple[Tensor, ...]]:
    """Resize layer maps ``(B, 1, h, w)`` to their inputs' shape ``(B, C, H, W)``.

    Each map is upsampled to ``(H, W)`` and repeated over the ``C`` channels, which is the
    layout ``captum.metrics.infidelity`` expects for ``attributions``.

    Args:
        maps: one map batch, or a tuple with one per slot (as ``attribute`` returns).
        inputs: the matching image batch, or a tuple of them.
        mode: ``"bilinear"`` (as :func:`simexplain.maps.upsample_maps`) or any mode of
            ``torch.nn.functional.interpolate`` for 4-D tensors, e.g. ``"nearest"``.

    Returns:
        A tensor, or a tuple of tensors when ``maps`` is a tuple.

    Example:
        >>> import torch
        >>> maps_to_input_shape(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """
    single = isinstance(maps, Tensor)
    map_list = [maps] if single else list(maps)
    input_list = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if len(map_list) != len(input_list):
        raise InputError(
            f"got {len(map_list)} map batches for {len(input_list)} input batches; "
            "pass one map batch per slot"
        )
    out = []
    for k, (m, x) in enumerate(zip(map_list, input_list)):
        if m.dim() != 4 or m.shape[1] != 1 or x.dim() != 4 or m.shape[0] != x.shape[0]:
            raise InputError(
                f"slot {k}: maps {tuple(m.shape)} and inputs {tuple(x.shape)} do not match; "
                "expected maps (B, 1, h, w) for inputs (B, C, H, W)"
            )
        if mode == "bilinear":
            resized = upsample_maps(m, x.shape[-2:])
        else:
            resized = torch.nn.functional.interpolate(m, size=tuple(x.shape[-2:]), mode=mode)
        out.append(resized.repeat(1, x.shape[1], 1, 1))
    return out[0] if single else tuple(out)


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
