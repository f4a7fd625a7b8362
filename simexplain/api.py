"""``explain``: the one call that turns a model and a tuple of images into an explanation."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attribution import EmbeddingAttribution
from .errors import InputError
from .explanation import Explanation
from .labels import check_labels
from .layers import LayerSpec
from .maps import scale_maps, upsample_maps
from .preprocess import ImageLike, preprocess_images, resolve_preprocessing
from .weights import WeightFn

__all__ = ["explain", "check_labels"]

Images = Union[Tensor, Sequence[Union[Tensor, ImageLike]]]


def _as_batch(model: nn.Module, imgs: Images, transform: Any) -> tuple[Tensor, Any]:
    """``(B, T, C, H, W)`` inputs and the preprocessing used (``None`` for tensors)."""
    if isinstance(imgs, Tensor):
        if imgs.dim() == 4:
            return imgs.unsqueeze(0), None
        if imgs.dim() == 5:
            return imgs, None
        raise InputError(
            f"imgs has shape {tuple(imgs.shape)}; pass (T, C, H, W) for one tuple or "
            "(B, T, C, H, W) for a batch of tuples"
        )
    if not isinstance(imgs, (list, tuple)) or not imgs:
        raise InputError(
            "imgs must be a tensor (T, C, H, W) or (B, T, C, H, W), or a list of "
            f"image paths or PIL images; got {type(imgs).__name__}"
        )
    if all(isinstance(x, Tensor) for x in imgs):
        if any(x.dim() != 3 for x in imgs):
            raise InputError("a list of tensors must hold single images (C, H, W)")
        if len({tuple(x.shape) for x in imgs}) != 1:
            raise InputError(
                f"the images have different shapes {[tuple(x.shape) for x in imgs]}; "
                "resize them to one size"
            )
        return torch.stack(list(imgs)).unsqueeze(0), None
    preprocessing = resolve_preprocessing(model, transform)
    return preprocess_images(imgs, preprocessing).unsqueeze(0), preprocessing


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, Optional[torch.dtype]]:
    for tensor in model.parameters():
        return tensor.device, tensor.dtype if tensor.is_floating_point() else None
    return torch.device("cpu"), None


def explain(
    model: nn.Module,
    imgs: Images,
    labels: Any = None,
    layer: LayerSpec = None,
    *,
    transform: Any = None,
    weight_fn: Optional[WeightFn] = None,
    relu: bool = True,
    chunk_size: Optional[int] = None,
) -> Explanation:
    """Explain why ``model`` embeds the images of a tuple close together or far apart.

    Args:
        model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``.
        imgs: one tuple as a tensor ``(T, C, H, W)``, a batch of tuples
            ``(B, T, C, H, W)``, or a list of ``T`` image paths / PIL images (then
            preprocessed like the model expects: ``transform``, timm's data config, or
            ImageNet defaults).
        labels: class labels ``(T,)`` or ``(B, T)``. Two equal labels make a
            same-class pair, two different ones a different-class pair; three make a
            triplet (anchor, positive, negative), four a quadruplet. Optional for
            triplets and quadruplets, whose roles follow from their positions.
        layer: the layer to explain; ``None`` finds the last spatial layer.
        transform: preprocessing for paths / PIL images: a callable or torchvision
            weights (e.g. ``ResNet50_Weights.DEFAULT``).
        weight_fn: explain a criterion of your own (see :mod:`simexplain.weights`).
        relu: keep only positive evidence (GradCAM's ReLU).
        chunk_size: tuples per forward pass (default: see
            :func:`~simexplain.attribution.default_chunk_size`).

    Returns:
        An :class:`~simexplain.explanation.Explanation`; ``.plot()`` draws it.

    Example:
        >>> import torch, torchvision
        >>> from simexplain import explain
        >>> model = torchvision.models.resnet18(num_classes=32)
        >>> imgs = torch.randn(3, 3, 64, 64)          # anchor, positive, negative
        >>> exp = explain(model, imgs, labels=[0, 0, 1])
        >>> exp.kind, tuple(exp.maps.shape)
        ('triplet', (1, 3, 64, 64))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch_images, preprocessing = _as_batch(model, imgs, transform)
    batch, count = batch_images.shape[:2]
    if not 2 <= count <= 4:
        raise InputError(
            f"a tuple holds {count} image(s); explain takes 2 (pair), 3 (triplet) or "
            "4 (quadruplet) images per tuple"
        )
    target = None
    checked = None
    if labels is not None:
        checked = check_labels(labels, batch, count)
        if count == 2:
            target = checked[:, 0] == checked[:, 1]
    elif count == 2 and weight_fn is None:
        raise InputError(
            "a pair needs labels, e.g. labels=[3, 3] for a same-class pair or [3, 5] for a "
            "different-class pair, so that simexplain knows what to explain"
        )
    device, dtype = _model_device_dtype(model)
    slots = batch_images.to(device=device, dtype=dtype or batch_images.dtype).unbind(1)
    attribution = EmbeddingAttribution(model, layer)
    result = attribution.attribute_tuples(
        slots,
        target=target,
        weight_fn=weight_fn,
        relu_attributions=relu,
        chunk_size=chunk_size,
    )
    image_hw = tuple(batch_images.shape[-2:])
    maps = scale_maps(upsample_maps(result.maps.flatten(0, 1), image_hw)).reshape(
        batch, count, *image_hw
    )
    return Explanation(
        images=batch_images.detach().cpu(),
        kind=result.kind,
        raw_maps=result.maps.cpu(),
        maps=maps.cpu(),
        scores=result.scores.cpu(),
        weights=result.weights.cpu(),
        embeddings=result.embeddings.cpu(),
        labels=None if checked is None else checked.cpu(),
        layer=result.layer,
        mean=None if preprocessing is None else preprocessing.mean,
        std=None if preprocessing is None else preprocessing.std,
    )
