"""Running a head only on the tokens that reach the embedding.

A class-token transformer's embedding is read from one token of its last block: the
patch tokens' outputs of that block are computed and thrown away, and so is most of the
backward through them. :func:`narrow_head` rewrites a head graph
(:mod:`~simexplain.engine.head_split`) so that every node computes only the positions
its users read, along the axis those positions live on (the tokens).

One general pass, no per-family code:

* **Demand.** Walking the graph from the output back, each node gets the span of
  positions ``[lo, hi)`` on one axis that its users read, or *all* of it. A select such
  as ``x[:, 0]`` (class-token pooling) reads ``[0, 1)`` of axis 1; reshapes, permutes,
  transposes and ``unbind`` move the axis; anything else passes the span on to those of
  its inputs that carry the axis (aligned from the right, as broadcasting aligns them).
* **Check, node by node.** A node is computed narrowed only if doing so on recorded
  probe values gives the narrowed slice of its full result: per-token modules, norms,
  residual adds pass; an attention passes with its queries narrowed and its keys and
  values whole; anything mixing positions (a mean over tokens) fails and is computed
  whole, its users slicing what they read.
* **Check, whole.** The narrowed head must give the original head's embeddings and
  layer gradient on random inputs, else it is not used.

For ViT-S/16 at the last block's ``norm1`` this leaves, of the block, the key and value
projections of all tokens and everything else for the class token alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from math import prod
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, fx

__all__ = ["narrow_head"]


@dataclass(frozen=True)
class _Span:
    """Positions ``[lo, hi)`` of axis ``axis`` (non-negative)."""

    axis: int
    lo: int
    hi: int

    @property
    def length(self) -> int:
        return self.hi - self.lo


def narrow_head(
    head: fx.GraphModule, inputs: Sequence[Tensor], activation_index: int
) -> Optional[fx.GraphModule]:
    """``head`` computing only the positions its output reads, or ``None`` when that
    saves nothing or cannot be checked.

    Args:
        head: a head graph (``*crossing -> output``).
        inputs: example crossing values ``(N, ...)``, N >= 2 (only their shapes and
            dtypes matter: the checks run on random values of the same kind).
        activation_index: which input is the explained layer's output (its gradient
            must be unchanged).
    """
    generator = torch.Generator().manual_seed(0)
    probes = tuple(_random_like(value, generator) for value in inputs)
    try:
        with torch.no_grad():
            values = _record(head, probes)
        plan = _plan(head, values)
        if plan is None:
            return None
        narrowed = fx.GraphModule(head, _rewrite(head.graph, plan, values), "NarrowedHead")
        with torch.enable_grad():
            same = _same(head, narrowed, probes, activation_index)
        return narrowed if same else None
    except Exception:  # a graph this pass does not understand is left as it was
        return None


def _random_like(value: Tensor, generator: torch.Generator) -> Tensor:
    noise = torch.randn(value.shape, generator=generator).to(value)
    return value + noise * (value.float().std().nan_to_num(1.0).clamp_min(1e-3)).to(value)


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        self.values[node] = result = super().run_node(node)
        return result


def _record(head: fx.GraphModule, inputs: Sequence[Tensor]) -> dict[fx.Node, Any]:
    recorder = _Recorder(head)
    recorder.run(*inputs)
    return recorder.values


# ---------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    demand: dict[fx.Node, _Span]        # nodes whose users read only a span of them
    narrowed: dict[fx.Node, dict]       # nodes computed narrowed: input -> span, + "args"
    selects: dict[fx.Node, _Span]       # select nodes: the span of their input they read


def _plan(head: fx.GraphModule, values: dict[fx.Node, Any]) -> Optional[_Plan]:
    nodes = list(head.graph.nodes)
    plan = _Plan({}, {}, {})
    for node in reversed(nodes):
        if node.op in ("output", "placeholder", "get_attr") or not node.users:
            continue
        span = _users_demand(node, plan, values)
        if span is None:
            continue
        plan.demand[node] = span
        how = _how_to_narrow(head, node, span, values)
        if how is not None:
            plan.narrowed[node] = how
    # worth it only if some node computes at most half of the positions of its axis
    worth = any(
        isinstance(values[n], Tensor) and
        plan.demand[n].length * 2 <= values[n].shape[plan.demand[n].axis]
        for n in plan.narrowed
    )
    return plan if worth else None


def _users_demand(node: fx.Node, plan: _Plan, values: dict) -> Optional[_Span]:
    spans = []
    for user in node.users:
        if not user.users and user.op != "output":
            continue  # dead
        span = _read_by(user, node, plan, values)
        if span is None:
            return None
        spans.append(span)
    if not spans or any(s.axis != spans[0].axis for s in spans):
        return None
    return _Span(spans[0].axis, min(s.lo for s in spans), max(s.hi for s in spans))


def _read_by(user: fx.Node, node: fx.Node, plan: _Plan, values: dict) -> Optional[_Span]:
    """The span of ``node`` that ``user`` reads (``None``: all of it)."""
    selected = _selected_span(user, node, values)
    if selected is not None:
        if user not in plan.demand:
            plan.selects[user] = selected
            return selected
        return None
    how = plan.narrowed.get(user)
    if how is None or node not in how["inputs"]:
        return None
    if how["first_only"] and (node in user.args[1:] or node in user.kwargs.values()):
        return None  # also read whole, in another argument
    return how["inputs"][node]


def _selected_span(user: fx.Node, node: fx.Node, values: dict) -> Optional[_Span]:
    """The span read by ``user = node[index]`` when ``index`` keeps the batch axis and
    picks one position or a slice of one other axis (class-token pooling)."""
    if not (user.op == "call_function" and user.target is operator.getitem
            and user.args[0] is node and isinstance(values.get(node), Tensor)):
        return None
    index = user.args[1]
    if not isinstance(index, tuple) or not index or index[0] != slice(None):
        return None
    picked = [(axis, entry) for axis, entry in enumerate(index) if entry != slice(None)]
    if len(picked) != 1:
        return None
    axis, entry = picked[0]
    size = values[node].shape[axis]
    if isinstance(entry, int):
        lo = entry % size
        return _Span(axis, lo, lo + 1)
    if isinstance(entry, slice) and entry.step in (None, 1):
        lo, hi, _ = entry.indices(size)
        return _Span(axis, lo, hi) if hi > lo else None
    return None


def _how_to_narrow(head: fx.GraphModule, node: fx.Node, span: _Span,
                   values: dict) -> Optional[dict]:
    """The spans of its inputs that ``node`` needs to compute only ``span`` (and its
    arguments rewritten for it), checked on the recorded values; ``None`` if none work."""
    for inputs, args, first_only in _candidates(node, span, values):
        if _commutes(head, node, span, inputs, args, first_only, values):
            return {"inputs": inputs, "args": args, "first_only": first_only}
    return None


def _candidates(node: fx.Node, span: _Span, values: dict) -> list[tuple[dict, tuple, bool]]:
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
            return [({first: _Span(axis, span.lo, span.hi)}, args, False)]
    carriers = [a for a in node.all_input_nodes
                if _aligned_axis(values.get(a), out, span) is not None]
    spans = {a: _Span(_aligned_axis(values[a], out, span), span.lo, span.hi) for a in carriers}
    found = [(spans, node.args, False)] if carriers else []
    if first in spans and len(node.args) > 1:
        # an attention: narrowed queries, whole keys and values
        found.append(({first: spans[first]}, node.args, True))
    return found


def _aligned_axis(value: Any, out: Tensor, span: _Span) -> Optional[int]:
    """The axis of ``value`` aligned from the right with ``out``'s ``span.axis``, if it
    has the same size there (a tensor carrying the positions)."""
    if not isinstance(value, Tensor):
        return None
    axis = span.axis - (out.dim() - value.dim())
    if axis < 0 or value.shape[axis] != out.shape[span.axis] or value.shape[axis] == 1:
        return None
    return axis


def _moved_axis(name: str, node: fx.Node, span: _Span, source: Tensor,
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


def _commutes(head: fx.GraphModule, node: fx.Node, span: _Span, inputs: dict, args: tuple,
              first_only: bool, values: dict) -> bool:
    def narrowed(arg: fx.Node) -> Any:
        value, part = values[arg], inputs.get(arg)
        if part is None:
            return value
        if isinstance(value, (tuple, list)):
            return tuple(v.narrow(part.axis, part.lo, part.length) if isinstance(v, Tensor)
                         else v for v in value)
        return value.narrow(part.axis, part.lo, part.length)

    new_args, new_kwargs = _mapped(args, node.kwargs, first_only, narrowed, lambda a: values[a])
    with torch.no_grad():
        result = _call(head, node, new_args, new_kwargs)
    expected = values[node]
    if node.op == "call_function" and node.target is operator.getitem and \
            isinstance(values.get(node.args[0]), (tuple, list)):
        return _close(result, expected.narrow(span.axis, span.lo, span.length))
    if isinstance(expected, (tuple, list)):
        return len(result) == len(expected) and all(
            _close(r, e.narrow(span.axis, span.lo, span.length)) if isinstance(e, Tensor)
            else r is None and e is None
            for r, e in zip(result, expected))
    return _close(result, expected.narrow(span.axis, span.lo, span.length))


def _mapped(args: tuple, kwargs: dict, first_only: bool, narrowed: Any,
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


def _close(a: Any, b: Any) -> bool:
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    scale = float(b.detach().abs().max()) or 1.0
    return bool(((a.float() - b.float()).abs().max() <= 1e-4 * scale).item())


# ---------------------------------------------------------------------- the rewrite


def _rewrite(graph: fx.Graph, plan: _Plan, values: dict) -> fx.Graph:
    new = fx.Graph()
    whole: dict[fx.Node, fx.Node] = {}
    parts: dict[fx.Node, tuple[fx.Node, _Span]] = {}

    def part_of(node: fx.Node, span: _Span) -> fx.Node:
        if node in parts:
            built, held = parts[node]
            if held == span:
                return built
            return new.call_method("narrow", (built, span.axis, span.lo - held.lo, span.length))
        return new.call_method("narrow", (whole[node], span.axis, span.lo, span.length))

    for node in graph.nodes:
        if not node.users and node.op not in ("output", "placeholder"):
            continue  # dead, e.g. the attention weights nobody reads
        if node in plan.narrowed and any(
                isinstance(values[arg], (tuple, list)) and arg not in parts
                for arg in plan.narrowed[node]["inputs"]):
            # an element of a tuple computed whole (e.g. the queries of an unbind whose
            # keys and values are read whole): take it whole, then its span
            whole[node] = new.node_copy(node, lambda arg: whole[arg])
            span = plan.demand[node]
            parts[node] = (new.call_method("narrow", (whole[node], span.axis, span.lo,
                                                      span.length)), span)
        elif node in plan.narrowed:
            how = plan.narrowed[node]
            inputs = how["inputs"]

            def mapped(arg: fx.Node, inputs: dict = inputs) -> fx.Node:
                return part_of(arg, inputs[arg]) if arg in inputs else whole[arg]

            args, kwargs = _mapped(how["args"], node.kwargs, how["first_only"], mapped,
                                   lambda arg: whole[arg])
            built = new.create_node(node.op, node.target, args, kwargs, name=node.name)
            parts[node] = (built, plan.demand[node])
        elif node in plan.selects and node.args[0] in parts:
            source, held = parts[node.args[0]]
            index = list(node.args[1])
            entry = index[held.axis]
            index[held.axis] = entry - held.lo if isinstance(entry, int) else \
                slice(entry.indices(values[node.args[0]].shape[held.axis])[0] - held.lo,
                      entry.indices(values[node.args[0]].shape[held.axis])[1] - held.lo)
            whole[node] = new.call_function(operator.getitem, (source, tuple(index)))
        else:
            whole[node] = new.node_copy(node, lambda arg: whole[arg])
    return new


def _same(head: fx.GraphModule, narrowed: fx.GraphModule, inputs: Sequence[Tensor],
          activation_index: int) -> bool:
    """Whether ``narrowed`` gives ``head``'s outputs and layer gradient, on the whole
    batch and on one image."""
    for batch in (inputs, tuple(value[:1] for value in inputs)):
        results = []
        for module in (head, narrowed):
            leaf = batch[activation_index].detach().clone().requires_grad_()
            given = [value.clone() for value in batch]
            given[activation_index] = leaf.clone()
            tensors = [t for t in _tensors(module(*given)) if t.is_floating_point()]
            if not tensors or not tensors[0].requires_grad:
                return False
            weights = torch.Generator().manual_seed(1)
            total = sum((t.float() * torch.randn(t.shape, generator=weights)).sum()
                        for t in tensors)
            gradient, = torch.autograd.grad(total, leaf)
            results.append((tensors, gradient))
        (a, grad_a), (b, grad_b) = results
        if len(a) != len(b) or not all(_close(x, y) for x, y in zip(b, a)) or \
                not _close(grad_b, grad_a):
            return False
    return True


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []
