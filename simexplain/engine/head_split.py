"""Splitting a model at the explained layer: the trunk before it and the head after it.

A gallery's images have been through the model once to be indexed; explaining a match
should not run them again. :func:`split_at_layer` traces the model with ``torch.fx``
(the target layer, and the modules timm marks as not traceable, kept as calls) and cuts
the graph at the layer: the *head* is every node that depends on the layer's output,
plus what it uses that depends on no input (parameters, constants); every other value the
head reads crosses the cut. For a CNN stage that is the stage's output alone; for a
transformer block's ``norm1`` it is the norm's output and the residual stream entering
the block. Storing the crossing values of an image and running the head on them gives
its embedding and, by autograd through the head, the layer gradient: a map without the
trunk. The *prefix*, the part of the graph that computes the crossing values and nothing
more, lets the engine explain fresh images through a narrowed head
(:mod:`~simexplain.engine.token_narrowing`) and, on a CPU, with oneDNN's linear kernels
in place of the model's linear layers (:mod:`~simexplain.engine._fused_kernels`).

The split is one general mechanism, not per-family code, and it is checked numerically
on a probe batch. A model that cannot be traced, or whose cut is crossed by something
that is not a per-image tensor (e.g. a size read from the input), gets a
:class:`SplitFallback` saying why; callers then recompute with the full model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, fx, nn

from ._fused_kernels import FusedGraph, fuse_linear_activations
from ._tracing import trace, traced
from .embeddings import embedding_matrix as read_embeddings, finite_embeddings
from .layouts import FeatureLayer
from .outputs import OutputSpec, select_output
from .token_narrowing import narrow_head

__all__ = ["HeadSplit", "SplitFallback", "split_at_layer", "cached_split", "split_key",
           "layer_leaf", "head_embeddings"]

# Splits per model, per (layer, call, input shape, dtype, device, output, structure); weak,
# so models can be freed.
_SPLITS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass
class HeadSplit:
    """A model cut at its explained layer.

    Attributes:
        trunk: ``images -> (output, crossing)``: the whole model, also returning the
            values that cross the cut, cloned (so in-place ops after the cut do not
            change them), as a tuple of ``(N, ...)`` tensors.
        head: ``*crossing -> output``: the model from the cut on. It calls the model's
            own modules, so it follows their weights, device, dtype and mode.
        names: a name per crossing value (the traced graph's node names).
        activation_index: the position of the layer's output among the crossing values.
        narrowed: whether the head computes only the tokens its output reads
            (:mod:`~simexplain.engine.token_narrowing`).
        prefix: ``images -> crossing``: the model up to the cut and no further (``None``
            when it did not reproduce the trunk's crossing values on the probe).
        fused_prefix: the prefix with oneDNN's linear kernels for its linear layers, the
            activations after them fused in (:mod:`~simexplain.engine._fused_kernels`),
            for float32 CPU images without a graph; ``None`` when it has no linear layer,
            the probe was not float32 on a CPU, or it did not reproduce the crossing
            values on the probe.
        inlined: the model's modules whose code the prefix and the head run inline
            rather than as module calls (the model itself among them): a forward hook on
            one of them would not fire on that path.
    """

    trunk: fx.GraphModule
    head: fx.GraphModule
    names: tuple[str, ...]
    activation_index: int
    narrowed: bool = False
    prefix: Optional[fx.GraphModule] = None
    fused_prefix: Optional[FusedGraph] = None
    inlined: tuple[nn.Module, ...] = ()

    def __repr__(self) -> str:
        return (f"HeadSplit(crossing={self.names}, activation_index={self.activation_index}"
                f"{', narrowed' if self.narrowed else ''}"
                f"{', fused' if self.fused_prefix is not None else ''})")


@dataclass
class SplitFallback:
    """Why a model could not be split at its layer (the maps are then recomputed)."""

    reason: str

    def __bool__(self) -> bool:
        return False


def split_at_layer(
    model: nn.Module, layer: FeatureLayer, probe: Tensor, output: OutputSpec = None
) -> Union[HeadSplit, SplitFallback]:
    """Cut ``model`` at ``layer``'s output, checked on ``probe`` images ``(N, C, H, W)``.

    The model is traced in eval mode (the only mode in which stored activations are
    explained) and left as it was. Returns a :class:`HeadSplit` whose head reproduces the
    model's output from the probe's crossing values, or a :class:`SplitFallback`.
    ``output`` picks the embedding from the model's output, as the engine's ``output=``.

    Example:
        >>> import torchvision
        >>> from simexplain.engine import resolve_layer
        >>> model = torchvision.models.resnet18(num_classes=8).eval()
        >>> images = torch.randn(2, 3, 64, 64)
        >>> split = split_at_layer(model, resolve_layer(model, "layer4", images), images)
        >>> split.names
        ('layer4',)
        >>> output, crossing = split.trunk(images)
        >>> torch.allclose(split.head(*crossing), output)
        True
    """
    from .state import preserved_state

    with preserved_state(model, eval_mode=True), torch.no_grad():
        try:
            graph, path = trace(model, layer.module)
        except Exception as error:  # fx raises many kinds for untraceable code
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return SplitFallback(
                f"torch.fx cannot trace the model ({type(error).__name__}: {first_line[:160]})"
            )
        cut = _cut(graph, path, layer.call_index)
        if isinstance(cut, SplitFallback):
            return cut
        trunk, head, prefix, names, index = _build(model, graph, *cut)
        checked = _checked(HeadSplit(trunk, head, names, index), model, probe, output)
        if not isinstance(checked, tuple):
            return checked
        split, crossing = checked
        prefix = prefix if _same_crossing(prefix, probe, crossing) else None
        narrowed = narrow_head(split.head, crossing, split.activation_index)
        head = head if narrowed is None else narrowed
        return HeadSplit(trunk, head, names, index, narrowed=narrowed is not None,
                         prefix=prefix, fused_prefix=_fused(prefix, probe, crossing),
                         inlined=_inlined(model, prefix, head))


def cached_split(
    model: nn.Module, layer: FeatureLayer, sample: Tensor, output: OutputSpec = None,
    *, build: bool = True,
) -> Union[HeadSplit, SplitFallback, None]:
    """:func:`split_at_layer` for images like ``sample``, computed once per
    :func:`split_key`; with ``build=False``, ``None`` when it has not been computed."""
    key = split_key(model, layer, sample, output)
    cache = _SPLITS.setdefault(model, {})
    if key not in cache:
        if not build:
            return None
        cache[key] = split_at_layer(model, layer, sample[:2], output)
    return cache[key]


def split_key(
    model: nn.Module, layer: FeatureLayer, sample: Tensor, output: OutputSpec = None
) -> tuple:
    """What a split depends on: the layer, the input shape, dtype and device, ``output``
    and the module structure. Replacing a submodule, a parameter or a buffer gives a new
    key, since a split's graphs hold the modules and tensors they were traced with."""
    return (layer.name, layer.call_index, tuple(sample.shape[1:]), sample.dtype,
            sample.device, id(output) if callable(output) else output, _structure(model))


def _structure(model: nn.Module) -> int:
    return hash((tuple(map(id, model.modules())), tuple(map(id, model.parameters())),
                 tuple(map(id, model.buffers()))))


def layer_leaf(split: HeadSplit, values: list[Tensor]) -> Tensor:
    """The layer's output among ``values`` as a leaf that requires grad; ``values`` then
    holds a clone of it, since the head may write into its inputs."""
    activation = values[split.activation_index].detach().requires_grad_()
    values[split.activation_index] = activation.clone()
    return activation


def head_embeddings(value: Any, count: int, output: OutputSpec = None) -> Tensor:
    """The finite embeddings ``(count, d)`` in what the head (or trunk) returned."""
    return finite_embeddings(select_output(value, output, count), count)


def _cut(
    graph: fx.Graph, path: str, call_index: int
) -> Union[tuple[fx.Node, set[fx.Node], list[fx.Node], set[fx.Node]], SplitFallback]:
    """The layer's node, the head's nodes, the crossing nodes and the free nodes (those
    depending on no input, recomputed in the head)."""
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == path]
    if not calls:
        return SplitFallback(f"the traced graph has no call of layer {path!r} (it runs "
                             "inside a module that fx keeps whole)")
    if not -len(calls) <= call_index < len(calls):
        return SplitFallback(f"layer {path!r} runs {len(calls)} times, not {call_index + 1}")
    layer_node = calls[call_index]
    head: set[fx.Node] = set()
    frontier = list(layer_node.users)
    while frontier:
        node = frontier.pop()
        if node not in head:
            head.add(node)
            frontier.extend(node.users)
    output = next(n for n in nodes if n.op == "output")
    if output not in head:
        return SplitFallback(f"the model's output does not depend on layer {path!r}")
    on_input: set[fx.Node] = set()
    for node in nodes:  # topological order
        if node.op == "placeholder" or any(a in on_input for a in node.all_input_nodes):
            on_input.add(node)
    crossing: list[fx.Node] = [layer_node]
    free: set[fx.Node] = set()
    for node in nodes:
        if node not in head:
            continue
        for source in node.all_input_nodes:
            if source in head or source is layer_node or source in free:
                continue
            if source in on_input:
                if source not in crossing:
                    crossing.append(source)
            else:
                free.update(_ancestors(source))
    return layer_node, head, crossing, free


def _ancestors(node: fx.Node) -> set[fx.Node]:
    found, frontier = set(), [node]
    while frontier:
        each = frontier.pop()
        if each not in found:
            found.add(each)
            frontier.extend(each.all_input_nodes)
    return found


def _build(
    model: nn.Module,
    graph: fx.Graph,
    layer_node: fx.Node,
    head_nodes: set[fx.Node],
    crossing: list[fx.Node],
    free: set[fx.Node],
) -> tuple[fx.GraphModule, fx.GraphModule, fx.GraphModule, tuple[str, ...], int]:
    output = next(n for n in graph.nodes if n.op == "output")
    trunk_graph, env, copies = fx.Graph(), {}, {}
    for node in graph.nodes:
        if node is not output:
            env[node] = trunk_graph.node_copy(node, lambda a: env[a])
        if node in crossing:  # copied before anything after the cut can write into it
            copies[node] = trunk_graph.call_function(_copied, (env[node],))
    clones = tuple(copies[c] for c in crossing)
    result = fx.node.map_arg(output.args[0], lambda a: env[a])
    trunk_graph.output((result, clones))

    head_graph, head_env = fx.Graph(), {}
    for node in crossing:
        head_env[node] = head_graph.placeholder(node.name)
    for node in graph.nodes:
        if (node in head_nodes or node in free) and node not in head_env:
            head_env[node] = head_graph.node_copy(node, lambda a: head_env[a])

    # The prefix: placeholders and what the crossing values need. An input that crosses
    # is cloned, so that a head writing into its inputs cannot change the caller's.
    prefix_graph, prefix_env = fx.Graph(), {}
    needed = set().union(*(_ancestors(node) for node in crossing))
    for node in graph.nodes:
        if node.op == "placeholder" or node in needed:
            prefix_env[node] = prefix_graph.node_copy(node, lambda a: prefix_env[a])
    prefix_graph.output(tuple(
        prefix_graph.call_function(_copied, (prefix_env[node],)) if node.op == "placeholder"
        else prefix_env[node] for node in crossing))
    names = tuple(node.name for node in crossing)
    return (
        fx.GraphModule(model, trunk_graph, "Trunk"),
        fx.GraphModule(model, head_graph, "Head"),
        fx.GraphModule(model, prefix_graph, "Prefix"),
        names,
        crossing.index(layer_node),
    )


def _copied(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _checked(
    split: HeadSplit, model: nn.Module, probe: Tensor, output: OutputSpec
) -> Union[tuple[HeadSplit, tuple[Tensor, ...]], SplitFallback]:
    """The split and the probe's crossing values, if its head reproduces the output on
    ``probe`` (and on part of it: a head that read the batch size from the trunk would
    not), else why not."""
    def embedding_matrix(value: Any, count: int) -> Tensor:
        return read_embeddings(select_output(value, output, count), count)

    if probe.shape[0] < 2:
        probe = torch.cat([probe, probe])
    try:
        whole_output, crossing = split.trunk(probe)
        count = probe.shape[0]
        for name, value in zip(split.names, crossing):
            if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != count:
                what = type(value).__name__ if not isinstance(value, Tensor) else \
                    f"a tensor of shape {tuple(value.shape)}"
                return SplitFallback(
                    f"{name!r} crosses the cut at the layer and is {what}, not one value per "
                    "image"
                )
        expected = embedding_matrix(whole_output, count)
        whole = embedding_matrix(split.head(*crossing), count)
        part = embedding_matrix(split.head(*(c[1:] for c in crossing)), count - 1)
    except Exception as error:
        return SplitFallback(f"the split model fails on a probe batch ({type(error).__name__}: "
                             f"{str(error).strip()[:160]})")
    reference = embedding_matrix(model(probe), count)
    if not (_close(whole, reference) and _close(expected, reference)
            and _close(part, reference[1:])):
        return SplitFallback("the head after the cut does not reproduce the model's "
                             "embeddings on a probe batch")
    return split, tuple(crossing)


def _same_crossing(
    prefix: fx.GraphModule, probe: Tensor, crossing: tuple[Tensor, ...]
) -> bool:
    """Whether ``prefix`` gives the trunk's crossing values on the probe."""
    if probe.shape[0] < 2:
        probe = torch.cat([probe, probe])
    try:
        values = prefix(probe)
    except Exception:
        return False
    return len(values) == len(crossing) and all(
        isinstance(v, Tensor) and v.shape == c.shape and _close(v, c)
        for v, c in zip(values, crossing))


def _fused(
    prefix: Optional[fx.GraphModule], probe: Tensor, crossing: tuple[Tensor, ...]
) -> Optional[FusedGraph]:
    """The prefix with oneDNN's linear kernels, for a float32 CPU probe, if it has linear
    layers and gives the crossing values on the probe."""
    if prefix is None or probe.device.type != "cpu" or probe.dtype != torch.float32:
        return None
    fused = fuse_linear_activations(prefix, traced)
    if fused is None or not fused.usable(probe) or \
            not _same_crossing(fused.module, probe, crossing):
        return None
    return fused


def _inlined(model: nn.Module, *graphs: Optional[fx.GraphModule]) -> tuple[nn.Module, ...]:
    """The modules of ``model`` whose ``forward`` the tracer stepped into for ``graphs``
    (the model itself among them): their code runs inline, not as a module call."""
    paths, called = {""}, set()
    for graph_module in graphs:
        for node in () if graph_module is None else graph_module.graph.nodes:
            paths.update(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
            if node.op == "call_module":
                called.add(node.target)
    modules = dict(model.named_modules())
    return tuple(modules[path] for path in sorted(paths - called) if path in modules)


def _close(a: Tensor, b: Tensor) -> bool:
    scale = float(b.detach().abs().max()) or 1.0
    return bool(((a - b).abs().max() <= 1e-4 * scale).item())

