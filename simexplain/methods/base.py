"""What every explanation method shares, and the registry of methods by name."""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Optional, Sequence

from torch import Tensor, nn

from ..engine.engine import SimilarityEngine
from ..engine.inputs import check_tuple_inputs
from ..engine.score import SimilarityScore
from ..engine.target_layer import LayerSpec
from ..errors import InputError

__all__ = ["METHODS", "SimilarityMethod", "register_method", "get_method", "score_methods"]

#: Registered methods, name -> class.
METHODS: dict[str, type["SimilarityMethod"]] = {}

#: The engine's options every method passes on (see :class:`~simexplain.engine.SimilarityEngine`).
ENGINE_OPTIONS = (
    "layout", "num_prefix_tokens", "reshape_transform", "eval_mode", "per_image_gradients",
    "output",
)


def named_parameters(function: Callable) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(function).parameters.items() if p.kind in kinds]


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


def score_methods(standalone: bool = False) -> list[str]:
    """The registered methods that are GradCAM of a per-image score; with ``standalone``,
    only those that need nothing but the model and layer (e.g. not a trained head).

    >>> "contribution" in score_methods(standalone=True), "psam" in score_methods(True)
    (True, False)
    """
    return sorted(
        name for name, cls in METHODS.items()
        if cls.has_score() and not (standalone and required_options(cls))
    )


def required_options(cls: type["SimilarityMethod"]) -> list[str]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [p.name for p in parameters if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY) and p.name != "model"]


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


class SimilarityMethod:
    """Base class: one explanation method for tuples of images under an embedding model.

    Args:
        model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``.
        layer: the spatial layer explained: ``None`` (found automatically), a dotted
            module name, or the module.
        **layer_options: ``layout``, ``num_prefix_tokens``, ``reshape_transform`` or
            ``output`` (how to pick the embedding from the model's output), as for
            :class:`~simexplain.engine.SimilarityEngine`.

    Subclasses set ``name`` and implement :meth:`explain`; a GradCAM-style method does so
    in one line, handing :meth:`gradcam` its :class:`~simexplain.engine.SimilarityScore`.
    Calling a method, ``method(model, tuples, **kw)``, explains ``tuples`` under ``model``
    (the same method rebuilt for that model when it is another one), which makes it an
    ``explain_fn`` for :func:`simexplain.metrics.randomization_sanity`.
    """

    name: ClassVar[str] = ""
    #: The tuple sizes the method explains.
    tuple_sizes: ClassVar[tuple[int, ...]] = (2, 3, 4)
    #: Whether the maps stay the same when the embedding space is rotated (an orthogonal
    #: map of the embedding changes no distance); checked by the property tests.
    rotation_invariant: ClassVar[bool] = False
    #: Whether the method perturbs the images instead of reading a layer's gradient: it
    #: then takes any callable model and no layer (:mod:`simexplain.methods.blackbox`).
    blackbox: ClassVar[bool] = False
    #: The options the constructor passes on to the base class through ``**options``:
    #: the engine's for a gradient method.
    base_options: ClassVar[tuple[str, ...]] = ENGINE_OPTIONS

    def __init__(self, model: nn.Module, layer: LayerSpec = None, **layer_options: Any) -> None:
        self.engine = SimilarityEngine(model, layer, **layer_options)
        self.model = model
        self.layer_options = layer_options

    def explain(self, tuples: TensorTuple, **kwargs: Any) -> Tensor:
        """Raw maps ``(B, T, h, w)``, one per image of each tuple, at layer resolution."""
        raise NotImplementedError

    def score(self, target: Any = None, **options: Any) -> SimilarityScore:
        """The per-image score a GradCAM-style method explains, for pairs' ``target``
        (same-class flags) and the method's options; what
        :class:`~simexplain.EmbeddingAttribution` runs for this method."""
        raise InputError(
            f"method {self.name!r} is not GradCAM of a per-image score, so it has no score "
            f"for EmbeddingAttribution; use one of {sorted(score_methods())}, or "
            f"get_method({self.name!r})(model).explain(tuples)"
        )

    @classmethod
    def has_score(cls) -> bool:
        """Whether the method is GradCAM of a per-image score (see :meth:`score`)."""
        return cls.score is not SimilarityMethod.score

    @classmethod
    def build(cls, model: nn.Module, layer: LayerSpec = None, **options: Any) -> "SimilarityMethod":
        """The method for ``model``, with a clear error for options it does not take."""
        named = set(named_parameters(cls.__init__)) - {"self", "model", "layer"}
        check_method_options(cls.name, "options", named | set(cls.base_options), options)
        missing = [n for n in required_options(cls) if n not in options and n != "layer"]
        if missing:
            raise InputError(
                f"method {cls.name!r} needs {', '.join(f'{n}=' for n in missing)}; pass it "
                f"with the method's other options (methods that need nothing more: "
                f"{score_methods(standalone=True)})"
            )
        return cls(model, layer=layer, **options)

    def checked_score(self, target: Any = None, **options: Any) -> SimilarityScore:
        """:meth:`score`, with a clear error for options it does not take."""
        check_method_options(self.name, "score options", named_parameters(self.score)[1:], options)
        return self.score(target, **options)

    def gradcam(
        self,
        tuples: TensorTuple,
        score: SimilarityScore,
        relu: bool = True,
        chunk_size: Optional[int] = None,
        **options: Any,
    ) -> Tensor:
        """GradCAM maps ``(B, T, h, w)`` of ``score`` for ``tuples``, through the engine
        (``options``: those of :meth:`~simexplain.engine.SimilarityEngine.attribute`)."""
        self.check_sizes(tuples)
        result = self.engine.attribute(tuples, score, relu=relu, chunk_size=chunk_size, **options)
        return result.maps

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
        return {"layer": self._by_name(self.engine.layer_spec), **self.layer_options}

    def _by_name(self, spec: Any) -> Any:
        """A module of this method's model as its dotted name, so a copy of the model finds
        its own module; anything else unchanged."""
        if isinstance(spec, nn.Module):
            for name, module in self.model.named_modules():
                if module is spec:
                    return name
        return spec

    def check_sizes(self, tuples: TensorTuple) -> None:
        """Raise :class:`~simexplain.errors.InputError` unless ``tuples`` has a size this
        method explains (the engine checks the rest)."""
        if isinstance(tuples, (tuple, list)) and len(tuples) not in self.tuple_sizes:
            sizes = [str(s) for s in self.tuple_sizes]
            text = sizes[0] if len(sizes) == 1 else ", ".join(sizes[:-1]) + " or " + sizes[-1]
            raise InputError(
                f"method {self.name!r} explains tuples of {text} images; "
                f"got {len(tuples)} image batches"
            )

    def checked_tuples(self, tuples: TensorTuple) -> list[Tensor]:
        """``tuples`` as checked image batches, for methods that do not use
        :meth:`gradcam`."""
        self.check_sizes(tuples)
        return check_tuple_inputs(tuples)


def check_method_options(name: str, what: str, accepted: Any, given: dict) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InputError(
            f"method {name!r} takes the {what} {sorted(accepted) or 'none'}, not {unknown}; "
            "pass another method= for those"
        )
