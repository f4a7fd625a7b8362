"""How to compute one node of a head graph on a span of its positions: the node-by-node
part of :mod:`~simexplain.engine.token_narrowing`.

A node may be computed narrowed when doing so on recorded probe values gives exactly the
narrowed slice of its full result; the candidates are its inputs that carry the
positions (aligned from the right, as broadcasting aligns them), the input axis of an op
that moves axes, and for an attention its queries alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from math import prod
from typing import Any, Optional

import torch
from torch import Tensor, fx

__all__ = ["Span", "how_to_narrow", "mapped_args", "close"]


@dataclass(frozen=True)
class Span:
    """Positions ``[lo, hi)`` of axis ``axis`` (non-negative)."""

    axis: int
    lo: int
    hi: int

    @property
    def length(self) -> int:
        return self.hi - self.lo


def how_to_narrow(head: fx.GraphModule, node: fx.Node, span: Span,
                   values: dict) -> Optional[dict]:
    """The spans of its inputs that ``node`` needs to compute only ``span`` (and its
    arguments rewritten for it), checked on the recorded values; ``None`` if none work."""
    for inputs, args, first_only in _candidates(node, span, values):
        if _commutes(head, node, span, inputs, args, first_only, values):
            return {"inputs": inputs, "args": args, "first_only": first_only}
    return None


def _candidates(node: fx.Node, span: Span, values: dict) -> list[tuple[dict, tuple, bool]]:
    """Ways to compute ``node`` narrowed: the spans of its inputs, its arguments, and
    whether only its first argument is narrowed (the queries of an attention)."""
    out = values[node]
    if node.op == "call_function" and node.target is operator.getitem and \
            isinstance(values.get(node.args[0]), (tuple, list)):
        return [({node.args[0]: span}, node.args, False)]  # an element of a narrowed tuple
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        out = out[0]  # e.g. (attention output, weights)
    elif not isinstance(out, Tensor):
        return []
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    first = node.args[0] if node.args else None
    if isinstance(first, fx.Node) and isinstance(values.get(first), Tensor):
        moved = _moved_axis(name, node, span, values[first], out)
        if moved is not None:
            axis, args = moved
            return [({first: Span(axis, span.lo, span.hi)}, args, False)]
    carriers = [a for a in node.all_input_nodes
                if _aligned_axis(values.get(a), out, span) is not None]
    spans = {a: Span(_aligned_axis(values[a], out, span), span.lo, span.hi) for a in carriers}
    found = [(spans, node.args, False)] if carriers else []
    if first in spans and len(node.args) > 1:
        # an attention: narrowed queries, whole keys and values
        found.append(({first: spans[first]}, node.args, True))
    return found


def _aligned_axis(value: Any, out: Tensor, span: Span) -> Optional[int]:
    """The axis of ``value`` aligned from the right with ``out``'s ``span.axis``, if it
    has the same size there (a tensor carrying the positions)."""
    if not isinstance(value, Tensor):
        return None
    axis = span.axis - (out.dim() - value.dim())
    if axis < 0 or value.shape[axis] != out.shape[span.axis] or value.shape[axis] == 1:
        return None
    return axis


def _moved_axis(name: str, node: fx.Node, span: Span, source: Tensor,
                out: Any) -> Optional[tuple[int, tuple]]:
    """For ops that move axes: the input axis of ``span.axis`` and the arguments that
    compute the narrowed result."""
    if name in ("reshape", "view") and isinstance(out, Tensor):
        before = prod(out.shape[: span.axis])
        axis = next((a for a in range(source.dim()) if prod(source.shape[:a]) == before
                     and source.shape[a] == out.shape[span.axis]), None)
        if axis is None:
            return None
        sizes = _listed(node.args[1:])
        if len(sizes) != out.dim():
            return None
        sizes[span.axis] = span.length
        return axis, (node.args[0], *sizes)
    if name == "permute" and isinstance(out, Tensor):
        return _listed(node.args[1:])[span.axis] % source.dim(), node.args
    if name == "transpose" and isinstance(out, Tensor) and len(node.args) == 3:
        d0, d1 = (int(d) % source.dim() for d in node.args[1:])
        swap = {d0: d1, d1: d0}
        return swap.get(span.axis, span.axis), node.args
    if name == "unbind" and isinstance(out, (tuple, list)):
        dim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        dim %= source.dim()
        return (span.axis if span.axis < dim else span.axis + 1), node.args
    return None


def _listed(args: tuple) -> list:
    """``x.reshape(a, b)`` and ``x.reshape((a, b))``'s sizes alike (permute's dims too)."""
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)


def _commutes(head: fx.GraphModule, node: fx.Node, span: Span, inputs: dict, args: tuple,
              first_only: bool, values: dict) -> bool:
    def narrowed(arg: fx.Node) -> Any:
        value, part = values[arg], inputs.get(arg)
        if part is None:
            return value
        if isinstance(value, (tuple, list)):
            return tuple(v.narrow(part.axis, part.lo, part.length) if isinstance(v, Tensor)
                         else v for v in value)
        return value.narrow(part.axis, part.lo, part.length)

    new_args, new_kwargs = mapped_args(args, node.kwargs, first_only, narrowed,
                                       lambda a: values[a])
    with torch.no_grad():
        result = _call(head, node, new_args, new_kwargs)
    expected = values[node]
    if node.op == "call_function" and node.target is operator.getitem and \
            isinstance(values.get(node.args[0]), (tuple, list)):
        return close(result, expected.narrow(span.axis, span.lo, span.length))
    if isinstance(expected, (tuple, list)):
        return len(result) == len(expected) and all(
            close(r, e.narrow(span.axis, span.lo, span.length)) if isinstance(e, Tensor)
            else r is None and e is None
            for r, e in zip(result, expected))
    return close(result, expected.narrow(span.axis, span.lo, span.length))


def mapped_args(args: tuple, kwargs: dict, first_only: bool, narrowed: Any,
            whole: Any) -> tuple[Any, Any]:
    """``args`` and ``kwargs`` with their nodes replaced: the first argument by
    ``narrowed`` and the rest by ``whole`` when ``first_only``, all by ``narrowed``
    otherwise."""
    if not first_only:
        return fx.node.map_arg(args, narrowed), fx.node.map_arg(kwargs, narrowed)
    return ((narrowed(args[0]), *fx.node.map_arg(args[1:], whole)),
            fx.node.map_arg(kwargs, whole))


def _call(head: fx.GraphModule, node: fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_module":
        return head.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def close(a: Any, b: Any) -> bool:
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    scale = float(b.detach().abs().max()) or 1.0
    return bool(((a.float() - b.float()).abs().max() <= 1e-4 * scale).item())
