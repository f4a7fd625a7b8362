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
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, fx

from ._node_narrowing import Span, close, how_to_narrow, mapped_args

__all__ = ["narrow_head"]


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
    demand: dict[fx.Node, Span]        # nodes whose users read only a span of them
    narrowed: dict[fx.Node, dict]       # nodes computed narrowed: input -> span, + "args"
    selects: dict[fx.Node, Span]       # select nodes: the span of their input they read


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
        how = how_to_narrow(head, node, span, values)
        if how is not None:
            plan.narrowed[node] = how
            plan.selects.update(_selects_of(node, plan, values))
    # worth it only if some node computes at most half of the positions of its axis
    worth = any(
        isinstance(values[n], Tensor) and
        plan.demand[n].length * 2 <= values[n].shape[plan.demand[n].axis]
        for n in plan.narrowed
    )
    return plan if worth else None


def _selects_of(node: fx.Node, plan: _Plan, values: dict) -> dict[fx.Node, Span]:
    """The selects of a narrowed ``node`` that are computed whole, by the span they read
    (the rewrite shifts their index into the narrowed part)."""
    found = {}
    for user in node.users:
        selected = _selected_span(user, node, values)
        if selected is not None and user not in plan.demand:
            found[user] = selected
    return found


def _users_demand(node: fx.Node, plan: _Plan, values: dict) -> Optional[Span]:
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
    return Span(spans[0].axis, min(s.lo for s in spans), max(s.hi for s in spans))


def _read_by(user: fx.Node, node: fx.Node, plan: _Plan, values: dict) -> Optional[Span]:
    """The span of ``node`` that ``user`` reads (``None``: all of it)."""
    selected = _selected_span(user, node, values)
    if selected is not None:
        return selected if user not in plan.demand else None
    how = plan.narrowed.get(user)
    if how is None or node not in how["inputs"]:
        return None
    if how["first_only"] and (node in user.args[1:] or node in user.kwargs.values()):
        return None  # also read whole, in another argument
    return how["inputs"][node]


def _selected_span(user: fx.Node, node: fx.Node, values: dict) -> Optional[Span]:
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
        return Span(axis, lo, lo + 1)
    if isinstance(entry, slice) and entry.step in (None, 1):
        lo, hi, _ = entry.indices(size)
        return Span(axis, lo, hi) if hi > lo else None
    return None


# ---------------------------------------------------------------------- the rewrite


def _rewrite(graph: fx.Graph, plan: _Plan, values: dict) -> fx.Graph:
    new = fx.Graph()
    whole: dict[fx.Node, fx.Node] = {}
    parts: dict[fx.Node, tuple[fx.Node, Span]] = {}

    def part_of(node: fx.Node, span: Span) -> fx.Node:
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

            args, kwargs = mapped_args(how["args"], node.kwargs, how["first_only"], mapped,
                                       lambda arg: whole[arg])
            built = new.create_node(node.op, node.target, args, kwargs, name=node.name)
            parts[node] = (built, plan.demand[node])
        elif node in plan.selects and node.args[0] in parts:
            source, held = parts[node.args[0]]
            index = list(node.args[1])
            entry = index[held.axis]
            if isinstance(entry, int):
                index[held.axis] = entry - held.lo
            else:
                lo, hi, _ = entry.indices(values[node.args[0]].shape[held.axis])
                index[held.axis] = slice(lo - held.lo, hi - held.lo)
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
        if len(a) != len(b) or not all(close(x, y) for x, y in zip(b, a)) or \
                not close(grad_b, grad_a):
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
