"""Any registered method, built from one set of options and run on tuples of images.

The applications take a method by name and its options as keywords. This module sends
each option where the method takes it: to its construction (``head=``, ``reference=``,
the engine's ``layout=``, ...) or to its run (a score's ``weight_fn=``,
``coefficients=``, ``selection=``; a decomposition's ``point=``), with the methods' own
checks, and runs the method into a :class:`~simexplain.engine.TupleResult` whatever its
kind:

* a GradCAM-style method (:meth:`~simexplain.methods.SimilarityMethod.has_score`) through
  the engine with its per-image score;
* a decomposition (``stylianou``, ``point_specific``: no score, no gradient) through its
  own ``explain``; each image's score is then its map's sum, its share of the tuple's
  criterion, and different-class pairs change sign, explaining their dissimilarity as
  the cosine methods do;
* a black-box method (``sbsm``, ``rise``: any callable model, no layer) through its own
  ``run``, with the cosine methods' criterion as each image's score.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.chunking import chunk_size_for
from ..engine.engine import TupleResult
from ..engine.maps import full_precision
from ..engine.target_layer import LayerSpec
from ..engine.tuples import check_target, tuple_kind
from ..errors import InputError
from ..methods.base import (
    SimilarityMethod,
    check_method_options,
    named_parameters,
    required_options,
    get_method,
)

__all__ = ["option_names", "required_inputs", "check_inputs_given", "build_method", "run_method"]

#: What the applications give a method themselves rather than through its options.
_APPLICATION_ARGUMENTS = frozenset({"same_class", "relu", "relu_attributions", "chunk_size"})


def option_names(cls: type[SimilarityMethod]) -> tuple[frozenset[str], frozenset[str]]:
    """The options ``cls`` takes when built (its constructor's and the engine's) and when it
    runs (its score's for a GradCAM-style method, else its ``explain``'s).

    >>> from simexplain.methods import get_method
    >>> sorted(option_names(get_method("point_specific"))[1])
    ['coefficients', 'point']
    """
    built = set(named_parameters(cls.__init__)) - {"self", "model", "layer"}
    run = cls.score if cls.has_score() else cls.explain
    # (self, target) of a score, (self, tuples) of an explain
    at_run = set(named_parameters(run)[2:]) - _APPLICATION_ARGUMENTS
    return frozenset(built | set(cls.base_options)), frozenset(at_run)


def required_inputs(cls: type[SimilarityMethod]) -> dict[str, str]:
    """The options ``cls`` cannot be built without, each with what it is (from the
    ``Args:`` of the class's docstring).

    >>> from simexplain.methods import get_method
    >>> required_inputs(get_method("bce_gradcam"))["head"]
    'a trained simexplain.methods.PairClassifierHead (see simexplain.methods.train_pair_head)'
    """
    return {name: _option_help(cls, name) for name in required_options(cls) if name != "layer"}


def check_inputs_given(name: str, given: Any, then: str) -> None:
    """Raise :class:`~simexplain.errors.InputError` when method ``name`` needs an option
    not in ``given``: the message says what the option is, then ``then`` (what to do)."""
    cls = get_method(name)
    missing = {n: text for n, text in required_inputs(cls).items() if n not in given}
    if missing:
        needs = "; ".join(f"{n}=" + (f", {text}" if text else "") for n, text in missing.items())
        raise InputError(f"method {cls.name!r} needs {needs}; {then}")


def build_method(
    name: str, model: nn.Module, layer: LayerSpec = None, /, **options: Any
) -> tuple[SimilarityMethod, dict[str, Any]]:
    """The method ``name`` built for ``model`` with the options it takes when built, and
    the rest of ``options``, those it takes when it runs (for :func:`run_method`).

    An option the method does not take, or a required one missing, raises
    :class:`~simexplain.errors.InputError` naming what the method takes or needs.
    """
    cls = get_method(name)
    at_build, at_run = option_names(cls)
    check_method_options(cls.name, "options", at_build | at_run, options)
    check_inputs_given(name, options, f"pass it with method={cls.name!r}")
    # checked as SimilarityMethod.build checks, and built with layer= by name: a required
    # option may come before it in the constructor (BCEGradCAM(model, head, layer))
    built = cls(model, layer=layer, **{k: v for k, v in options.items() if k in at_build})
    return built, {k: v for k, v in options.items() if k not in at_build}


def run_method(
    method: SimilarityMethod,
    slots: Sequence[Tensor],
    target: Any = None,
    *,
    relu: Optional[bool] = None,
    chunk_size: Optional[int] = None,
    forward_args: Any = None,
    **options: Any,
) -> TupleResult:
    """``method`` on the tuples ``slots`` (2, 3 or 4 image batches ``(B, C, H, W)``).

    Args:
        method: a built method (see :func:`build_method`).
        slots: the tuples' image batches, one per role.
        target: pairs only: whether each pair is same-class (a bool per pair, or one for
            all); ``None`` for triplets, quadruplets and pairs explained as similar.
        relu: keep only positive evidence. ``None``: the method's own choice, ReLU for
            GradCAM-style methods, signed maps for decompositions (so that each map sums
            to its image's share of the criterion; the scores are that sum either way).
        chunk_size: tuples per forward pass of a GradCAM-style method (checked, then
            unused, for a decomposition, which takes no gradient and runs at once).
        forward_args: extra arguments for the model's forward, as for
            :meth:`~simexplain.engine.SimilarityEngine.attribute` (GradCAM-style methods
            only).
        **options: the method's run options (its score's, or its ``explain``'s).
    """
    method.check_sizes(slots)
    if method.blackbox:
        return _black_box(method, slots, target, relu, chunk_size, forward_args, options)
    if method.has_score():
        score = method.checked_score(target, **options)
        result = method.engine.attribute(
            slots, score, forward_args, relu=relu is not False, chunk_size=chunk_size
        )
        if result.kind == "pair" and target is not None:  # a score that does not tell
            same = check_target(target, 2, result.maps.shape[0])
            result.kind = tuple_kind(2, same, False)
        return result
    if forward_args is not None:
        raise InputError(
            f"method {method.name!r} is a decomposition; it runs the model on the images "
            "alone, without extra forward arguments"
        )
    check_method_options(method.name, "options", option_names(type(method))[1], options)
    return _decomposition(method, method.checked_tuples(slots), target, relu, chunk_size,
                          options)


def _black_box(
    method: SimilarityMethod,
    slots: Sequence[Tensor],
    target: Any,
    relu: Optional[bool],
    chunk_size: Optional[int],
    forward_args: Any,
    options: dict[str, Any],
) -> TupleResult:
    if forward_args is not None:
        raise InputError(
            f"method {method.name!r} is a black-box method; it calls the model on the "
            "images alone, without extra forward arguments"
        )
    if chunk_size is not None:
        raise InputError(
            f"method {method.name!r} is a black-box method: it takes batch_size= (perturbed "
            "images per forward pass) when built, not chunk_size="
        )
    check_method_options(method.name, "options", option_names(type(method))[1], options)
    return method.run(slots, target, relu=relu, **options)


def _decomposition(
    method: SimilarityMethod,
    slots: list[Tensor],
    target: Any,
    relu: Optional[bool],
    chunk_size: Optional[int],
    options: dict[str, Any],
) -> TupleResult:
    chunk_size_for(slots, chunk_size)
    maps = method.explain(slots, **options).detach()
    with torch.no_grad():
        embeddings = method.engine.embed(torch.cat(slots)).detach()
    layer = method.engine.feature_layer(slots[0][:2]).name
    return decomposition_result(maps, embeddings, target, relu, layer)


def decomposition_result(
    maps: Tensor, embeddings: Tensor, target: Any, relu: Optional[bool], layer: str
) -> TupleResult:
    """A decomposition's signed maps ``(B, T, h, w)`` and the tuples' embeddings ``(T * B,
    d)`` (slot-major) as a result: each image's score is its map's sum, and a
    different-class pair (``target`` False) explains its dissimilarity, -criterion."""
    batch, count = maps.shape[:2]
    same = None if target is None else check_target(target, count, batch)
    if same is not None:
        maps = maps * torch.where(same, 1.0, -1.0).to(maps)[:, None, None, None]
    unit = F.normalize(full_precision(embeddings), dim=-1).reshape(count, batch, -1)
    return TupleResult(
        maps=torch.relu(maps) if relu else maps,
        scores=maps.sum(dim=(-2, -1)),
        weights=None,
        embeddings=unit.transpose(0, 1),
        kind=tuple_kind(count, same, False),
        layer=layer,
    )


_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def _option_help(cls: type, option: str) -> str:
    """What ``option`` is, from the ``Args:`` section of ``cls``'s docstring ("" if absent),
    with Sphinx roles written as the public names they point to."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    for k, line in enumerate(lines):
        if not line.lstrip().startswith(f"{option}:"):
            continue
        indent = len(line) - len(line.lstrip())
        text = [line.strip()[len(option) + 1 :]]
        for more in lines[k + 1 :]:
            if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                break
            text.append(more.strip())
        package = sys.modules.get(cls.__module__.rpartition(".")[0])

        def public(match: re.Match) -> str:
            target = match.group(1)
            if "." not in target and package is not None and hasattr(package, target):
                return f"{package.__name__}.{target}"
            return target

        return _ROLE.sub(public, " ".join(text)).replace("``", "").strip().rstrip(".")
    return ""
