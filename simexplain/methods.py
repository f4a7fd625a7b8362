"""Explanation methods for similarity models behind one interface, and a registry of them.

Every method is a :class:`SimilarityMethod`: build it from the model (and optionally the
layer, as for :class:`~simexplain.EmbeddingAttribution`), then
``method.explain(tuples) -> (B, T, h, w)`` gives one raw map per image of each tuple at
the layer's resolution. A method is also an ``explain_fn(model, tuples)`` for
:mod:`simexplain.metrics` (it rebuilds itself for another model, e.g. a randomised copy).

==================  ==========================================================  ==========
name                what a map shows                                            tuples
==================  ==========================================================  ==========
``sam``             GradCAM of ``w . f_i`` (Zheng et al., the core method)      2, 3, 4
``gradcam_cosine``  GradCAM of the tuple's cosine criterion, others held fixed  2, 3, 4
``stylianou``       each location's share of the cosine (Stylianou et al.)      2, 3, 4
``point_specific``  point-to-point similarity (Zhu et al. 2021)                 2 (3, 4)
``bce_gradcam``     GradCAM of a trained same/different pair classifier         2
==================  ==========================================================  ==========

>>> import torch, torchvision
>>> from simexplain.methods import get_method
>>> model = torchvision.models.resnet18(num_classes=16)
>>> method = get_method("gradcam_cosine")(model, layer="layer4")
>>> x1, x2 = torch.randn(2, 1, 3, 64, 64)
>>> method.explain((x1, x2)).shape
torch.Size([1, 2, 2, 2])
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attribution import EmbeddingAttribution, check_tuple_inputs
from .errors import InputError, LayerError, ModelOutputError
from .layers import FeatureLayer, LayerSpec, get_layer
from .state import preserved_state
from .weights import l2_normalize

__all__ = [
    "METHODS",
    "SimilarityMethod",
    "register_method",
    "get_method",
    "cosine_coefficients",
    "SAMMethod",
    "GradCAMCosine",
    "Stylianou",
    "PointSpecific",
    "PairClassifierHead",
    "train_pair_head",
    "BCEGradCAM",
]

#: Registered methods, name -> class.
METHODS: dict[str, type["SimilarityMethod"]] = {}

TensorTuple = Sequence[Tensor]


def register_method(cls: type["SimilarityMethod"]) -> type["SimilarityMethod"]:
    """Class decorator adding a :class:`SimilarityMethod` subclass to :data:`METHODS`.

    The class's ``name`` attribute is its key; registering another class under a name
    already taken raises :class:`ValueError`.
    """
    if not (isinstance(cls, type) and issubclass(cls, SimilarityMethod)):
        raise TypeError(f"register_method expects a SimilarityMethod subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"a method named {name!r} is already registered: {METHODS[name]}")
    METHODS[name] = cls
    return cls


def get_method(name: str) -> type["SimilarityMethod"]:
    """The method class registered as ``name``.

    >>> get_method("sam").__name__
    'SAMMethod'
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown explanation method {name!r}; choose one of {sorted(METHODS)}"
        ) from None


def cosine_coefficients(num_slots: int) -> Tensor:
    """The symmetric matrix ``c`` of a tuple's cosine criterion ``sum_{i<j} c_ij cos(f_i, f_j)``.

    Pair: ``cos(f1, f2)``. Triplet: the margin ``cos(a, p) - cos(a, n)``. Quadruplet: the
    sum of the two triplet margins, ``2 cos(a, p) - cos(a, n1) - cos(a, n2)``. Image ``i``'s
    target is the part of the criterion that depends on it, ``sum_j c_ij cos(f_i, f_j)``
    with the other images fixed.

    >>> cosine_coefficients(3)
    tensor([[ 0.,  1., -1.],
            [ 1.,  0.,  0.],
            [-1.,  0.,  0.]])
    """
    upper = {2: [(0, 1, 1.0)], 3: [(0, 1, 1.0), (0, 2, -1.0)]}
    upper[4] = [(0, 1, 2.0), (0, 2, -1.0), (0, 3, -1.0)]
    if num_slots not in upper:
        raise InputError(f"tuples have 2, 3 or 4 images; got {num_slots}")
    coefficients = torch.zeros(num_slots, num_slots)
    for i, j, value in upper[num_slots]:
        coefficients[i, j] = coefficients[j, i] = value
    return coefficients


class SimilarityMethod:
    """Base class: one explanation method for tuples of images under an embedding model.

    Args:
        model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``.
        layer: the spatial layer explained: ``None`` (found automatically), a dotted
            module name, or the module.
        **layer_options: ``layout``, ``num_prefix_tokens`` or ``reshape_transform``, as for
            :class:`~simexplain.EmbeddingAttribution`.

    Subclasses set ``name`` and implement :meth:`explain`. Calling a method,
    ``method(model, tuples, **kw)``, explains ``tuples`` under ``model`` (the same method
    rebuilt for that model when it is another one), which makes it an ``explain_fn`` for
    :func:`simexplain.metrics.randomization_sanity`.
    """

    name: ClassVar[str] = ""
    #: The tuple sizes the method explains.
    tuple_sizes: ClassVar[tuple[int, ...]] = (2, 3, 4)

    def __init__(self, model: nn.Module, layer: LayerSpec = None, **layer_options: Any) -> None:
        self.attribution = EmbeddingAttribution(model, layer, **layer_options)
        self.model = model
        self.layer_options = layer_options

    def explain(self, tuples: TensorTuple, **kwargs: Any) -> Tensor:
        """Raw maps ``(B, T, h, w)``, one per image of each tuple, at layer resolution."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, tuples: TensorTuple, **kwargs: Any) -> Tensor:
        return self.for_model(model).explain(tuples, **kwargs)

    def explain_fn(self, **kwargs: Any) -> Callable[[nn.Module, TensorTuple], Tensor]:
        """``explain_fn(model, tuples)`` for :mod:`simexplain.metrics`, with fixed options
        (e.g. ``same_class=`` for pairs under SAM)."""
        return lambda model, tuples: self(model, tuples, **kwargs)

    def for_model(self, model: nn.Module) -> "SimilarityMethod":
        """This method with the same options for another model (itself for its own model)."""
        if model is self.model:
            return self
        return type(self)(model, **self._rebuild_options())

    def _rebuild_options(self) -> dict[str, Any]:
        return {"layer": self._by_name(self.attribution.layer_spec), **self.layer_options}

    def _by_name(self, spec: Any) -> Any:
        """A module of this method's model as its dotted name, so a copy of the model finds
        its own module; anything else unchanged."""
        if isinstance(spec, nn.Module):
            for name, module in self.model.named_modules():
                if module is spec:
                    return name
        return spec

    # ------------------------------------------------------------------ shared machinery

    def _check_tuples(self, tuples: TensorTuple) -> list[Tensor]:
        if isinstance(tuples, (tuple, list)) and len(tuples) not in self.tuple_sizes:
            raise InputError(
                f"method {self.name!r} explains tuples of {self._sizes_text()} images; "
                f"got {len(tuples)} image batches"
            )
        return check_tuple_inputs(tuples)

    def _sizes_text(self) -> str:
        sizes = [str(s) for s in self.tuple_sizes]
        return sizes[0] if len(sizes) == 1 else ", ".join(sizes[:-1]) + " or " + sizes[-1]

    @contextlib.contextmanager
    def _session(self, *extra: nn.Module) -> Iterator[None]:
        """Eval mode, grad on (also under no_grad), model state restored afterwards."""
        with contextlib.ExitStack() as stack:
            for module in (self.model, *extra):
                stack.enter_context(preserved_state(module, eval_mode=True))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            yield

    def _forward(self, slots: list[Tensor]) -> tuple[FeatureLayer, Tensor, Tensor]:
        """One pass over all images: the layer, its raw output ``(T*B, ...)`` (a leaf that
        requires grad) and the raw embeddings ``(T, B, d)``."""
        layer = self.attribution.feature_layer(slots[0])
        activation, embeddings = self.attribution.forward_with_activation(torch.cat(slots), layer)
        if not torch.isfinite(embeddings).all():
            raise ModelOutputError(
                "the model produced NaN or Inf embeddings for finite inputs; check the "
                "model's weights and numerics (e.g. run it in float32)"
            )
        return layer, activation, embeddings.reshape(len(slots), slots[0].shape[0], -1)

    def _spatial(self, activation: Tensor, layer: FeatureLayer, slots: list[Tensor]) -> Tensor:
        image_hw = (slots[0].shape[-2], slots[0].shape[-1])
        return self.attribution.spatial(activation, layer, image_hw)

    def _gradcam(
        self,
        slots: list[Tensor],
        targets_fn: Callable[[Tensor], Tensor],
        relu: bool = True,
        extra: Sequence[nn.Module] = (),
    ) -> Tensor:
        """GradCAM of per-image targets ``(T, B)`` computed by ``targets_fn(embeddings)``
        from raw embeddings ``(T, B, d)``. Image ``i``'s target must depend on image ``i``
        only (detach the others), so one backward pass of their sum gives every gradient."""
        with self._session(*extra):
            layer, activation, embeddings = self._forward(slots)
            targets = targets_fn(embeddings)
            if not targets.requires_grad:
                raise LayerError(
                    "the embedding does not depend on the chosen layer's output; "
                    "choose a layer on the path to the embedding"
                )
            (grad,) = torch.autograd.grad(targets.sum(), activation)
            image_hw = (slots[0].shape[-2], slots[0].shape[-1])
            maps = self.attribution.gradient_weighted_maps(
                activation, grad, layer, image_hw, relu
            ).detach()
        batch = slots[0].shape[0]
        return maps.reshape(len(slots), batch, *maps.shape[1:]).transpose(0, 1)


def _fixed_cosine_targets(embeddings: Tensor, coefficients: Tensor) -> Tensor:
    """``(T, B)``: ``sum_j c_ij cos(f_i, f_j)`` with every ``f_j`` (j != i) detached."""
    normalized = l2_normalize(embeddings)
    cosines = torch.einsum("ibd,jbd->ijb", normalized, normalized.detach())
    return (coefficients.to(cosines)[:, :, None] * cosines).sum(dim=1)


def _coefficients(coefficients: Optional[Any], num_slots: int) -> Tensor:
    if coefficients is None:
        return cosine_coefficients(num_slots)
    matrix = torch.as_tensor(coefficients, dtype=torch.float32)
    if matrix.shape != (num_slots, num_slots) or not torch.equal(matrix, matrix.T):
        raise InputError(
            f"coefficients must be a symmetric {num_slots}x{num_slots} matrix (one row per "
            f"image of the tuple), got shape {tuple(matrix.shape)}"
        )
    return matrix


@register_method
class SAMMethod(SimilarityMethod):
    """SAM, the core method: :meth:`EmbeddingAttribution.attribute_tuples`'s maps.

    ``explain(tuples, same_class=None, **options)``: pairs need ``same_class`` (a bool
    per pair); triplets and quadruplets take their roles from position. Other options
    (``weight_fn``, ``relu_attributions``, ``detach_weights``, ``chunk_size``) are passed
    on. Maps are non-negative (ReLU).
    """

    name = "sam"

    def explain(self, tuples: TensorTuple, same_class: Any = None, **options: Any) -> Tensor:
        slots = self._check_tuples(tuples)
        return self.attribution.attribute_tuples(slots, same_class, **options).maps


@register_method
class GradCAMCosine(SimilarityMethod):
    """GradCAM with a cosine-similarity target for each image, the other images fixed.

    Pair: image 1's target is ``cos(f1, f2)`` with ``f2`` a constant, image 2's
    symmetrically (what pytorch-grad-cam's embedding tutorial does). Triplets and
    quadruplets: see :func:`cosine_coefficients`; e.g. the anchor's target is
    ``cos(a, p) - cos(a, n)``, the positive's ``cos(p, a)``, the negative's
    ``-cos(n, a)``. ``explain(tuples, coefficients=None, relu=True)`` takes any symmetric
    matrix as ``coefficients``. Maps are non-negative with ``relu=True``.

    For pairs this is SAM with ``weight_fn=lambda f1, f2: f1 + f2`` (``f_i . f_i = 1``
    has no gradient), computed here in one pass for every tuple size.
    """

    name = "gradcam_cosine"

    def explain(
        self, tuples: TensorTuple, coefficients: Optional[Any] = None, relu: bool = True
    ) -> Tensor:
        slots = self._check_tuples(tuples)
        matrix = _coefficients(coefficients, len(slots))
        return self._gradcam(slots, lambda emb: _fixed_cosine_targets(emb, matrix), relu)


HeadSpec = Union[str, None, nn.Module]


@register_method
class Stylianou(SimilarityMethod):
    """Similarity decomposition of Stylianou et al. 2019 for global-average-pooled models.

    The model must compute ``f = W mean_{u,v} A[:, u, v] + b`` from the layer's output
    ``A`` (C, h, w) with an optional linear head ``(W, b)``. Each location's embedding
    share is ``e(u, v) = W A[:, u, v] + b`` (so ``f`` is their mean), and image ``i``'s
    map for image ``j`` is

        ``M_ij(u, v) = e_i(u, v) . f_j / (h w |f_i| |f_j|)``,

    which sums over ``(u, v)`` to exactly ``cos(f_i, f_j)``. Tuples combine these with
    :func:`cosine_coefficients`, so image ``i``'s map sums to its cosine target (maps are
    signed; no ReLU).

    Args:
        model: the embedding model.
        layer: the layer whose output is globally average pooled (default: found
            automatically, the last spatial layer).
        head: ``"auto"`` (default) looks for a linear head after the pooling
            (``get_classifier()``, ``fc``, ``head``, ``classifier``, the model's last
            module) or none; or pass an
            ``nn.Linear``, its dotted name, or ``None``. The choice is checked on every
            call: the embedding must equal ``head(mean(A))``, else :class:`LayerError`.
    """

    name = "stylianou"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        head: HeadSpec = "auto",
        **layer_options: Any,
    ) -> None:
        super().__init__(model, layer, **layer_options)
        if isinstance(head, str) and head != "auto":
            head = get_layer(model, head)
        if head is not None and not isinstance(head, (str, nn.Linear, nn.Identity)):
            raise InputError(
                f"head must be 'auto', None, an nn.Linear or its name; got {type(head).__name__}"
            )
        self.head = head

    def _rebuild_options(self) -> dict[str, Any]:
        return {**super()._rebuild_options(), "head": self._by_name(self.head)}

    def _head_candidates(self) -> list[Optional[nn.Module]]:
        if self.head != "auto":
            return [self.head]
        found: list[Optional[nn.Module]] = []
        get_classifier = getattr(self.model, "get_classifier", None)
        if callable(get_classifier):
            found.append(get_classifier())
        for attribute in ("fc", "head", "classifier"):
            found.append(getattr(self.model, attribute, None))
        # e.g. nn.Sequential(..., pool, flatten, Linear); checked numerically like the rest
        found += [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1:]
        linear = [m for m in found if isinstance(m, nn.Linear)]
        return linear + [None]

    def location_embeddings(self, slots: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-location embedding shares ``e`` ``(T, B, d, h, w)`` and the embeddings
        ``(T, B, d)``, after checking that the embeddings are their spatial mean."""
        with self._session():
            layer, activation, embeddings = self._forward(slots)
        features = self._spatial(activation.detach(), layer, slots)
        embeddings = embeddings.detach()
        pooled = features.mean(dim=(2, 3))
        flat = embeddings.reshape(pooled.shape[0], -1)
        for head in self._head_candidates():
            if isinstance(head, nn.Linear):
                if head.in_features != pooled.shape[1]:
                    continue
                shares = torch.einsum("dc,nchw->ndhw", head.weight.detach(), features)
                if head.bias is not None:
                    shares = shares + head.bias.detach()[:, None, None]
            else:
                shares = features
            if shares.shape[1] == flat.shape[1] and _close(shares.mean(dim=(2, 3)), flat):
                return shares.reshape(*embeddings.shape[:2], *shares.shape[1:]), embeddings
        raise LayerError(
            f"{self.name!r} needs an embedding that is a linear function of the global "
            f"average of layer {layer.name!r}'s output, but the model's embedding is not "
            f"{self._head_text()}(mean over the {tuple(features.shape[2:])} grid). Pass the "
            "layer right before the global pooling (layer=), the linear head after it "
            "(head=nn.Linear or its name, or head=None for none), or use another method"
        )

    def _head_text(self) -> str:
        if self.head == "auto":
            return "Linear or identity "
        return "the given head " if self.head is not None else "identity "

    def explain(self, tuples: TensorTuple, coefficients: Optional[Any] = None) -> Tensor:
        slots = self._check_tuples(tuples)
        matrix = _coefficients(coefficients, len(slots))
        shares, embeddings = self.location_embeddings(slots)
        return _decomposed_maps(shares, embeddings, matrix.to(shares))


def _decomposed_maps(shares: Tensor, embeddings: Tensor, coefficients: Tensor) -> Tensor:
    """``(B, T, h, w)``: ``sum_j c_ij e_i(u, v) . f_j / (h w |f_i| |f_j|)``."""
    h, w = shares.shape[-2:]
    norms = embeddings.norm(dim=-1).clamp_min(1e-12)  # (T, B)
    unit = embeddings / norms[..., None]
    partner = torch.einsum("ij,jbd->ibd", coefficients, unit)
    maps = torch.einsum("ibdhw,ibd->ibhw", shares, partner) / (h * w * norms[..., None, None])
    return maps.transpose(0, 1)


def _close(predicted: Tensor, actual: Tensor) -> bool:
    error = (predicted - actual).norm(dim=1)
    return bool((error <= 1e-3 * actual.norm(dim=1) + 1e-5).all())


@register_method
class PointSpecific(Stylianou):
    """Point-specific maps of Zhu et al. 2021 ("Visual Explanation for Deep Metric
    Learning") for global-average-pooled models.

    With location shares ``e`` as in :class:`Stylianou`, the point-to-point intensity
    between location ``p`` of image 1 and ``q`` of image 2 is

        ``S(p, q) = e_1(p) . e_2(q) / (h w h' w' |f1| |f2|)``,

    which sums over all ``(p, q)`` to ``cos(f1, f2)`` (:meth:`point_to_point`).

    ``explain(tuples, point=(y, x))`` (pairs): ``(y, x)`` in input pixels of image 1 (or
    a ``(B, 2)`` tensor, one point per pair) selects the grid cell ``p`` containing it.
    Image 2's map is ``S(p, .)``: where image 2 matches that point; image 1's map holds
    ``sum_q S(p, q)`` at ``p`` and zero elsewhere, so both maps sum to the point's share
    of the cosine. Without ``point`` the overall maps ``sum_q S(p, q)`` are returned,
    which equal :class:`Stylianou`'s (also for triplets and quadruplets).
    """

    name = "point_specific"

    def explain(
        self,
        tuples: TensorTuple,
        point: Optional[Any] = None,
        coefficients: Optional[Any] = None,
    ) -> Tensor:
        if point is None:
            return super().explain(tuples, coefficients)
        slots = self._check_tuples(tuples)
        if len(slots) != 2 or coefficients is not None:
            raise InputError(
                "point= explains a pair (x1, x2): the point lies in x1 and the map shows "
                f"where x2 matches it; got {len(slots)} image batches"
                + (" and coefficients=" if coefficients is not None else "")
            )
        intensity = self.point_to_point(slots)  # (B, h, w, h, w)
        batch, h, w = intensity.shape[:3]
        rows, cols = self._grid_points(point, batch, slots[0].shape[-2:], (h, w))
        index = torch.arange(batch)
        second = intensity[index, rows, cols]
        first = torch.zeros_like(second)
        first[index, rows, cols] = second.sum(dim=(1, 2))
        return torch.stack([first, second], dim=1)

    def point_to_point(self, tuples: TensorTuple) -> Tensor:
        """``S`` for pairs, shape ``(B, h, w, h', w')``; sums to ``cos(f1, f2)``."""
        slots = self._check_tuples(tuples)
        if len(slots) != 2:
            raise InputError(f"point_to_point explains pairs; got {len(slots)} image batches")
        shares, embeddings = self.location_embeddings(slots)
        h, w = shares.shape[-2:]
        norms = embeddings.norm(dim=-1).clamp_min(1e-12)
        scale = (h * w) ** 2 * norms[0] * norms[1]
        intensity = torch.einsum("bdhw,bdyx->bhwyx", shares[0], shares[1])
        return intensity / scale[:, None, None, None, None]

    @staticmethod
    def _grid_points(
        point: Any, batch: int, image_hw: Sequence[int], grid_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        try:
            points = torch.as_tensor(point, dtype=torch.float64).reshape(-1, 2)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"point must be (y, x) or a (B, 2) tensor, got {point!r}") from None
        if points.shape[0] == 1:
            points = points.expand(batch, 2)
        height, width = int(image_hw[0]), int(image_hw[1])
        if points.shape[0] != batch:
            raise InputError(f"point holds {points.shape[0]} points for {batch} pairs")
        inside = (points >= 0).all(1) & (points[:, 0] < height) & (points[:, 1] < width)
        if not bool(inside.all()):
            raise InputError(
                f"point {points[~inside][0].tolist()} lies outside the {height}x{width} "
                "image; give (y, x) in input pixels, 0 <= y < H and 0 <= x < W"
            )
        rows = (points[:, 0] * grid_hw[0] / height).floor().long()
        cols = (points[:, 1] * grid_hw[1] / width).floor().long()
        return rows, cols


class PairClassifierHead(nn.Module):
    """Same/different classifier on a pair of embeddings: a logit from ``[|f1 - f2|, f1 * f2]``
    of the L2-normalised embeddings (symmetric in the two images).

    Args:
        dim: embedding dimension ``d``.
        hidden: width of one hidden ReLU layer, or ``None`` for a linear classifier.

    >>> head = PairClassifierHead(8)
    >>> head(torch.randn(5, 8), torch.randn(5, 8)).shape
    torch.Size([5])
    """

    def __init__(self, dim: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        if hidden is None:
            self.classifier: nn.Module = nn.Linear(2 * dim, 1)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        """The logit of "same class" for each pair, shape ``(B,)``."""
        f1, f2 = l2_normalize(f1), l2_normalize(f2)
        return self.classifier(torch.cat([(f1 - f2).abs(), f1 * f2], dim=1)).squeeze(1)


PairBatches = Union[tuple[Tensor, Tensor, Tensor], Iterable[tuple[Tensor, Tensor, Tensor]]]


def train_pair_head(
    model: nn.Module,
    pairs: PairBatches,
    epochs: int = 1,
    *,
    head: Optional[PairClassifierHead] = None,
    hidden: Optional[int] = None,
    lr: float = 1e-2,
    batch_size: int = 32,
    train_backbone: bool = False,
) -> PairClassifierHead:
    """Train a :class:`PairClassifierHead` with BCE on same/different pairs.

    Args:
        model: the embedding model. Frozen and in eval mode unless ``train_backbone``,
            which trains it too, in train mode; its modes and ``requires_grad`` flags
            are restored afterwards (its weights keep the training).
        pairs: ``(x1, x2, same)`` tensors (``same``: bool ``(N,)``), split into batches
            of ``batch_size``; or an iterable (e.g. a DataLoader) of such batches.
        epochs: passes over ``pairs``.
        head: a head to keep training (default: a new one, ``hidden`` wide).
        lr: Adam's learning rate.

    Returns:
        The trained head, in eval mode, on the embeddings' device and dtype.
    """
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    optimizer: Optional[torch.optim.Optimizer] = None
    with torch.inference_mode(False), torch.enable_grad(), preserved_state(model, eval_mode=True):
        for _ in range(epochs):
            for x1, x2, same in _pair_batches(pairs, batch_size):
                if train_backbone:
                    model.train()
                    f1, f2 = model(x1), model(x2)
                else:
                    with torch.no_grad():
                        f1, f2 = model(x1), model(x2)
                if head is None:
                    head = PairClassifierHead(f1.shape[1], hidden).to(f1.device, f1.dtype)
                if optimizer is None:
                    parameters = list(head.parameters())
                    if train_backbone:
                        parameters += [p for p in model.parameters() if p.requires_grad]
                    optimizer = torch.optim.Adam(parameters, lr=lr)
                head.train()
                logits = head(f1, f2)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, same.to(logits))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    if head is None:
        raise InputError("pairs held no batches to train on")
    return head.eval()


def _pair_batches(pairs: PairBatches, batch_size: int) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    if isinstance(pairs, (tuple, list)) and len(pairs) == 3 and isinstance(pairs[0], Tensor):
        x1, x2, same = pairs
        if not (x1.shape[0] == x2.shape[0] == torch.as_tensor(same).shape[0]):
            raise InputError("x1, x2 and same must hold the same number of pairs")
        same = torch.as_tensor(same)
        return [
            (x1[i : i + batch_size], x2[i : i + batch_size], same[i : i + batch_size])
            for i in range(0, x1.shape[0], batch_size)
        ]
    return pairs


@register_method
class BCEGradCAM(SimilarityMethod):
    """GradCAM of a same/different classifier's logit (the paper's Table 1 baseline).

    Image 1's target is ``head(f1, f2)`` with ``f2`` fixed, image 2's the same with
    ``f1`` fixed. ``explain(tuples, same_class=None)``: pass ``same_class`` (bools) to
    explain "different" (the negated logit) for pairs marked ``False``. Maps are
    non-negative (ReLU). Pairs only.

    Args:
        model: the embedding model.
        head: a trained :class:`PairClassifierHead` (see :func:`train_pair_head`).
        layer: as for :class:`SimilarityMethod`.
    """

    name = "bce_gradcam"
    tuple_sizes = (2,)

    def __init__(
        self, model: nn.Module, head: nn.Module, layer: LayerSpec = None, **layer_options: Any
    ) -> None:
        if not isinstance(head, nn.Module):
            raise InputError(
                "bce_gradcam needs head=: a trained PairClassifierHead (see train_pair_head)"
            )
        super().__init__(model, layer, **layer_options)
        self.head = head

    def _rebuild_options(self) -> dict[str, Any]:
        return {**super()._rebuild_options(), "head": self.head}

    def explain(self, tuples: TensorTuple, same_class: Any = None) -> Tensor:
        slots = self._check_tuples(tuples)
        sign = torch.ones(slots[0].shape[0])
        if same_class is not None:
            flags = torch.as_tensor(same_class).reshape(-1).bool()
            sign = torch.where(flags, 1.0, -1.0).expand(slots[0].shape[0])

        def targets(embeddings: Tensor) -> Tensor:
            f1, f2 = embeddings.unbind(0)
            logits = torch.stack([self.head(f1, f2.detach()), self.head(f1.detach(), f2)])
            return logits * sign.to(logits)

        return self._gradcam(slots, targets, extra=(self.head,))
