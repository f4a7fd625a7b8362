"""Weakly supervised one-shot segmentation from similarity maps (the paper's section 4.3).

The test image's map, from a pair ``(test, support)`` or a triplet
``(test, support, negative)``, is the cue; no support mask is used. With ``k`` supports
the ``k`` maps are averaged. The map becomes a mask by a threshold or by GrabCut seeded
from the map (OpenCV, the optional extra ``seg``).

Resize policy: the test image is never resized, so the mask and map align with it pixel
for pixel. Supports and negatives of another size are resized (bilinear, antialiased,
aspect ratio not kept) to the test image's size, or, with ``input_size``, every image
is resized to ``input_size`` for the model and the map is upsampled back to the test
image's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.inputs import integer_images_error
from ..engine.maps import image_maps, scale_maps
from ..engine.state import model_device
from ..engine.target_layer import LayerSpec
from ..errors import InputError, MissingExtraError
from .method_runner import build_method, run_method

#: Segmentation's maps: the sensitivity reading, what in the test image would make it more
#: like the support. The contribution reading (the library's default) also counts what
#: every image puts into a cosine of non-negative features, the background included, so
#: from the origin its map covers the whole image (docs/method.rst).
SEGMENTATION_METHOD = "gradcam_cosine"

__all__ = [
    "SEGMENTATION_METHOD",
    "SegmentationResult",
    "binary_iou",
    "grabcut_mask",
    "segment",
    "similarity_cue",
]

Images = Union[Tensor, Sequence[Tensor]]

MASKS = ("grabcut", "threshold")


@dataclass
class SegmentationResult:
    """What :func:`segment` found for one test image.

    Attributes:
        mask: ``(H, W)`` bool foreground mask at the test image's size.
        map: ``(H, W)`` the averaged similarity map, scaled to ``[0, 1]``.
        mask_method: what made the mask: ``"grabcut"``, ``"threshold"`` or ``"empty"`` (the
            map had no positive evidence, or the supports were too dissimilar).
        note: why the requested mask method was not used (empty when it was).
        similarity: ``(k,)`` cosine similarity of the test image to each support.
        layer: the layer explained.
        method: the explanation method that made the map.
    """

    mask: Tensor
    map: Tensor
    mask_method: str
    note: str
    similarity: Tensor
    layer: str
    method: str = SEGMENTATION_METHOD


def binary_iou(prediction: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of bool masks ``(..., H, W)``; 1 when both are empty.

    Example:
        >>> a = torch.tensor([[True, True], [False, False]])
        >>> b = torch.tensor([[True, False], [False, False]])
        >>> float(binary_iou(a, b))
        0.5
    """
    if prediction.shape != target.shape:
        raise InputError(
            f"masks differ in shape: {tuple(prediction.shape)} vs {tuple(target.shape)}"
        )
    p, t = prediction.bool(), target.bool()
    inter = (p & t).flatten(-2).sum(-1).float()
    union = (p | t).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _cv2():
    try:
        import cv2
    except ImportError as error:
        raise MissingExtraError(
            "mask='grabcut' needs OpenCV, which is not installed: install simexplain's "
            "seg extra (pip install -e '.[seg]' in a clone) or opencv-python-headless, "
            "or use mask='threshold'"
        ) from error
    return cv2


def _as_batch(images: Images, name: str) -> list[Tensor]:
    """A list of ``(C, H, W)`` images from one image, a batch, or a sequence of images."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images.unbind(0))
        raise InputError(
            f"{name} has shape {tuple(images.shape)}; pass one image (C, H, W), a batch "
            "(k, C, H, W) or a list of (C, H, W) images"
        )
    if not isinstance(images, (list, tuple)):
        raise InputError(f"{name} must be a tensor or a list of tensors, got {type(images)}")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise InputError(f"{name}[{i}] is {shape}; each image must be a (C, H, W) tensor")
        out.append(image)
    return out


def _resized(images: list[Tensor], size: tuple[int, int], channels: int, name: str) -> Tensor:
    """Stack images as one float batch at ``size``; bilinear, antialiased where needed."""
    if not images:
        raise InputError(f"{name} is empty; pass at least one image")
    out = []
    for i, image in enumerate(images):
        if image.shape[0] != channels:
            raise InputError(
                f"{name}[{i}] has {image.shape[0]} channels but the test image has "
                f"{channels}; convert all images to the same colour space"
            )
        if not image.is_floating_point():
            raise integer_images_error(f"{name}[{i}]", image.dtype)
        x = image.unsqueeze(0)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    return torch.cat(out)


def similarity_cue(
    model: nn.Module,
    test_image: Tensor,
    supports: Images,
    negatives: Optional[Images] = None,
    *,
    layer: LayerSpec = None,
    input_size: Optional[tuple[int, int]] = None,
    method: str = SEGMENTATION_METHOD,
    **method_options: Any,
) -> tuple[Tensor, Tensor, Tensor, str]:
    """The test image's similarity maps against each support, at the test image's size.

    Pairs ``(test, support_i)`` are explained as same-class pairs; with negatives, triplets
    ``(test, support_i, negative_i)`` (one negative is shared by all supports). ``method``
    names the explanation method, any of :data:`~simexplain.methods.METHODS` (default
    :data:`SEGMENTATION_METHOD`; the paper used ``"sam"``), with ``method_options`` as for
    :func:`~simexplain.explain`; the maps keep the positive evidence (ReLU), also a
    decomposition's.

    Returns:
        ``(maps, raw_peaks, similarity, layer)``: maps ``(k, H, W)`` each scaled to
        ``[0, 1]``, the raw maps' maxima ``(k,)`` (0 where the map has no positive
        evidence), the cosine similarity of test and support ``(k,)``, and the layer name.
    """
    if not isinstance(test_image, Tensor):
        raise InputError(f"test_image must be a tensor (C, H, W), got {type(test_image)}")
    test = test_image[0] if test_image.dim() == 4 and test_image.shape[0] == 1 else test_image
    if test.dim() != 3:
        raise InputError(
            f"test_image has shape {tuple(test_image.shape)}; pass one image (C, H, W) or "
            "(1, C, H, W); call segment once per test image"
        )
    channels, height, width = test.shape
    size = (height, width) if input_size is None else (int(input_size[0]), int(input_size[1]))
    device = model_device(model) or test.device
    support_batch = _resized(_as_batch(supports, "supports"), size, channels, "supports")
    k = support_batch.shape[0]
    slots = [_resized([test], size, channels, "test_image").expand(k, -1, -1, -1), support_batch]
    if negatives is not None:
        negative_batch = _resized(_as_batch(negatives, "negatives"), size, channels, "negatives")
        if negative_batch.shape[0] not in (1, k):
            raise InputError(
                f"got {negative_batch.shape[0]} negatives for {k} supports; pass one negative "
                "(shared by all supports) or one per support"
            )
        slots.append(negative_batch.expand(k, -1, -1, -1))
    slots = [s.to(device=device, dtype=test.dtype).contiguous() for s in slots]
    target = torch.ones(k, dtype=torch.bool) if negatives is None else None
    explainer, run_options = build_method(method, model, layer, **method_options)
    result = run_method(explainer, tuple(slots), target, relu=True, **run_options)
    raw = result.maps[:, 0]  # the test image's map in every tuple, (k, h, w), ReLU'd
    peaks = raw.flatten(1).amax(dim=1).clamp_min(0)
    maps = image_maps(raw, (height, width))
    similarity = (result.embeddings[:, 0] * result.embeddings[:, 1]).sum(dim=1)
    return maps, peaks, similarity, result.layer


def grabcut_mask(
    image: Tensor,
    cue: Tensor,
    *,
    threshold: float = 0.5,
    sure_background: float = 0.15,
    sure_foreground: float = 0.8,
    iterations: int = 5,
) -> tuple[Tensor, str]:
    """GrabCut on ``image`` ``(C, H, W)`` seeded from ``cue`` ``(H, W)`` in ``[0, 1]``.

    Seeds: ``cue >= sure_foreground`` definite foreground, ``>= threshold`` probable
    foreground, ``<= sure_background`` definite background, the rest probable
    background. The image is min-max scaled to 8-bit (grey images repeated to RGB), so
    mean/std-normalised inputs work as given.

    GrabCut needs both colour models: when the seeds hold no background or no foreground
    pixel, or OpenCV fails, the thresholded cue ``cue >= threshold`` is returned instead.

    Returns:
        ``(mask, note)``: the ``(H, W)`` bool mask and why GrabCut was not used (``""`` when
        it was).
    """
    cv2 = _cv2()
    thresholded = cue >= threshold
    cue_np = cue.detach().float().cpu().numpy()
    seeds = np.full(cue_np.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    seeds[cue_np >= threshold] = cv2.GC_PR_FGD
    seeds[cue_np >= sure_foreground] = cv2.GC_FGD
    seeds[cue_np <= sure_background] = cv2.GC_BGD
    foreground = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if foreground.all() or not foreground.any():
        side = "background" if foreground.any() else "foreground"
        return thresholded, f"no {side} seeds for GrabCut; used the thresholded map"
    pixels = image.detach().float().cpu()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    low, high = pixels.min(), pixels.max()
    pixels = ((pixels - low) / (high - low).clamp_min(1e-12) * 255).round()
    pixels = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy().astype(np.uint8))
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(
            pixels,
            seeds,
            None,
            background_model,
            foreground_model,
            int(iterations),
            cv2.GC_INIT_WITH_MASK,
        )
    except cv2.error as error:
        return thresholded, f"GrabCut failed ({str(error).strip()[:120]}); used the threshold"
    mask = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    return torch.from_numpy(mask).to(cue.device), ""


def segment(
    model: nn.Module,
    test_image: Tensor,
    supports: Images,
    negatives: Optional[Images] = None,
    *,
    mask: str = "grabcut",
    threshold: float = 0.5,
    sure_background: float = 0.15,
    sure_foreground: float = 0.8,
    grabcut_iters: int = 5,
    min_similarity: Optional[float] = None,
    **cue_options: Any,
) -> SegmentationResult:
    """Segment the object that ``test_image`` shares with ``supports``, without their masks.

    Args:
        model: an embedding model, ``(N, C, H, W) -> (N, d)``.
        test_image: ``(C, H, W)`` or ``(1, C, H, W)``, on any device (moved to the model's).
        supports: one image ``(C, H, W)``, a batch ``(k, C, H, W)`` or a list of images of
            the class to segment (k-shot averages the k maps).
        negatives: images of a class to ignore (the two-way case): triplets
            ``(test, support, negative)`` are explained instead of pairs. One negative is
            shared by all supports, or pass one per support.
        mask: how the map becomes a mask: ``"grabcut"`` (needs OpenCV) or
            ``"threshold"`` (``map >= threshold``).
        threshold: map value from which a pixel is (probable) foreground.
        sure_background: map values at or below it seed GrabCut's definite background.
        sure_foreground: map values at or above it seed GrabCut's definite foreground.
        grabcut_iters: GrabCut iterations.
        min_similarity: if given, an empty mask when the mean cosine similarity of the
            test image to the supports is below it (the support shares nothing).
        **cue_options: ``layer`` (the spatial layer to explain, found automatically when
            ``None``), ``input_size`` (``(H, W)`` to resize every image to for the
            model; by default supports and negatives are resized to the test image's
            size), ``method`` and the method's options (e.g. ``head=`` for
            ``"bce_gradcam"``), as for :func:`similarity_cue`.

    Returns:
        A :class:`SegmentationResult`. The mask is empty (``mask_method == "empty"``) when the
        averaged map has no positive value or ``min_similarity`` is not reached.

    Raises:
        InputError: malformed images or options; :class:`MissingExtraError` (an
            ``InputError`` and an ``ImportError``) when GrabCut is asked for without OpenCV.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        >>> test, support = torch.rand(2, 3, 32, 32)
        >>> result = segment(net, test, support, mask="threshold")
        >>> result.mask.shape, result.mask.dtype, float(result.map.max()) <= 1
        (torch.Size([32, 32]), torch.bool, True)
    """
    if mask not in MASKS:
        raise InputError(f"mask must be one of {MASKS}, got {mask!r}")
    if not 0 <= sure_background < threshold <= sure_foreground <= 1:
        raise InputError(
            "need 0 <= sure_background < threshold <= sure_foreground <= 1, got "
            f"{sure_background}, {threshold}, {sure_foreground}"
        )
    if grabcut_iters < 1:
        raise InputError(f"grabcut_iters must be >= 1, got {grabcut_iters}")
    if mask == "grabcut":
        _cv2()  # fail before any model work
    maps, peaks, similarity, layer_name = similarity_cue(
        model, test_image, supports, negatives, **cue_options
    )
    made = cue_options.get("method", SEGMENTATION_METHOD)
    cue = scale_maps(maps.mean(dim=0))
    empty = torch.zeros(cue.shape, dtype=torch.bool, device=cue.device)
    if not bool((peaks > 0).any()):
        note = "the test image's map is zero everywhere: no evidence shared with the supports"
        return SegmentationResult(empty, cue, "empty", note, similarity, layer_name, made)
    if min_similarity is not None and float(similarity.mean()) < min_similarity:
        note = (
            f"mean cosine similarity {float(similarity.mean()):.3f} to the supports is below "
            f"min_similarity={min_similarity}"
        )
        return SegmentationResult(empty, cue, "empty", note, similarity, layer_name, made)
    if mask == "threshold":
        return SegmentationResult(cue >= threshold, cue, "threshold", "", similarity, layer_name,
                                  made)
    test = test_image[0] if test_image.dim() == 4 else test_image
    found, note = grabcut_mask(
        test,
        cue,
        threshold=threshold,
        sure_background=sure_background,
        sure_foreground=sure_foreground,
        iterations=grabcut_iters,
    )
    used = "threshold" if note else "grabcut"
    return SegmentationResult(found, cue, used, note, similarity, layer_name, made)
