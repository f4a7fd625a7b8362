"""``EmbeddingAttribution``: similarity maps for tuples of images, as a captum attribution.

It is the captum face of :class:`~simexplain.engine.SimilarityEngine` with the score of
any GradCAM-style method of the registry (by default
:data:`~simexplain.methods.DEFAULT_METHOD`, partner-aware SAM; ``method="sam"`` is the
paper's). ``attribute`` takes and returns what captum's layer attributions do, so
captum's ``NoiseTunnel``, metrics and ``interpolate`` take it as it is (see
:mod:`simexplain.attribution.tuple_score` for the bridges some need).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ..engine.embeddings import check_model
from ..engine.engine import TupleResult
from ..engine.inputs import TensorOrTuple
from ..engine.layouts import FeatureLayer
from ..engine.score import SimilarityScore
from ..engine.target_layer import LayerSpec
from ..errors import InputError
from ..methods.base import SimilarityMethod, get_method, score_methods
from ..methods.defaults import DEFAULT_METHOD

__all__ = ["EmbeddingAttribution"]


class EmbeddingAttribution(LayerAttribution, GradientAttribution):
    r"""Similarity maps for pairs, triplets and quadruplets of images, as a captum attribution.

    Args:
        model: maps a batch ``(N, C, H, W)`` to embeddings ``(N, d)``.
        layer: the spatial layer to explain: ``None`` (found automatically on the first
            call), a dotted module name such as ``"layer4"``, or the module itself.
        method: the explanation method, a name of the registry with a per-image score
            (:func:`~simexplain.methods.score_methods`; default
            :data:`~simexplain.methods.DEFAULT_METHOD`), or a method built already.
        **options: the method's own (``reference=`` for ``"contribution"`` and
            ``"psam"``, ``head=`` for ``"bce_gradcam"``) and the engine's, as for
            :class:`~simexplain.engine.SimilarityEngine`: how to read the layer's output
            where the model's metadata does not tell (``layout``, ``num_prefix_tokens``,
            ``reshape_transform``), ``eval_mode`` (default ``True``; ``False`` keeps
            the model's mode, e.g. to train with the maps) and ``output``, how to pick
            the embedding from a model that returns more (a dict, a tuple, a Hugging
            Face ``ModelOutput``): a key, an index or a callable.

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
    :func:`simexplain.engine.upsample_maps`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        *,
        method: Union[str, SimilarityMethod] = DEFAULT_METHOD,
        **options: Any,
    ) -> None:
        if getattr(method, "blackbox", False) or (
                isinstance(method, str) and get_method(method).blackbox):
            name = method if isinstance(method, str) else method.name
            raise InputError(
                f"method {name!r} is a black-box method: it hides parts of the images and "
                "reads no layer or gradient, so it is not a captum layer attribution. Run it "
                f"with explain(model, images, labels, method={name!r}), which takes any "
                f"callable model, or build it, get_method({name!r}).build(model), and call "
                "its explain(tuples)"
            )
        check_model(model)
        if isinstance(method, SimilarityMethod):
            if method.model is not model or layer is not None or options:
                raise InputError(
                    "a built method brings its model, layer and options; pass "
                    "EmbeddingAttribution(model, method=method) with the method's own model"
                )
            built = method
        else:
            cls = get_method(method)
            if not cls.has_score():
                raise InputError(
                    f"method {method!r} is not GradCAM of a per-image score; "
                    f"EmbeddingAttribution runs one of {score_methods()}. Run {method!r} "
                    f"with explain(model, images, labels, method={method!r}), or build it, "
                    f"get_method({method!r}).build(model), and pass it to explain_stream, "
                    "explain_matches, or call its explain(tuples)"
                )
            built = cls.build(model, layer, **options)
        self.method = built
        self.engine = built.engine
        resolved = layer if isinstance(layer, nn.Module) else None
        LayerAttribution.__init__(self, model, resolved)
        GradientAttribution.__init__(self, model)
        self.model = model

    @property
    def eval_mode(self) -> bool:
        """Whether each call puts the model in eval mode."""
        return self.engine.eval_mode

    def feature_layer(self, sample: Tensor, forward_args: tuple = ()) -> FeatureLayer:
        """The layer explained for inputs shaped like ``sample`` (found once, then cached)."""
        found = self.engine.feature_layer(sample, forward_args)
        self.layer = found.module
        return found

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        **options: Any,
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
            **options: ``relu_attributions``, ``create_graph``, ``chunk_size`` and the
                method's score options, as for :meth:`attribute_tuples`.

        Returns:
            One tensor ``(B, 1, h, w)`` per slot.
        """
        result = self.attribute_tuples(inputs, target, additional_forward_args, **options)
        return tuple(m.unsqueeze(1) for m in result.maps.unbind(1))

    def attribute_tuples(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        relu_attributions: bool = True,
        create_graph: bool = False,
        chunk_size: Optional[int] = None,
        **score_options: Any,
    ) -> TupleResult:
        """Like :meth:`attribute`, also returning scores, the method's ``w`` (paper SAM)
        and the embeddings.

        Args:
            inputs, target, additional_forward_args: as for :meth:`attribute`.
            relu_attributions: apply ReLU to the maps (GradCAM's choice).
            create_graph: build a graph through the maps so they can be trained with.
            chunk_size: tuples per forward pass; it bounds memory. Default: up to 32 on
                an accelerator; on a CPU, as many as hold about six 224 px images, or 24
                where the process keeps the memory it frees (larger passes pay page
                faults otherwise), see :func:`~simexplain.engine.default_chunk_size`.
            **score_options: the method's, e.g. for ``"sam"`` ``weight_fn`` (another
                criterion, see :mod:`simexplain.methods.criteria`) and ``detach_weights``
                (``False`` also differentiates through ``w``); for the cosine
                family (``"contribution"``, ``"psam"``, ``"gradcam_cosine"``)
                ``coefficients``.
        """
        result = self.engine.attribute(
            inputs,
            self.score(target, **score_options),
            additional_forward_args,
            relu=relu_attributions,
            create_graph=create_graph,
            chunk_size=chunk_size,
        )
        self.layer = self.engine.model.get_submodule(result.layer)
        return result

    def score(self, target: Any = None, **score_options: Any) -> SimilarityScore:
        """The method's per-image score for ``target`` and its options."""
        return self.method.checked_score(target, **score_options)
