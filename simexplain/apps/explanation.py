"""``explain``, the one call most users make, and the :class:`Explanation` it returns.

Images go in as files, PIL images or tensors; the maps of the tuple under any registered
method come out, upsampled to the images and scaled to [0, 1], with each image's score,
paper SAM's weight vector and the embeddings. ``Explanation.plot()`` draws them
(matplotlib is imported only then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..data.preprocessing import ImageLike, preprocess_images, resolve_preprocessing
from ..engine.embeddings import check_model
from ..engine.inputs import integer_images_error
from ..engine.maps import image_maps
from ..engine.outputs import OutputSpec
from ..engine.state import model_device, model_dtype
from ..engine.target_layer import LayerSpec
from ..engine.tuples import ROLES, check_labels
from ..errors import InputError
from ..methods.base import get_method
from ..methods.criteria import WeightFn
from ..methods.defaults import DEFAULT_METHOD
from .method_runner import build_method, run_method
from .onnx_model import as_model, is_onnx_model, no_gradients_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    """Maps, scores and weights for ``B`` tuples of ``T`` images.

    Attributes:
        images: ``(B, T, C, H, W)`` the model inputs.
        kind: ``"same_pair"``, ``"different_pair"``, ``"pair"`` (a mix of both),
            ``"triplet"``, ``"quadruplet"`` or ``"custom"``.
        raw_maps: ``(B, T, h, w)`` maps at the layer's resolution: non-negative for
            GradCAM-style methods (ReLU), signed for decompositions (``"stylianou"``,
            ``"point_specific"``), whose maps sum to the scores.
        maps: ``(B, T, H, W)`` maps upsampled to the images and scaled to [0, 1]: a
            non-negative map is divided by its maximum (0 stays "no evidence"); a signed
            map is min-max scaled, so 0 is its most negative location, 1 its most
            positive, and a location that adds nothing lies in between (read
            ``raw_maps`` for the signs).
        scores: ``(B, T)`` each image's score, what its map explains: for a GradCAM-style
            method the score ``s_i`` as the method defines it (paper SAM and its
            variants: ``w . f_i``; the cosine family, ``"contribution"``, ``"psam"`` and
            ``"gradcam_cosine"``: image ``i``'s part of the tuple's cosine criterion,
            ``sum_j c_ij cos(z_i, z_j)``, its partners fixed; ``"bce_gradcam"``: the
            pair classifier's logit); for a
            decomposition, image ``i``'s share of that cosine criterion, equal to the
            sum of its raw map (for ``"stylianou"`` exactly its cosine target). Pairs of
            different classes explain their dissimilarity: paper SAM with its
            different-pair ``w``, every other method with its criterion's sign changed.
        weights: ``(B, d)`` the weight vector ``w`` of each tuple (paper SAM and its
            variants), else ``None``.
        embeddings: ``(B, T, d)`` L2-normalised embeddings.
        labels: ``(B, T)`` the labels given, if any.
        layer: the name of the layer explained; ``""`` for a black-box method
            (``"sbsm"``, ``"rise"``), whose ``raw_maps`` are at its masks' resolution: the
            grid of window positions (``"sbsm"``) or the input's pixels (``"rise"``).
        mean, std: the normalisation of ``images``, used to display them.
        method: the explanation method that made the maps (a name of
            :data:`~simexplain.methods.METHODS`).
    """

    images: Tensor
    kind: str
    raw_maps: Tensor
    maps: Tensor
    scores: Tensor
    weights: Optional[Tensor]
    embeddings: Tensor
    labels: Optional[Tensor] = None
    layer: str = ""
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    method: str = DEFAULT_METHOD

    @property
    def roles(self) -> tuple[str, ...]:
        """The role of each slot: ``("anchor", "positive", "negative")`` for triplets."""
        count = self.images.shape[1]
        return ROLES.get(self.kind, tuple(f"image {i + 1}" for i in range(count)))[:count]

    def plot(
        self, indices: Optional[Sequence[int]] = None, cmap: str = "jet", alpha: float = 0.5
    ) -> "Figure":
        """A figure with one row per tuple: each image, its map overlaid, role and score."""
        from ..viz.figures import plot_explanation

        return plot_explanation(self, indices=indices, cmap=cmap, alpha=alpha)

    def save(self, path: "str | os.PathLike[str]", dpi: int = 150) -> str:
        """Write :meth:`plot` to ``path`` atomically (format from the extension),
        creating its folder if it is missing."""
        from ..viz.figures import save_figure

        return save_figure(self.plot(), path, dpi=dpi)

    def __repr__(self) -> str:
        batch, count = self.images.shape[:2]
        return (
            f"Explanation(kind={self.kind!r}, method={self.method!r}, tuples={batch}, "
            f"images_per_tuple={count}, layer={self.layer!r}, scores={self.scores.tolist()})"
        )


Images = Union[Tensor, Sequence[Union[Tensor, ImageLike]]]
#: A model: a PyTorch module, or for the black-box methods any callable images -> embeddings,
#: a ``.onnx`` file or an ONNX Runtime session.
Model = Union[nn.Module, Callable[[Tensor], Any], str, "os.PathLike[str]"]


def _as_batch(model: Model, imgs: Images, transform: Any) -> tuple[Tensor, Any]:
    """``(B, T, C, H, W)`` inputs and the preprocessing used (``None`` for tensors)."""
    if isinstance(imgs, Tensor):
        if not imgs.is_floating_point():
            raise integer_images_error("imgs", imgs.dtype)
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
        for i, x in enumerate(imgs):
            if not x.is_floating_point():
                raise integer_images_error(f"imgs[{i}]", x.dtype)
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


def explain(
    model: Model,
    imgs: Images,
    labels: Any = None,
    layer: LayerSpec = None,
    *,
    method: str = DEFAULT_METHOD,
    reference: Optional[Tensor] = None,
    transform: Any = None,
    weight_fn: Optional[WeightFn] = None,
    relu: Optional[bool] = None,
    chunk_size: Optional[int] = None,
    output: OutputSpec = None,
    **method_options: Any,
) -> Explanation:
    """Explain why ``model`` embeds the images of a tuple close together or far apart.

    Args:
        model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``: a PyTorch module
            (``nn.Module``, what the gradient methods hook), or for the black-box methods
            (``"sbsm"``, ``"rise"``) any callable, e.g. a function calling a service, a
            ``.onnx`` file or an ``onnxruntime.InferenceSession`` (the ``onnx`` extra).
        imgs: one tuple as a tensor ``(T, C, H, W)``, a batch of tuples
            ``(B, T, C, H, W)``, or a list of ``T`` image paths / PIL images (then
            preprocessed like the model expects: ``transform``, timm's data config, or
            ImageNet defaults).
        labels: class labels ``(T,)`` or ``(B, T)``. Two equal labels make a
            same-class pair, two different ones a different-class pair (explained as
            dissimilar); three make a triplet (anchor, positive, negative), four a
            quadruplet. Optional for triplets and quadruplets, whose roles follow from
            their positions.
        layer: the layer to explain; ``None`` finds the last spatial layer.
        method: the explanation method, any name of :data:`~simexplain.methods.METHODS`
            (docs/methods.rst): by default ``"contribution"``, whose maps show what
            each image puts into its similarity to its partners (non-zero for an
            identical pair, mirrored for mirror images); ``"psam"`` shows what would
            make them more similar; ``"sam"`` is the paper's formula, whose
            maps barely depend on the partner for L2-normalised high-dimensional
            embeddings (docs/method.rst); ``"stylianou"`` and ``"point_specific"`` are
            exact decompositions of the cosine for globally average pooled models;
            ``"sbsm"`` and ``"rise"`` are black-box methods for models without gradients
            (docs/blackbox.rst): they hide parts of each image and map how the criterion
            drops, at the cost of many forward passes per image.
        reference: for the methods that take one (the default, ``"psam"``, which needs
            it, ``"sam_contrib"``, ``"stylianou"``): embeddings ``(N, d)`` or images
            ``(N, C, H, W)`` like the ones explained (a gallery, a few hundred images of
            the domain); the maps then show what the partners share beyond what such
            images share, which sharpens them for pooled features.
        transform: preprocessing for paths / PIL images: a
            :class:`~simexplain.data.Preprocessing`, a callable or torchvision weights
            (e.g. ``ResNet50_Weights.DEFAULT``).
        weight_fn: ``"sam"`` only: explain a criterion of your own (see
            :mod:`simexplain.methods.criteria`).
        relu: keep only positive evidence (GradCAM's ReLU). ``None``: the method's own
            choice, ReLU for GradCAM-style methods, signed maps for decompositions.
        chunk_size: tuples per forward pass of a GradCAM-style method (default: see
            :func:`~simexplain.engine.default_chunk_size`).
        output: for a model that returns more than the embedding (a dict, a tuple, a
            Hugging Face ``ModelOutput``), what picks the embedding from its output: a
            key (``"pooler_output"``, a dict entry or an attribute), an index (``0``) or
            a callable (``lambda out: out.image_embeds``); for an ONNX model, the name or
            index of its embedding output.
        **method_options: the method's own options, given where it takes them: when it
            is built (``head=`` for ``"bce_gradcam"``, a trained pair classifier;
            ``head=`` for ``"stylianou"``, its linear head; the engine's ``layout=``,
            ...) or when it runs (``coefficients=`` for the cosine methods and the
            decompositions, ``selection=`` for ``"sam_contrib"``, ``point=(y, x)`` for
            ``"point_specific"``, a point of the first image of a pair in input pixels).
            A missing required option, or one the method does not take, raises
            :class:`~simexplain.errors.InputError` saying what the method needs or takes.

    Returns:
        An :class:`Explanation`; ``.plot()`` draws it.

    Example:
        >>> import torch, torchvision
        >>> from simexplain import explain
        >>> from simexplain.methods import DEFAULT_METHOD
        >>> model = torchvision.models.resnet18(num_classes=32)
        >>> imgs = torch.randn(3, 3, 64, 64)          # anchor, positive, negative
        >>> exp = explain(model, imgs, labels=[0, 0, 1])
        >>> exp.kind, exp.method == DEFAULT_METHOD, tuple(exp.maps.shape)
        ('triplet', True, (1, 3, 64, 64))
        >>> exp = explain(model, imgs, labels=[0, 0, 1], method="stylianou")
        >>> torch.allclose(exp.scores, exp.raw_maps.sum(dim=(-2, -1)))  # shares of the margin
        True
    """
    if is_onnx_model(model):
        if not get_method(method).blackbox:
            raise no_gradients_error(method)
        model, output = as_model(model, output), None
    elif not get_method(method).blackbox:
        check_model(model)
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
    if reference is not None:
        method_options["reference"] = reference
    if weight_fn is not None:
        method_options["weight_fn"] = weight_fn
    if output is not None:
        method_options["output"] = output
    built, run_options = build_method(method, model, layer, **method_options)
    device, dtype = batch_images.device, batch_images.dtype
    if isinstance(model, nn.Module):  # a function is given the images as they are
        device = model_device(model) or torch.device("cpu")
        dtype = model_dtype(model) or dtype
    slots = batch_images.to(device=device, dtype=dtype).unbind(1)
    result = run_method(built, slots, target, relu=relu, chunk_size=chunk_size, **run_options)
    maps = image_maps(result.maps, batch_images.shape[-2:])
    return Explanation(
        images=batch_images.detach().cpu(),
        kind=result.kind,
        raw_maps=result.maps.cpu(),
        maps=maps.cpu(),
        scores=result.scores.cpu(),
        weights=None if result.weights is None else result.weights.cpu(),
        embeddings=result.embeddings.cpu(),
        labels=None if checked is None else checked.cpu(),
        layer=result.layer,
        mean=None if preprocessing is None else preprocessing.mean,
        std=None if preprocessing is None else preprocessing.std,
        method=built.name,
    )
