"""Similarity decompositions for global-average-pooled models: maps that sum to the cosine.

For a model whose embedding is ``f = W mean_{u,v} A[:, u, v] + b`` over the layer's
output ``A``, the cosine of two embeddings splits exactly over locations (Stylianou et
al. 2019) and over pairs of locations (Zhu et al. 2021). These methods read the
activations from the engine's forward pass; they take no gradient.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..engine.layouts import FeatureLayer
from ..engine.target_layer import LayerSpec, get_layer
from ..errors import InputError, LayerError
from .base import TensorTuple, register_method
from .centre import CentredMethod
from .cosine import check_centre
from .cosine import check_coefficients

__all__ = ["Stylianou", "PointSpecific", "pair_intensity"]

HeadSpec = Union[str, None, nn.Module]


@register_method
class Stylianou(CentredMethod):
    """Similarity decomposition of Stylianou et al. 2019 for global-average-pooled models.

    The model must compute ``f = W mean_{u,v} A[:, u, v] + b`` from the layer's output
    ``A`` (C, h, w) with an optional linear head ``(W, b)``. Each location's embedding
    share is ``e(u, v) = W A[:, u, v] + b`` (so ``f`` is their mean), and image ``i``'s
    map for image ``j`` is

        ``M_ij(u, v) = e_i(u, v) . f_j / (h w |f_i| |f_j|)``,

    which sums over ``(u, v)`` to exactly ``cos(f_i, f_j)``. Tuples combine these with
    :func:`~simexplain.methods.cosine.cosine_coefficients`, so image ``i``'s map sums to
    its cosine target (maps are signed; no ReLU). With a ``reference``, every embedding
    is measured from its mean ``m`` (``z = normalise(f / |f| - m)``, as for
    :class:`~simexplain.methods.Contribution`): location ``(u, v)``'s share of ``z_i`` is
    ``(e_i(u, v) / |f_i| - m) / |f_i / |f_i| - m|``, and the maps sum to the centred
    cosine targets. These maps are ``contribution``'s GradCAM maps made exact: for such
    a model, ``contribution`` with ``relu=False`` gives the same maps less a constant per
    image (the head's bias and the centre), and it explains any head.

    Args:
        model: the embedding model.
        layer: the layer whose output is globally average pooled (default: found
            automatically, the last spatial layer).
        head: ``"auto"`` (default) looks for a linear head after the pooling
            (``get_classifier()``, ``fc``, ``head``, ``classifier``, the model's last
            module) or none; or pass an
            ``nn.Linear``, its dotted name, or ``None``. The choice is checked on every
            call: the embedding must equal ``head(mean(A))``, else :class:`LayerError`.
        reference: optional embeddings ``(N, d)`` or images ``(N, C, H, W)`` to measure
            the embeddings from (see above); ``None``: from the origin.
    """

    name = "stylianou"
    rotation_invariant = True

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        head: HeadSpec = "auto",
        reference: Optional[Tensor] = None,
        **layer_options: Any,
    ) -> None:
        super().__init__(model, layer, reference, **layer_options)
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
        engine = self.engine
        with engine.session():
            layer = engine.feature_layer(slots[0])
            activation, embeddings = engine.forward(torch.cat(slots), layer)
        image_hw = (slots[0].shape[-2], slots[0].shape[-1])
        return self.shares_of(activation, embeddings, len(slots), layer, image_hw)

    def shares_of(
        self,
        activation: Tensor,
        embeddings: Tensor,
        num_slots: int,
        layer: FeatureLayer,
        image_hw: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """:meth:`location_embeddings` from a layer's output and the embeddings ``(T * B,
        d)`` of tuples' images (slot-major), however they were computed (e.g. from stored
        activations, :class:`~simexplain.GalleryIndex`)."""
        features = self.engine.spatial(activation.detach(), layer, image_hw)
        embeddings = embeddings.detach().reshape(num_slots, -1, embeddings.shape[-1])
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
        slots = self.checked_tuples(tuples)
        return self.maps_of_shares(self.location_embeddings(slots), coefficients)

    def maps_of_shares(
        self, located: tuple[Tensor, Tensor], coefficients: Optional[Any] = None
    ) -> Tensor:
        """Maps ``(B, T, h, w)`` from :meth:`location_embeddings`' (or :meth:`shares_of`')
        shares and embeddings, measured from the centre when there is one."""
        matrix = check_coefficients(coefficients, located[1].shape[0])
        shares, embeddings = self.centred_shares(*located)
        return _decomposed_maps(shares, embeddings, matrix.to(shares))

    def centred_shares(
        self, shares: Tensor, embeddings: Tensor, basis: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """Location shares ``(T, B, d, h, w)`` and embeddings ``(T, B, d)`` measured from
        the centre, as unit embeddings ``z`` (with their shares) when there is one, else
        unchanged (the formulas above divide by the norms). With ``basis`` ``(k, d)`` the
        shares are of the ``k`` coordinates ``basis @ f`` (``(T, B, k, h, w)``) and the
        centre is taken into that basis; the embeddings stay in all ``d``."""
        if self.centre is None:
            return shares, embeddings
        norms = embeddings.norm(dim=-1).clamp_min(1e-12)[..., None]  # (T, B, 1)
        centre = self.centre.to(embeddings)
        check_centre(centre, embeddings)
        lengths = (embeddings / norms - centre).norm(dim=-1, keepdim=True).clamp_min(1e-12)
        shift = centre if basis is None else basis.to(centre) @ centre
        located = shares / norms[..., None, None] - shift[:, None, None]
        return located / lengths[..., None, None], (embeddings / norms - centre) / lengths


def _decomposed_maps(shares: Tensor, embeddings: Tensor, coefficients: Tensor) -> Tensor:
    """``(B, T, h, w)``: ``sum_j c_ij e_i(u, v) . f_j / (h w |f_i| |f_j|)``."""
    h, w = shares.shape[-2:]
    norms = embeddings.norm(dim=-1).clamp_min(1e-12)  # (T, B)
    unit = embeddings / norms[..., None]
    partner = torch.einsum("ij,jbd->ibd", coefficients, unit)
    maps = torch.einsum("ibdhw,ibd->ibhw", shares, partner) / (h * w * norms[..., None, None])
    return maps.transpose(0, 1)


def pair_intensity(shares1: Tensor, shares2: Tensor, embeddings1: Tensor,
                   embeddings2: Tensor) -> Tensor:
    """``S(p, q) = e_1(p) . e_2(q) / (h w h' w' |f1| |f2|)``, ``(B, h, w, h', w')``, from
    location shares ``(B, k, h, w)`` and ``(B, k, h', w')`` whose spatial means are (the
    located part of) the embeddings ``(B, d)``, in any common basis of ``k`` coordinates."""
    norms = embeddings1.norm(dim=-1).clamp_min(1e-12) * embeddings2.norm(dim=-1).clamp_min(1e-12)
    cells = shares1.shape[-2] * shares1.shape[-1] * shares2.shape[-2] * shares2.shape[-1]
    intensity = torch.einsum("bkhw,bkyx->bhwyx", shares1, shares2)
    return intensity / (cells * norms)[:, None, None, None, None]


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
        slots = self.checked_tuples(tuples)
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
        slots = self.checked_tuples(tuples)
        if len(slots) != 2:
            raise InputError(f"point_to_point explains pairs; got {len(slots)} image batches")
        shares, embeddings = self.centred_shares(*self.location_embeddings(slots))
        return pair_intensity(shares[0], shares[1], embeddings[0], embeddings[1])

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
