"""``EmbeddingAttribution``: GradCAM-style maps for tuples of images under an embedding model.

How a call computes (see the project's METHOD.md, section 1, and notes/speed.md):

1. all images of all tuples in a chunk go through the model in ONE forward pass (a
   layer hook sees every call, so one pass per slot would mix up activations);
2. in explanation mode nothing before the target layer records an autograd graph: the
   forward runs under ``no_grad`` and the layer's hook switches grad mode on and
   replaces the output by a fresh leaf, so memory stays near inference;
3. scores ``s_i = w . normalize(f_i)`` are formed with ``w`` from the tuple's
   embeddings, and ``torch.autograd.grad`` takes their gradient with respect to the
   layer output only: parameters' ``.grad`` are never touched.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .errors import InputError, LayerError, ModelOutputError
from .layers import (
    FeatureLayer,
    LayerSpec,
    embedding_matrix,
    get_layer,
    resolve_layer,
    to_spatial,
)
from .state import preserved_state
from .weights import (
    KINDS,
    WeightFn,
    l2_normalize,
    pair_weights,
    similarity_scores,
    weights_for_kind,
)

__all__ = ["EmbeddingAttribution", "TupleResult", "default_chunk_size", "tuple_kind"]

TensorOrTuple = Union[Tensor, Sequence[Tensor]]

#: The most tuples per forward pass when ``chunk_size`` is not given.
DEFAULT_CHUNK_SIZE = 32

#: On a CPU, the default chunk holds about this many input pixels: six 224 x 224 images.
#: Batches that large keep their activations in cache; whole batches of 224 px images ran up
#: to 1.8x slower per image (``benchmarks/results/bench_chunking.md``).
CPU_PIXELS_PER_PASS = 6 * 224 * 224


@dataclass
class TupleResult:
    """Everything one attribution call computes, per tuple slot.

    Attributes:
        maps: ``(B, T, h, w)`` raw maps at layer resolution.
        scores: ``(B, T)`` scores ``s_i = w . f_i``.
        weights: ``(B, d)`` weight vectors ``w``.
        embeddings: ``(B, T, d)`` L2-normalised embeddings.
        kind: ``"same_pair"``, ``"different_pair"``, ``"pair"`` (mixed), ``"triplet"``,
            ``"quadruplet"`` or ``"custom"``.
        layer: the name of the layer explained.
    """

    maps: Tensor
    scores: Tensor
    weights: Tensor
    embeddings: Tensor
    kind: str
    layer: str


def tuple_kind(num_slots: int, same_class: Optional[Tensor], custom: bool) -> str:
    """Name the kind of tuple explained from its size and, for pairs, ``same_class``."""
    if custom:
        return "custom"
    if num_slots == 2:
        if same_class is None:
            return "pair"
        if bool(same_class.all()):
            return "same_pair"
        return "different_pair" if not bool(same_class.any()) else "pair"
    return "triplet" if num_slots == 3 else "quadruplet"


class EmbeddingAttribution(LayerAttribution, GradientAttribution):
    r"""Similarity maps for pairs, triplets and quadruplets of images, as a captum attribution.

    Args:
        model: maps a batch ``(N, C, H, W)`` to embeddings ``(N, d)``.
        layer: the spatial layer to explain: ``None`` (found automatically on the first
            call), a dotted module name such as ``"layer4"``, or the module itself.
        layout: how to read the layer's output when it cannot be inferred: ``"NCHW"``,
            ``"NHWC"`` or ``"tokens"``.
        num_prefix_tokens: class/distillation/register tokens before the patch grid,
            for ``"tokens"`` layers whose model does not declare ``num_prefix_tokens``.
        reshape_transform: any function turning the layer output into
            ``(N, C, h, w)``; overrides ``layout``.
        eval_mode: put the model in eval mode during each call (the default). Set
            ``False`` to keep its current mode, e.g. to train with the maps.

    Example:
        >>> import torch, torchvision
        >>> from simexplain import EmbeddingAttribution
        >>> model = torchvision.models.resnet18(num_classes=16)
        >>> attr = EmbeddingAttribution(model, layer="layer4")
        >>> anchor, positive, negative = torch.randn(3, 2, 3, 64, 64)
        >>> maps = attr.attribute((anchor, positive, negative))
        >>> [tuple(m.shape) for m in maps]
        [(2, 1, 2, 2), (2, 1, 2, 2), (2, 1, 2, 2)]

    ``attribute`` returns one ``(B, 1, h, w)`` map per slot at layer resolution, like
    captum's ``LayerGradCam``; upsample with ``LayerAttribution.interpolate`` or
    :func:`simexplain.maps.upsample_maps`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        *,
        layout: Optional[str] = None,
        num_prefix_tokens: Optional[int] = None,
        reshape_transform: Optional[Callable[[Tensor], Tensor]] = None,
        eval_mode: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        resolved = layer if isinstance(layer, nn.Module) else None
        LayerAttribution.__init__(self, model, resolved)
        GradientAttribution.__init__(self, model)
        self.model = model
        self.layer_spec = layer
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens
        self.reshape_transform = reshape_transform
        self.eval_mode = eval_mode
        if isinstance(layer, str):
            get_layer(model, layer)  # fail early on a wrong name

    def feature_layer(self, sample: Tensor, forward_args: tuple = ()) -> FeatureLayer:
        """The layer explained for inputs shaped like ``sample`` (found once, then cached)."""
        layout = "NCHW" if self.reshape_transform is not None else self.layout
        found = resolve_layer(
            self.model, self.layer_spec, sample, layout, self.num_prefix_tokens, forward_args
        )
        self.layer = found.module
        return found

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        weight_fn: Optional[WeightFn] = None,
        relu_attributions: bool = True,
        detach_weights: bool = True,
        create_graph: bool = False,
        chunk_size: Optional[int] = None,
    ) -> tuple[Tensor, ...]:
        r"""Maps for every image of every tuple.

        Args:
            inputs: a tuple of 2, 3 or 4 image batches, each ``(B, C, H, W)``; the slot
                gives the role: ``(x1, x2)`` pair, ``(anchor, positive, negative)``
                triplet, ``(anchor, positive, negative1, negative2)`` quadruplet.
            target: pairs only: whether each pair is same-class, a bool tensor of
                shape ``(B,)`` (or one bool for all). ``None`` for triplets and
                quadruplets. Per-pair tensors are ``(B,)`` so captum's ``NoiseTunnel``
                can expand them.
            additional_forward_args: extra arguments for the model's forward. A tensor
                whose first dimension is ``B`` is per tuple (captum's convention, so
                ``NoiseTunnel`` can expand it): it is cut to each chunk and repeated for
                every slot. Anything else is passed unchanged to every call.
            weight_fn: explain another criterion: a function of the slots' normalised
                embeddings ``(B, d)`` returning ``w`` ``(B, d)``; ``target`` is then
                ignored. See :mod:`simexplain.weights`.
            relu_attributions: apply ReLU to the maps (GradCAM's choice).
            detach_weights: treat ``w`` as a constant (one backward pass). ``False``
                also differentiates through ``w``, one backward pass per slot.
            create_graph: build a graph through the maps so they can be trained with.
            chunk_size: tuples per forward pass; it bounds memory. Default: up to 32 on
                an accelerator; on a CPU, as many as hold about six 224 px images (whole
                large batches run slower there), see
                :func:`~simexplain.attribution.default_chunk_size`.

        Returns:
            One tensor ``(B, 1, h, w)`` per slot.
        """
        result = self.attribute_tuples(
            inputs,
            target,
            additional_forward_args,
            weight_fn=weight_fn,
            relu_attributions=relu_attributions,
            detach_weights=detach_weights,
            create_graph=create_graph,
            chunk_size=chunk_size,
        )
        return tuple(m.unsqueeze(1) for m in result.maps.unbind(1))

    def attribute_tuples(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        weight_fn: Optional[WeightFn] = None,
        relu_attributions: bool = True,
        detach_weights: bool = True,
        create_graph: bool = False,
        chunk_size: Optional[int] = None,
    ) -> TupleResult:
        """Like :meth:`attribute`, also returning scores, ``w`` and embeddings."""
        slots = check_tuple_inputs(inputs)
        batch = slots[0].shape[0]
        same_class = None if weight_fn is not None else _check_target(target, len(slots), batch)
        if chunk_size is None:
            chunk = default_chunk_size(slots, batch)
        else:
            chunk = _check_chunk_size(chunk_size)
        args = _as_tuple(additional_forward_args)
        # enable_grad: captum's metrics call attribute under no_grad.
        with preserved_state(self.model, eval_mode=self.eval_mode), torch.inference_mode(
            False
        ), torch.enable_grad():
            layer = self.feature_layer(
                slots[0][:2], tuple_forward_args(args, batch, 0, min(2, batch), 1)
            )
            parts = []
            for start in range(0, batch, chunk):
                stop = min(start + chunk, batch)
                parts.append(
                    self._attribute_chunk(
                        [s[start:stop] for s in slots],
                        None if same_class is None else same_class[start:stop],
                        tuple_forward_args(args, batch, start, stop, len(slots)),
                        layer,
                        weight_fn,
                        relu_attributions,
                        detach_weights,
                        create_graph,
                    )
                )
        return TupleResult(
            maps=torch.cat([p[0] for p in parts]),
            scores=torch.cat([p[1] for p in parts]),
            weights=torch.cat([p[2] for p in parts]),
            embeddings=torch.cat([p[3] for p in parts]),
            kind=tuple_kind(len(slots), same_class, weight_fn is not None),
            layer=layer.name,
        )

    def _attribute_chunk(
        self,
        slots: list[Tensor],
        same_class: Optional[Tensor],
        args: tuple,
        layer: FeatureLayer,
        weight_fn: Optional[WeightFn],
        relu: bool,
        detach_weights: bool,
        create_graph: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        num_slots, batch = len(slots), slots[0].shape[0]
        images = torch.cat(slots)
        activation, embeddings = self._forward(images, args, layer, create_graph)
        if not torch.isfinite(embeddings).all():
            raise ModelOutputError(
                "the model produced NaN or Inf embeddings for finite inputs; check the "
                "model's weights and numerics (e.g. run it in float32)"
            )
        normalized = l2_normalize(embeddings).reshape(num_slots, batch, -1)
        per_slot = list(normalized.unbind(0))
        weights = _weights(per_slot, same_class, weight_fn)
        if detach_weights:
            weights = weights.detach()
        scores = similarity_scores(weights, per_slot)
        grad = self._layer_gradient(scores, activation, detach_weights, create_graph)
        image_hw = (images.shape[-2], images.shape[-1])
        maps = self.gradient_weighted_maps(activation, grad, layer, image_hw, relu)
        if not create_graph:
            maps, scores, weights = maps.detach(), scores.detach(), weights.detach()
            normalized = normalized.detach()
        maps = maps.reshape(num_slots, batch, *maps.shape[1:]).transpose(0, 1)
        return maps, scores, weights, normalized.transpose(0, 1)

    def gradient_weighted_maps(
        self,
        activation: Tensor,
        gradient: Tensor,
        layer: FeatureLayer,
        image_hw: tuple[int, int],
        relu: bool = True,
    ) -> Tensor:
        """GradCAM's combination: channels of ``activation`` weighted by the spatial mean
        of ``gradient``, summed; ``(N, h, w)``. Both are the layer's raw output layout."""
        spatial_act = self.spatial(activation, layer, image_hw)
        spatial_grad = self.spatial(gradient, layer, image_hw)
        channel_weights = spatial_grad.mean(dim=(2, 3), keepdim=True)
        maps = (channel_weights * spatial_act).sum(dim=1)
        return torch.relu(maps) if relu else maps

    def forward_with_activation(
        self,
        images: Tensor,
        layer: FeatureLayer,
        additional_forward_args: Any = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One forward pass returning the layer's output and the embeddings ``(N, d)``.

        With ``create_graph=False`` the trunk before the layer records no graph and the
        activation is a fresh leaf; with ``True`` (training) it is the layer's real output,
        so gradients reach every parameter. The model's mode is left as it is.
        """
        return self._forward(images, _as_tuple(additional_forward_args), layer, create_graph)

    def _forward(
        self, images: Tensor, args: tuple, layer: FeatureLayer, create_graph: bool
    ) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        calls = [0]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            index = calls[0]
            calls[0] += 1
            if layer.call_index >= 0 and index != layer.call_index:
                return None
            if not isinstance(output, Tensor):
                raise LayerError(
                    f"layer {layer.name!r} returned {type(output).__name__}, not a tensor; "
                    "choose a layer that outputs a feature map"
                )
            torch.set_grad_enabled(True)
            if create_graph and output.requires_grad:
                source = output
            else:
                # A fresh leaf: the trunk before the layer keeps no graph.
                source = output.detach().requires_grad_()
            captured[:] = [source]
            # The clone shields the leaf from in-place ops later in the forward pass.
            return source.clone()

        handle = layer.module.register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(create_graph):
                output = self.model(images, *args)
                if not captured:
                    raise LayerError(
                        f"layer {layer.name!r} was not called during the forward pass; "
                        "choose a layer the model uses"
                    )
                embeddings = embedding_matrix(output, images.shape[0])
        finally:
            handle.remove()
        return captured[0], embeddings

    @staticmethod
    def _layer_gradient(
        scores: Tensor, activation: Tensor, detach_weights: bool, create_graph: bool
    ) -> Tensor:
        if detach_weights:
            # s_i depends on image i only, so one pass of sum(s) gives every image's gradient.
            outputs = [scores.sum()]
        else:
            outputs = [scores[:, k].sum() for k in range(scores.shape[1])]
        grads = []
        for k, out in enumerate(outputs):
            if not out.requires_grad:
                raise LayerError(
                    "the embedding does not depend on the chosen layer's output; "
                    "choose a layer on the path to the embedding"
                )
            (grad,) = torch.autograd.grad(
                out,
                activation,
                retain_graph=create_graph or k < len(outputs) - 1,
                create_graph=create_graph,
                allow_unused=True,
            )
            if grad is None:
                raise LayerError(
                    "the embedding does not depend on the chosen layer's output; "
                    "choose a layer on the path to the embedding"
                )
            grads.append(grad)
        if detach_weights:
            return grads[0]
        batch = scores.shape[0]
        return torch.cat([g[k * batch : (k + 1) * batch] for k, g in enumerate(grads)])

    def spatial(self, tensor: Tensor, layer: FeatureLayer, image_hw: tuple[int, int]) -> Tensor:
        """The layer output (or its gradient) as ``(N, C, h, w)``."""
        if self.reshape_transform is not None:
            out = self.reshape_transform(tensor)
            if not isinstance(out, Tensor) or out.dim() != 4:
                raise LayerError("reshape_transform must return a (N, C, h, w) tensor")
            return out
        return to_spatial(tensor, layer, image_hw)


def is_per_tuple(arg: Any, batch: int) -> bool:
    """Whether a forward argument is per tuple: a tensor ``(B, ...)`` (captum's convention)."""
    return isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == batch


def tuple_forward_args(args: tuple, batch: int, start: int, stop: int, num_slots: int) -> tuple:
    """Per-tuple tensor arguments (B, ...) cut to a chunk and repeated for every slot."""
    return tuple(
        torch.cat([a[start:stop]] * num_slots) if is_per_tuple(a, batch) else a for a in args
    )


def _as_tuple(args: Any) -> tuple:
    if args is None:
        return ()
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def check_tuple_inputs(inputs: TensorOrTuple) -> list[Tensor]:
    if isinstance(inputs, Tensor) or not isinstance(inputs, (tuple, list)):
        raise InputError(
            "inputs must be a tuple of 2, 3 or 4 image batches (pair, triplet or "
            f"quadruplet), each (B, C, H, W); got {type(inputs).__name__}. "
            "E.g. attribute((anchor, positive, negative))"
        )
    slots = list(inputs)
    if not 2 <= len(slots) <= 4:
        raise InputError(
            f"inputs has {len(slots)} image batches; pass 2 (pair), 3 (triplet: anchor, "
            "positive, negative) or 4 (quadruplet: anchor, positive, negative1, negative2)"
        )
    for i, x in enumerate(slots):
        if not isinstance(x, Tensor):
            raise InputError(f"inputs[{i}] is {type(x).__name__}; expected a tensor (B, C, H, W)")
        if x.dim() != 4:
            raise InputError(
                f"inputs[{i}] has shape {tuple(x.shape)}; each slot must be a 4-D batch "
                "(B, C, H, W). Add a batch dimension with x.unsqueeze(0) for one image"
            )
        if not x.is_floating_point():
            raise InputError(f"inputs[{i}] has dtype {x.dtype}; convert images to float")
    first = slots[0]
    for i, x in enumerate(slots[1:], start=1):
        if x.shape[0] != first.shape[0]:
            raise InputError(
                f"inputs[{i}] has {x.shape[0]} images but inputs[0] has {first.shape[0]}; "
                "every slot must hold the same number of tuples"
            )
        if x.shape[1:] != first.shape[1:]:
            raise InputError(
                f"inputs[{i}] has image shape {tuple(x.shape[1:])} but inputs[0] has "
                f"{tuple(first.shape[1:])}; resize all images of a tuple to one size"
            )
        if x.device != first.device or x.dtype != first.dtype:
            raise InputError(
                f"inputs[{i}] is {x.dtype} on {x.device} but inputs[0] is {first.dtype} on "
                f"{first.device}; move all slots to one device and dtype"
            )
    if first.shape[0] == 0:
        raise InputError("inputs hold no images (batch size 0)")
    for i, x in enumerate(slots):
        if not all_finite(x):
            raise InputError(f"inputs[{i}] contains NaN or Inf values; clean the images first")
    return slots


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or Inf.

    A sum is several times faster than ``isfinite(...).all()`` on large inputs and is
    non-finite whenever an element is; only then (or on overflow) the exact test decides.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def default_chunk_size(slots: Sequence[Tensor], batch: int) -> int:
    """Tuples per forward pass when ``chunk_size`` is not given.

    Off the CPU, up to :data:`DEFAULT_CHUNK_SIZE`. On a CPU, as many tuples as hold about
    :data:`CPU_PIXELS_PER_PASS` input pixels (at least one, at most the same cap). The
    tuples are then spread evenly over the passes: 32 tuples in chunks of at most 24 run
    as 16 + 16, not 24 + 8.
    """
    limit = DEFAULT_CHUNK_SIZE
    first = slots[0]
    if first.device.type == "cpu":
        pixels = len(slots) * first.shape[-2] * first.shape[-1]
        limit = max(1, min(limit, CPU_PIXELS_PER_PASS // max(1, pixels)))
    passes = -(-batch // limit)
    return -(-batch // passes)


def _check_chunk_size(chunk_size: Any) -> int:
    whole = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if not whole or chunk_size < 1:
        raise InputError(
            f"chunk_size must be a positive number of tuples, got {chunk_size!r}; pass a "
            "whole number such as 8, or None for the default"
        )
    return int(chunk_size)


def _check_target(target: Any, num_slots: int, batch: int) -> Optional[Tensor]:
    if num_slots != 2:
        if target is not None:
            raise InputError(
                f"target is only used for pairs (same-class or not); a {num_slots}-image "
                "tuple has its roles fixed by position, so pass target=None"
            )
        return None
    if target is None:
        raise InputError(
            "pairs need target: a bool tensor (B,) saying whether each pair is same-class "
            "(True) or different-class (False); or pass weight_fn= for another criterion"
        )
    try:
        flags = torch.as_tensor(target).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"target must hold booleans (same-class or not), got {target!r}") from None
    if flags.dtype != torch.bool:
        if flags.is_floating_point() or not bool(((flags == 0) | (flags == 1)).all()):
            raise InputError(f"target must hold booleans (same-class or not), got {target!r}")
        flags = flags.bool()
    if flags.numel() == 1:
        flags = flags.expand(batch)
    if flags.numel() != batch:
        raise InputError(
            f"target has {flags.numel()} entries for {batch} pairs; pass one bool per pair"
        )
    return flags


def _weights(
    embeddings: list[Tensor], same_class: Optional[Tensor], weight_fn: Optional[WeightFn]
) -> Tensor:
    batch, dim = embeddings[0].shape
    if weight_fn is not None:
        weights = weight_fn(*embeddings)
        if not isinstance(weights, Tensor) or weights.shape not in ((batch, dim), (dim,)):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise InputError(
                f"weight_fn returned {shape}; it must return w of shape ({batch}, {dim}) "
                f"or ({dim},)"
            )
        return weights.expand(batch, dim)
    if len(embeddings) == 2:
        return pair_weights(embeddings[0], embeddings[1], same_class.to(embeddings[0].device))
    kind = next(k for k, n in KINDS.items() if n == len(embeddings) and "pair" not in k)
    return weights_for_kind(kind)(*embeddings)
