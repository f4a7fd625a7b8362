"""``SimilarityEngine``: the mechanics every GradCAM-style similarity map shares.

How :meth:`SimilarityEngine.attribute` computes (see the project's METHOD.md, section 1,
and notes/speed.md):

1. the inputs are checked and cut into chunks of tuples; all images of a chunk go through
   the model in ONE forward pass (a layer hook sees every call, so one pass per slot would
   mix up activations);
2. nothing before the target layer records an autograd graph: the forward runs under
   ``no_grad`` and the layer's hook switches grad mode on and replaces the output by a
   fresh leaf, so memory stays near inference. Once a model has explained enough images
   it may be split at the layer (:mod:`~simexplain.engine._head_only`): a class-token
   transformer's last block then runs only what reaches the embedding, and on a CPU a
   network built mostly of linear layers runs the part before the layer with oneDNN's
   linear kernels;
3. the method's :class:`~simexplain.engine.score.SimilarityScore` turns the chunk's
   embeddings into one score per image, and ``torch.autograd.grad`` takes its gradient
   with respect to the layer output only: parameters' ``.grad`` are never touched;
4. GradCAM combines the layer's activations with those gradients, read as ``(N, C, h, w)``
   whatever the layer's layout.

The model's modes, ``requires_grad`` flags, ``.grad`` tensors and hooks are left as they
were, also when a call raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LayerError
from ._head_only import forward_split, split_for_maps
from .chunking import chunk_size_for
from .embeddings import check_model, embedding_matrix, finite_embeddings, run_model
from .gradients import batch_statistics_norms, layer_gradient, score_gradient
from .head_split import HeadSplit
from .input_layout import run_in_layout
from .inputs import TensorOrTuple, as_forward_args, check_tuple_inputs, tuple_forward_args
from .layouts import FeatureLayer, to_spatial
from .maps import full_precision, gradcam_maps
from .outputs import OutputSpec, check_output
from .score import SimilarityScore
from .state import check_hookable, frozen_norm_statistics, preserved_state, unwrap_data_parallel
from .target_layer import LayerSpec, get_layer, resolve_layer

__all__ = ["SimilarityEngine", "TupleResult"]


@dataclass
class TupleResult:
    """Everything one attribution call computes, per tuple slot.

    Attributes:
        maps: ``(B, T, h, w)`` raw maps at layer resolution.
        scores: ``(B, T)`` the score ``s_i`` of each image (paper SAM: ``w . f_i``).
        weights: ``(B, d)`` the criterion vector ``w`` of each tuple, for methods that
            have one (paper SAM), else ``None``.
        embeddings: ``(B, T, d)`` L2-normalised embeddings.
        kind: ``"same_pair"``, ``"different_pair"``, ``"pair"``, ``"triplet"``,
            ``"quadruplet"`` or ``"custom"``.
        layer: the name of the layer explained.
    """

    maps: Tensor
    scores: Tensor
    weights: Optional[Tensor]
    embeddings: Tensor
    kind: str
    layer: str

    @classmethod
    def from_chunks(
        cls, parts: list[tuple[Tensor, Tensor, Optional[Tensor], Tensor]], kind: str, layer: str
    ) -> "TupleResult":
        """The result of chunks' ``(maps, scores, weights, embeddings)``, in order."""
        weights = [p[2] for p in parts]
        return cls(
            maps=torch.cat([p[0] for p in parts]),
            scores=torch.cat([p[1] for p in parts]),
            weights=None if weights[0] is None else torch.cat(weights),
            embeddings=torch.cat([p[3] for p in parts]),
            kind=kind,
            layer=layer,
        )

    def to(self, device: Any) -> "TupleResult":
        """This result with its tensors on ``device``."""
        return TupleResult(
            maps=self.maps.to(device),
            scores=self.scores.to(device),
            weights=None if self.weights is None else self.weights.to(device),
            embeddings=self.embeddings.to(device),
            kind=self.kind,
            layer=self.layer,
        )


class SimilarityEngine:
    """Hooked forward, layer gradient and GradCAM combine for one model and layer.

    Args:
        model: maps a batch ``(N, C, H, W)`` to embeddings ``(N, d)``.
        layer: the spatial layer to explain: ``None`` (found automatically on the first
            call), a dotted module name such as ``"layer4"``, or the module itself.
        layout: how to read the layer's output when it cannot be inferred: ``"NCHW"``,
            ``"NHWC"`` or ``"tokens"``.
        num_prefix_tokens: class/distillation/register tokens before the patch grid, for
            ``"tokens"`` layers whose model does not declare ``num_prefix_tokens``.
        reshape_transform: any function turning the layer output into ``(N, C, h, w)``;
            overrides ``layout``.
        eval_mode: put the model (and a score's modules) in eval mode during each call.
            With ``False``, batch norms in train mode after the layer couple the images of
            a forward pass: the batch then goes through in one pass (``chunk_size`` is not
            used) and each image gets its own backward pass, so its map is its own score's
            (:mod:`~simexplain.engine.gradients`); their running statistics are not
            updated by an explanation.
        per_image_gradients: one backward pass per image: ``None`` (default) when a batch
            norm that uses the batch's statistics runs after the layer, ``True`` also for
            other couplings the engine cannot see (e.g. attention across the batch).
        output: how to pick the embedding from the model's output when it returns more
            (a dict, a tuple, a Hugging Face ``ModelOutput``): a key
            (``"pooler_output"``), an index (``0``) or a callable
            (``lambda out: out.image_embeds``); see
            :func:`~simexplain.engine.outputs.select_output`.

    Example:
        >>> import torch, torchvision
        >>> from simexplain.methods import SAMScore
        >>> engine = SimilarityEngine(torchvision.models.resnet18(num_classes=8), "layer4")
        >>> anchor, positive, negative = torch.randn(3, 2, 3, 64, 64)
        >>> result = engine.attribute((anchor, positive, negative), SAMScore())
        >>> tuple(result.maps.shape), result.kind
        ((2, 3, 2, 2), 'triplet')
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
        per_image_gradients: Optional[bool] = None,
        output: OutputSpec = None,
    ) -> None:
        check_model(model)
        check_hookable(model)
        if isinstance(layer, str) and model is not unwrap_data_parallel(model):
            layer = layer.removeprefix("module.")
        model = unwrap_data_parallel(model)
        self.model = model
        self.layer_spec = layer
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens
        self.reshape_transform = reshape_transform
        self.eval_mode = eval_mode
        self.per_image_gradients = per_image_gradients
        self.output = check_output(output)
        #: Whether the last :meth:`forward` coupled its images after the layer (a batch
        #: norm with batch statistics ran after it, or ``per_image_gradients=True``).
        self.couples_images = bool(per_image_gradients)
        if isinstance(layer, str):
            get_layer(model, layer)  # fail early on a wrong name

    # ------------------------------------------------------------------ one call

    def attribute(
        self,
        inputs: TensorOrTuple,
        score: SimilarityScore,
        forward_args: Any = None,
        *,
        relu: bool = True,
        create_graph: bool = False,
        chunk_size: Optional[int] = None,
    ) -> TupleResult:
        """Maps of every image of every tuple for ``score``, in chunks of tuples.

        Args:
            inputs: 2, 3 or 4 image batches ``(B, C, H, W)``, one per slot.
            score: what the maps explain.
            forward_args: extra arguments for the model's forward. A tensor whose first
                dimension is ``B`` is per tuple (captum's convention): it is cut to each
                chunk and repeated for every slot. Anything else is passed unchanged.
            relu: apply ReLU to the maps (GradCAM's choice).
            create_graph: keep a graph through the maps so they can be trained with.
            chunk_size: tuples per forward pass (default:
                :func:`~simexplain.engine.chunking.default_chunk_size`).
        """
        slots = check_tuple_inputs(inputs)
        batch, count = slots[0].shape[0], len(slots)
        score = score.bind(count, batch)
        args = as_forward_args(forward_args)
        with self.session(*score.modules()), frozen_norm_statistics(self.model):
            # Images coupled by batch statistics are explained as the model sees them: at once.
            coupled = self.per_image_gradients or (
                self.per_image_gradients is None and batch_statistics_norms(self.model))
            chunk = batch if coupled else chunk_size_for(slots, chunk_size)
            layer = self.feature_layer(
                slots[0][:2], tuple_forward_args(args, batch, 0, min(2, batch), 1)
            )
            split = None if coupled or create_graph or args or not self.eval_mode else \
                split_for_maps(self.model, layer, slots[0], self.output, batch * count)
            parts = []
            for start in range(0, batch, chunk):
                stop = min(start + chunk, batch)
                parts.append(
                    self._attribute_chunk(
                        [s[start:stop] for s in slots],
                        score.chunk(start, stop),
                        tuple_forward_args(args, batch, start, stop, count),
                        layer,
                        relu,
                        create_graph,
                        split,
                    )
                )
        return TupleResult.from_chunks(parts, score.kind(count), layer.name)

    def _attribute_chunk(
        self,
        slots: list[Tensor],
        score: SimilarityScore,
        args: tuple,
        layer: FeatureLayer,
        relu: bool,
        create_graph: bool,
        split: Optional[HeadSplit] = None,
    ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        images = torch.cat(slots)
        through_split = None if split is None else forward_split(split, images, self.output)
        if through_split is not None:
            self.couples_images = False  # only uncoupled images take the split path
        activation, embeddings = through_split or \
            self.forward(images, layer, args, create_graph)
        return self.maps_of(activation, embeddings, len(slots), score, layer,
                            (images.shape[-2], images.shape[-1]), relu, create_graph)

    def maps_of(
        self,
        activation: Tensor,
        embeddings: Tensor,
        num_slots: int,
        score: SimilarityScore,
        layer: FeatureLayer,
        image_hw: tuple[int, int],
        relu: bool = True,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """Maps ``(B, T, h, w)``, scores ``(B, T)``, criterion weights and normalised
        embeddings ``(B, T, d)`` of a chunk whose images (slot-major) gave the layer's
        ``activation`` (a leaf that requires grad) and ``embeddings`` ``(T * B, d)``."""
        batch = embeddings.shape[0] // num_slots
        per_slot = embeddings.reshape(num_slots, batch, -1)
        wide = full_precision(per_slot)  # scores in float32 for half-precision models
        scored = score(wide)
        gradient = self.score_gradient(
            scored.values, activation, score.partners_fixed, create_graph,
            through=None if wide is per_slot else (per_slot, wide),
        )
        maps = self.combine(activation, gradient, layer, image_hw, relu)
        values, weights = scored.values, scored.weights
        normalized = F.normalize(wide if create_graph else wide.detach(), dim=-1)
        if not create_graph:
            maps, values = maps.detach(), values.detach()
            weights = None if weights is None else weights.detach()
        maps = maps.reshape(num_slots, batch, *maps.shape[1:]).transpose(0, 1)
        return maps, values, weights, normalized.transpose(0, 1)

    # ------------------------------------------------------------------ the pieces

    def feature_layer(self, sample: Tensor, forward_args: tuple = ()) -> FeatureLayer:
        """The layer explained for inputs shaped like ``sample`` (found once, then cached)."""
        layout = "NCHW" if self.reshape_transform is not None else self.layout
        return resolve_layer(
            self.model, self.layer_spec, sample, layout, self.num_prefix_tokens, forward_args,
            self.output,
        )

    @contextlib.contextmanager
    def session(self, *modules: nn.Module) -> Iterator[None]:
        """Grad mode on (also under ``no_grad`` or ``inference_mode``, as captum's metrics
        call attributions), the model and ``modules`` in eval mode when ``eval_mode``, and
        their state restored afterwards."""
        with contextlib.ExitStack() as stack:
            for module in (self.model, *modules):
                stack.enter_context(preserved_state(module, eval_mode=self.eval_mode))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            yield

    def forward(
        self,
        images: Tensor,
        layer: FeatureLayer,
        forward_args: tuple = (),
        create_graph: bool = False,
        check_finite: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """One forward pass returning the layer's output and the embeddings ``(N, d)``.

        With ``create_graph=False`` the trunk before the layer records no graph, the
        activation is a fresh leaf and the images go in the model's fastest layout
        (:mod:`~simexplain.engine.input_layout`: channels-last for convolutional networks
        on a CPU); with ``True`` (training) it is the layer's real output, so gradients
        reach every parameter. The model's mode is left as it is.
        """
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

        def after_layer(module: nn.Module, inputs: tuple, output: Any) -> None:
            if captured:
                self.couples_images = True

        def run(laid_out: Tensor) -> Any:  # a pass that failed channels-last leaves nothing
            captured.clear()
            calls[0] = 0
            self.couples_images = bool(self.per_image_gradients)
            return run_model(self.model, laid_out, forward_args, self.output)

        norms = [] if self.per_image_gradients is not None else batch_statistics_norms(self.model)
        handles = [m.register_forward_hook(after_layer) for m in norms]
        handles.append(layer.module.register_forward_hook(hook))

        try:
            with torch.set_grad_enabled(create_graph):
                # Training keeps the images as given; maps take the model's fastest layout.
                output = run(images) if create_graph else \
                    run_in_layout(self.model, images, run)
                if not captured:
                    raise LayerError(
                        f"layer {layer.name!r} was not called during the forward pass; "
                        "choose a layer the model uses"
                    )
                read = finite_embeddings if check_finite else embedding_matrix
                embeddings = read(output, images.shape[0])
        finally:
            for each in handles:
                each.remove()
        return captured[0], embeddings

    def embed(self, images: Tensor, forward_args: tuple = ()) -> Tensor:
        """Plain embeddings ``(N, d)`` of ``images``: no hook, the model's state restored,
        the images in the model's layout (:mod:`~simexplain.engine.input_layout`)."""
        with preserved_state(self.model, eval_mode=self.eval_mode):
            output = run_in_layout(self.model, images, lambda x: run_model(
                self.model, x, forward_args, self.output))
            return embedding_matrix(output, images.shape[0])

    def spatial(self, tensor: Tensor, layer: FeatureLayer, image_hw: tuple[int, int]) -> Tensor:
        """The layer output (or its gradient) as ``(N, C, h, w)``."""
        if self.reshape_transform is not None:
            out = self.reshape_transform(tensor)
            if not isinstance(out, Tensor) or out.dim() != 4:
                raise LayerError("reshape_transform must return a (N, C, h, w) tensor")
            return out
        return to_spatial(tensor, layer, image_hw)

    def combine(
        self,
        activation: Tensor,
        gradient: Tensor,
        layer: FeatureLayer,
        image_hw: tuple[int, int],
        relu: bool = True,
    ) -> Tensor:
        """GradCAM's maps ``(N, h, w)`` from the layer's output and its gradient, both in
        the layer's own layout."""
        spatial = self.spatial(activation, layer, image_hw)
        return gradcam_maps(spatial, self.spatial(gradient, layer, image_hw), relu)

    def score_gradient(
        self,
        scores: Tensor,
        activation: Tensor,
        partners_fixed: bool = True,
        create_graph: bool = False,
        through: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """The gradient of each image's score ``(B, T)`` at its own rows of ``activation``,
        one backward pass per image when the last forward coupled the images
        (:func:`~simexplain.engine.gradients.score_gradient`)."""
        return score_gradient(scores, activation, partners_fixed=partners_fixed,
                              per_image=self.couples_images, create_graph=create_graph,
                              through=through)

    layer_gradient = staticmethod(layer_gradient)
