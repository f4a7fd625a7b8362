"""oneDNN's linear kernel, with the activation after it fused, where no graph is kept.

Most of a transformer's or a ConvNeXt's CPU forward is its linear layers (two thirds of
a ConvNeXt-T or Swin-T forward is ``addmm``, torch profile, 24 images at 224 px, 2
threads), and their activations write each product to memory and read it back (14% of a
ConvNeXt-T forward is its GELU). PyTorch's oneDNN backend ships a linear kernel that took
0.73-0.93x ``addmm``'s time on six of those networks' layer shapes (one-off timing), and
that applies a ReLU, SiLU or GELU to each block of the product while it is still in cache
(``torch.ops.mkldnn._linear_pointwise``, the kernel TorchInductor's CPU backend emits).
Rewriting the traced model up to the explained layer (a
:class:`~simexplain.engine.head_split.HeadSplit`'s prefix) to call it made maps of
ConvNeXt-T, Swin-T and ViT-S/16 cost 0.88-0.95x the model's own forward on a CPU, at 1, 8
and 32 triplets, the maps equal to float32 rounding (``benchmarks/results/bench_explain.md``,
``benchmarks/results/bench_linear_kernels.md``, ``docs/performance.rst``).

Only what is certain to compute the same function is rewritten: a ``torch.nn.Linear``
(that exact class, so a subclass's own ``forward`` is never skipped), and a ReLU, SiLU or
GELU (module or functional) that is its output's one use. The rewritten graph reads the
weights and biases from the model at every call, so it follows training. It runs only on
float32 CPU tensors without a graph or autocast, and not while a hook on a module it no
longer calls (or a global module hook) would have seen that call.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["FusedGraph", "fused_kernels_available", "fuse_linear_activations",
           "global_module_hooks"]

#: Traces a module into a graph module (raising when it cannot).
Tracing = Callable[[nn.Module], fx.GraphModule]


@functools.lru_cache(maxsize=None)
def fused_kernels_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear-with-activation CPU kernel."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return True


@dataclass(frozen=True)
class FusedGraph:
    """A traced graph whose linear layers run as oneDNN kernels.

    Attributes:
        module: the rewritten graph, called as the graph it was made from.
        replaced: the modules whose calls it no longer makes, whole or in part (for the
            hook check).
        linear_layers: how many linear layers it runs as oneDNN kernels.
        activations: how many activations are fused into them.
    """

    module: fx.GraphModule
    replaced: tuple[nn.Module, ...]
    linear_layers: int
    activations: int

    def usable(self, images: Tensor) -> bool:
        """Whether the rewritten graph computes what the original would for ``images``:
        float32 on a CPU, no autocast, and no hook that a call it skips would have fired."""
        return (images.device.type == "cpu" and images.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not global_module_hooks()
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self.replaced))


def fuse_linear_activations(
    graph_module: fx.GraphModule, trace: Optional[Tracing] = None
) -> Optional[FusedGraph]:
    """``graph_module`` with every linear layer computed by oneDNN's kernel, the ReLU,
    SiLU or GELU that is its output's one use fused into it; ``None`` when there is no
    linear layer or no kernel.

    A module the graph calls whole (a traced model's explained layer, say, or a module
    kept as a call) that holds linear layers is traced with ``trace``, if given, fused the
    same way, and called in its place. The original is left as it is; the result shares
    its modules and parameters.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
        >>> fused = fuse_linear_activations(fx.symbolic_trace(mlp))
        >>> fused.linear_layers, fused.activations
        (2, 1)
        >>> x = torch.randn(4, 8)
        >>> with torch.no_grad():
        ...     torch.allclose(fused.module(x), mlp(x), atol=1e-6)
        True
    """
    if not fused_kernels_available():
        return None
    graph = copy.deepcopy(graph_module.graph)
    modules = dict(graph_module.named_modules())
    replaced: list[nn.Module] = []
    inner: dict[str, fx.GraphModule] = {}
    linear_layers = activations = 0
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is None:
            continue
        if type(module) is not nn.Linear:
            fused = _fused_call(node, module, trace)
            if fused is not None:  # its code now runs inline: every module in it counts
                node.target = f"_fused_{len(inner)}"
                inner[node.target] = fused.module
                replaced += module.modules()
                linear_layers += fused.linear_layers
                activations += fused.activations
            continue
        if len(node.args) != 1 or node.kwargs:  # called as ``fc(input=x)``: keep the call
            continue
        user = next(iter(node.users)) if len(node.users) == 1 else None
        found = None if user is None else _activation(user, modules)
        attr, algorithm, activation_module = found or ("none", "", None)
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            kernel = graph.call_function(
                torch.ops.mkldnn._linear_pointwise.default,
                (node.args[0], weight, bias, attr, [], algorithm),
            )
        if found is not None:
            user.replace_all_uses_with(kernel)
            graph.erase_node(user)
        node.replace_all_uses_with(kernel)
        graph.erase_node(node)
        replaced += [module] if activation_module is None else [module, activation_module]
        linear_layers += 1
        activations += found is not None
    if not linear_layers:
        return None
    graph.lint()
    owners = {node.target: inner.get(node.target) or _attribute(graph_module, node.target)
              for node in graph.nodes if node.op in ("call_module", "get_attr")}
    return FusedGraph(fx.GraphModule(owners, graph, "Fused" + type(graph_module).__name__),
                      tuple(replaced), linear_layers, activations)


def _fused_call(
    node: fx.Node, module: nn.Module, trace: Optional[Tracing]
) -> Optional[FusedGraph]:
    """The rewritten graph of a module called whole with one argument, if it holds
    linear layers and traces."""
    if trace is None or len(node.args) != 1 or node.kwargs or \
            not any(type(m) is nn.Linear for m in module.modules()):
        return None
    try:
        traced = trace(module)
    except Exception:  # fx raises many kinds for untraceable code: keep the call
        return None
    return fuse_linear_activations(traced, trace)


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for name in target.split("."):
        value = getattr(value, name)
    return value


# The activations the kernel applies, as (its name, its algorithm argument) per callable.
_KERNEL_NAMES: dict[Any, tuple[str, str]] = {
    F.relu: ("relu", ""), torch.relu: ("relu", ""), F.silu: ("swish", ""),
}


def _activation(
    node: fx.Node, modules: dict[str, nn.Module]
) -> Optional[tuple[str, str, Optional[nn.Module]]]:
    """The kernel's name and algorithm for the activation ``node`` computes, and its module
    (``None`` for a function), or ``None`` when it is not one the kernel fuses."""
    if node.op == "call_module":
        module = modules.get(node.target)
        kind = type(module)
        if kind is nn.GELU:
            return "gelu", module.approximate, module
        if kind is nn.ReLU:
            return "relu", "", module
        if kind is nn.SiLU:
            return "swish", "", module
        return None
    if node.op != "call_function" or len(node.args) != 1:
        return None
    if node.target is F.gelu:
        if set(node.kwargs) - {"approximate"}:
            return None
        return "gelu", node.kwargs.get("approximate", "none"), None
    if node.target in _KERNEL_NAMES and set(node.kwargs) <= {"inplace"}:
        return (*_KERNEL_NAMES[node.target], None)
    return None


def global_module_hooks() -> bool:
    """Whether forward hooks for every module are registered
    (``torch.nn.modules.module.register_module_forward_hook``, as FLOP counters do): they
    would see the module calls a rewritten graph no longer makes."""
    from torch.nn.modules import module as module_file
    return bool(getattr(module_file, "_global_forward_hooks", None)
                or getattr(module_file, "_global_forward_pre_hooks", None))
